"""Chat template rendering and loss masks on the real SmolLM2 tokenizer (cases C01-C04 in docs/cases.md, C09-C11)."""

import pytest

from tunegate.data.format import (
    IGNORE_INDEX,
    apply_length_policy,
    apply_system_policy,
    encode_chat,
    encode_plain,
    end_token_id,
    generation_prompt,
    supports_system_role,
)
from tunegate.data.records import RowError

CHAT = [{"role": "user", "content": "My card was charged twice for the same coffee."},
        {"role": "assistant", "content": "transaction_charged_twice"}]


def supervised(enc):
    return [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]


def test_c01_end_of_turn_is_supervised_although_it_equals_pad(tokenizer):
    eot = end_token_id(tokenizer)
    assert eot == tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap: pad == eos == <|im_end|>
    enc = encode_chat(tokenizer, CHAT)
    sup = supervised(enc)
    assert sup[-1] == eot
    assert tokenizer.decode(sup[:-1]) == "transaction_charged_twice"


def test_c01_collator_masks_padding_by_position_not_by_id(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    short = encode_chat(tokenizer, CHAT)
    long = encode_chat(tokenizer, [{"role": "user", "content": "A much longer question " * 5}, {"role": "assistant", "content": "x"}])
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)]
    )
    labels = batch["labels"][0].tolist()
    n = len(short.input_ids)
    assert labels[:n] == short.labels  # the real <|im_end|> keeps its label
    assert all(x == IGNORE_INDEX for x in labels[n:])  # padding (same id) is masked by position
    assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()


def test_c02_plain_prompt_completion_ends_with_exactly_one_supervised_eos(tokenizer):
    eos = tokenizer.eos_token_id
    for prompt, completion in [("2+2=", " 4"), ("Capital of France:", " Paris"), ("x", " y" + tokenizer.eos_token)]:
        enc = encode_plain(tokenizer, prompt, completion)
        assert enc.input_ids[-1] == eos and enc.labels[-1] == eos
        assert enc.input_ids.count(eos) == 1
        assert enc.labels[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] == [IGNORE_INDEX] * len(
            tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_c03_prompt_is_exact_prefix_and_labels_start_at_first_answer_token(tokenizer):
    enc = encode_chat(tokenizer, CHAT)
    prompt_ids = tokenizer(generation_prompt(tokenizer, {"messages": CHAT}), add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    first = next(i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX)
    assert first == len(prompt_ids)  # "assistant\n" header is not trained on
    assert tokenizer.decode(enc.input_ids[first: first + 3]).startswith("transaction")


def test_c03_row_whose_prompt_is_not_a_prefix_is_rejected(tokenizer):
    tok = _with_template(tokenizer, (
        "{% for m in messages %}{% if loop.last and m.role == 'assistant' %}<|im_start|>ASSISTANT\n{{ m.content }}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    with pytest.raises(RowError) as e:
        encode_chat(tok, CHAT)
    assert e.value.rule == "prompt_not_prefix"


def _with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_c09_template_without_generation_markers_still_gets_a_mask(tokenizer):
    # A plain ChatML template with no {% generation %} markers: the mask comes from the rendered prefix.
    tok = _with_template(tokenizer, (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    assert "{% generation %}" not in tok.chat_template
    enc = encode_chat(tok, CHAT)
    assert enc.n_supervised == len(tokenizer("transaction_charged_twice", add_special_tokens=False)["input_ids"]) + 1


def test_c09_template_without_end_token_is_rejected_not_trained_on_nothing(tokenizer):
    tok = _with_template(tokenizer, (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"))
    with pytest.raises(RowError) as e:
        encode_chat(tok, CHAT)
    assert e.value.rule in {"no_end_token", "prompt_not_prefix"}


def test_c04_system_policy(tokenizer):
    msgs = [{"role": "system", "content": "Answer with the intent label only."}, *CHAT]
    assert supports_system_role(tokenizer)
    assert apply_system_policy(msgs, "auto", True) == msgs
    merged = apply_system_policy(msgs, "auto", False)
    assert [m["role"] for m in merged] == ["user", "assistant"]
    assert merged[0]["content"].startswith("Answer with the intent label only.\n\n")
    assert apply_system_policy(msgs, "merge", True) == merged
    with pytest.raises(RowError) as e:
        apply_system_policy(msgs, "reject", True)
    assert e.value.rule == "system_role"


def test_c04_template_without_system_role_is_detected(tokenizer):
    tok = _with_template(tokenizer, (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    assert not supports_system_role(tok)
    msgs = apply_system_policy([{"role": "system", "content": "S"}, *CHAT], "auto", supports_system_role(tok))
    assert encode_chat(tok, msgs).n_supervised > 0


LONG_PROMPT = [{"role": "user", "content": "Please read the following account history carefully. " * 30},
               {"role": "assistant", "content": "statement_request"}]
LONG_ANSWER = [{"role": "user", "content": "How do I change my PIN?"},
               {"role": "assistant", "content": "Step one: open the app. " * 30}]


def test_c10_prompt_filling_max_length_is_rejected_never_a_zero_loss_row(tokenizer):
    enc = encode_chat(tokenizer, LONG_PROMPT)
    for policy in ("drop", "truncate_end"):
        with pytest.raises(RowError) as e:
            apply_length_policy(enc, 32, policy, end_token_id(tokenizer))
        assert e.value.rule in {"overlength", "no_supervised_tokens"}
    # cutting the context from the left keeps the answer and its end token
    kept = apply_length_policy(enc, 32, "cut_context_left", end_token_id(tokenizer))
    assert len(kept.input_ids) <= 32 and supervised(kept)[-1] == end_token_id(tokenizer)


def test_c11_truncating_a_long_answer_keeps_a_supervised_end_token(tokenizer):
    eot = end_token_id(tokenizer)
    enc = encode_chat(tokenizer, LONG_ANSWER)
    assert len(enc.input_ids) > 64
    with pytest.raises(RowError) as e:
        apply_length_policy(enc, 64, "drop", eot)
    assert e.value.rule == "overlength"
    cut = apply_length_policy(enc, 64, "truncate_end", eot)
    assert len(cut.input_ids) == 64 and cut.truncated
    assert cut.input_ids[-1] == eot and cut.labels[-1] == eot
    with pytest.raises(RowError):  # the answer alone is longer than 64: cutting the context cannot help
        apply_length_policy(enc, 64, "cut_context_left", eot)


def test_short_row_is_untouched_by_length_policy(tokenizer):
    enc = encode_chat(tokenizer, CHAT)
    assert apply_length_policy(enc, 512, "truncate_end", end_token_id(tokenizer)) is enc
