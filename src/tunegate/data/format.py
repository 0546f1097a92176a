"""Rendering through the chat template, the loss mask, and the over-length policy.

The loss mask is derived from rendered prefixes, never from template markers or token ids:
for each assistant turn i, `render(messages[:i], add_generation_prompt=True)` must tokenize to an exact
prefix of `render(messages[:i+1])` (case C03 in docs/cases.md); the supervised span is what follows that prefix, up to and
including the end-of-turn token (case C01: with SmolLM2, eos == pad == `<|im_end|>`, so the end-of-turn
label is set by position and padding is masked by position in the collator). This works for templates
without `{% generation %}` markers (case C09). Plain prompt/completion rows (no template) are
`prompt + completion + exactly one eos`, the eos supervised (case C02).

Every function here raises `RowError` (rule + detail) for a row it cannot encode; callers turn that into
a rejection with the row's id, never a crash mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunegate.data.records import RowError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool = False

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def supports_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (rather than raising or dropping it)."""
    probe = "tunegate-system-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}], tokenize=False
        )
    except Exception:  # templates reject a system role with a jinja exception of their own
        return False
    return probe in text


def apply_system_policy(messages: list[dict[str, str]], policy: str, template_has_system: bool) -> list[dict[str, str]]:
    """The one system-message policy, applied the same way in data, train and eval (case C04).

    policy: "auto" keeps a system message when the template has a system role and merges it into the first
    user turn otherwise; "merge" always merges; "reject" raises RowError for any system message.
    """
    if not messages or messages[0]["role"] != "system":
        return messages
    if policy == "reject":
        raise RowError("system_role", "system messages are rejected by data.system_role=reject")
    if policy == "auto" and template_has_system:
        return messages
    system, first, *rest = messages
    merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
    return [merged, *rest]


def token_ids(tokenizer, text: str) -> list[int]:
    """The token ids of `text` alone: no BOS or other special token is added (a rendered chat carries its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """`messages` rendered as text through the tokenizer's chat template, with the assistant header after the
    last turn when `add_generation_prompt`.

    Raises:
        RowError: rule `template_error`, when the template refuses the messages (an unsupported role, its own
            `raise_exception(...)`).
    """
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template's own error (unsupported role, raise_exception(...))
        raise RowError("template_error", f"the chat template refused the row: {exc}") from None


def end_token_id(tokenizer) -> int:
    """The end-of-turn token: `<|im_end|>` for ChatML templates, else eos."""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eot is None or eot == tokenizer.unk_token_id:
        return tokenizer.eos_token_id
    return eot


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> Encoded:
    """Token ids and labels for a chat; only assistant content and its end-of-turn token are supervised."""
    eot = end_token_id(tokenizer)
    full = token_ids(tokenizer, render_chat(tokenizer, messages, False))
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = token_ids(tokenizer, render_chat(tokenizer, messages[:i], True))
        upto = token_ids(tokenizer, render_chat(tokenizer, messages[: i + 1], False))
        if full[: len(upto)] != upto or upto[: len(prefix)] != prefix:
            raise RowError(
                "prompt_not_prefix",
                f"turn {i}: the rendered prompt (with generation prompt) is not a token prefix of the rendered "
                "conversation; the assistant header would be trained on",
            )
        span = upto[len(prefix):]
        if eot not in span:
            raise RowError("no_end_token", f"turn {i}: the template puts no end-of-turn token after the answer")
        end = len(prefix) + span.index(eot) + 1  # include the end-of-turn token
        for j in range(len(prefix), end):
            labels[j] = full[j]
    enc = Encoded(full, labels)
    if enc.n_supervised == 0:
        raise RowError("no_supervised_tokens", "no assistant token to learn from")
    return enc


def encode_plain(tokenizer, prompt: str, completion: str) -> Encoded:
    """Plain text: prompt ids + completion ids + exactly one eos (case C02). The completion and eos are supervised."""
    eos = tokenizer.eos_token_id
    p = token_ids(tokenizer, prompt)
    c = token_ids(tokenizer, completion)
    while c and c[-1] == eos:  # a completion that already ends in eos gets no second one
        c = c[:-1]
    if not c:
        raise RowError("empty_turn", "completion has no tokens")
    ids = p + c + [eos]
    return Encoded(ids, [IGNORE_INDEX] * len(p) + c + [eos])


def apply_length_policy(enc: Encoded, max_length: int, policy: str, eos_id: int) -> Encoded:
    """Fit a row into max_length tokens (cases C10, C11). Raises RowError when it cannot.

    drop: reject an over-length row. truncate_end: keep the first max_length-1 tokens and put a supervised
    end token last, so the model still learns to stop. cut_context_left: drop tokens from the start,
    keeping the end of the conversation (the answer) whole.
    A row left with no supervised token is rejected: it would log a loss of 0 and train on nothing.
    """
    if len(enc.input_ids) <= max_length:
        return enc
    n = len(enc.input_ids)
    if policy == "drop":
        raise RowError("overlength", f"{n} tokens > max_length {max_length} (policy drop)")
    if policy == "truncate_end":
        ids = enc.input_ids[: max_length - 1]
        labels = enc.labels[: max_length - 1]
        if all(x == IGNORE_INDEX for x in labels):
            raise RowError("no_supervised_tokens", f"{n} tokens: the prompt alone fills max_length {max_length}")
        out = Encoded(ids + [eos_id], labels + [eos_id], truncated=True)
    elif policy == "cut_context_left":
        last = max(i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX)
        start = last
        while start > 0 and enc.labels[start - 1] != IGNORE_INDEX:
            start -= 1  # start of the final answer's supervised span
        if last + 1 - start > max_length:
            raise RowError("overlength", f"the final answer alone is longer than max_length {max_length} (policy cut_context_left)")
        lo = last + 1 - max_length
        out = Encoded(enc.input_ids[lo : last + 1], enc.labels[lo : last + 1], truncated=True)
    else:
        raise ValueError(f"unknown over-length policy {policy}")
    if out.n_supervised == 0:
        raise RowError("no_supervised_tokens", f"nothing left to learn from after cutting to {max_length} tokens")
    return out


def encode_text(tokenizer, text: str) -> Encoded:
    """Raw text for continued pretraining: its ids and one eos, every token supervised (a causal LM objective).

    No length policy: the CPT recipe packs texts into `max_length` blocks, so a long text is split, not cut.
    """
    ids = token_ids(tokenizer, text) + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def rejected_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A preference pair's prompt with the rejected answer as its final assistant turn."""
    return [*record["messages"][:-1], {"role": "assistant", "content": record["rejected"]}]


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for: the length of its longest vocabulary entry
    (81 for SmolLM2). A byte-level BPE entry spells one character per byte and a SentencePiece entry one per
    character, so no token decodes to more characters than its entry has. Cached on the tokenizer."""
    cached = getattr(tokenizer, "_tunegate_max_token_chars", None)
    if cached is None:
        cached = max(map(len, tokenizer.get_vocab()))
        try:
            tokenizer._tunegate_max_token_chars = cached
        except AttributeError:  # a tokenizer that takes no new attributes: computed each time (~50 ms)
            pass
    return cached


def check_length_before_tokenizing(tokenizer, record: dict[str, Any], max_length: int, policy: str) -> None:
    """Reject, without tokenizing, a row that cannot fit: tokenizing costs time and memory in proportion to a
    row's length (a 50 MB row took minutes and gigabytes), and a text of more than max_length x
    `max_token_chars` characters has more than max_length tokens whatever it says.

    Applies where the length policy would reject the row anyway: `drop` (the whole conversation, or either
    side of a preference pair) and `cut_context_left` (the final answer alone). `truncate_end` and raw text
    are tokenized; their size is bounded by data.sources[].max_row_bytes.

    Raises:
        RowError: rule `overlength`, naming the characters and the bound.
    """
    if "text" in record or policy == "truncate_end":
        return
    bound = max_length * max_token_chars(tokenizer)
    if "messages" in record:
        prompt = sum(len(m["content"]) for m in record["messages"][:-1])
        answers = [record["messages"][-1]["content"]] + ([record["rejected"]] if "rejected" in record else [])
    else:
        prompt, answers = len(record["prompt"]), [record["completion"]]
    for answer in answers:
        n = len(answer) + (prompt if policy == "drop" else 0)
        if n > bound:
            what = "the row" if policy == "drop" else "the final answer alone"
            raise RowError("overlength", f"{what} has {n:,} characters: more than max_length {max_length} tokens can "
                                         f"hold ({bound:,} = {max_length} x {max_token_chars(tokenizer)}, the longest "
                                         f"token) (policy {policy}; not tokenized)")


def encode_record(tokenizer, record: dict[str, Any], max_length: int, policy: str) -> Encoded:
    """Token ids and labels for any kind of record (records.record_kind). Raises RowError.

    A preference pair must encode on both sides (same prompt, chosen and rejected answers, each within the
    over-length policy); the chosen side is returned, with the longer length of the two when it is longer.
    A row that cannot fit is rejected before it is tokenized (`check_length_before_tokenizing`).
    """
    check_length_before_tokenizing(tokenizer, record, max_length, policy)
    if "text" in record:
        return encode_text(tokenizer, record["text"])
    if "messages" not in record:
        enc = encode_plain(tokenizer, record["prompt"], record["completion"])
        return apply_length_policy(enc, max_length, policy, tokenizer.eos_token_id)
    eot = end_token_id(tokenizer)
    enc = apply_length_policy(encode_chat(tokenizer, record["messages"]), max_length, policy, eot)
    if "rejected" in record:
        try:
            rej = apply_length_policy(encode_chat(tokenizer, rejected_messages(record)), max_length, policy, eot)
        except RowError as exc:
            raise RowError(exc.rule, f"rejected answer: {exc.detail}") from None
        enc.truncated = enc.truncated or rej.truncated
    return enc


def generation_prompt(tokenizer, record: dict[str, Any]) -> str:
    """What the model sees at eval and serve time: the conversation without its final answer."""
    if "messages" in record:
        return render_chat(tokenizer, record["messages"][:-1], True)
    return record["prompt"]


def encode_batch_fn(base_model: str, system_role: str, max_length: int, policy: str):
    """A worker's batch function (tunegate.data.engine) for the data stage's template step.

    The returned function maps records to ("kept", record with the system policy applied, tokens, truncated)
    or ("rejected", rule, detail), in order; the tokenizer is loaded once per worker (no weights).
    """
    from tunegate.data.records import RowError
    from tunegate.models import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model(base_model, progress=False))
    has_system = supports_system_role(tokenizer)

    def run(records: list[dict[str, Any]]) -> list[tuple]:
        out = []
        for rec in records:
            try:
                if "messages" in rec:
                    rec = {**rec, "messages": apply_system_policy(rec["messages"], system_role, has_system)}
                enc = encode_record(tokenizer, rec, max_length, policy)
            except RowError as exc:
                out.append(("rejected", exc.rule, exc.detail))
                continue
            except Exception as exc:  # noqa: BLE001  a row the tokenizer cannot take (lone surrogates...): rejected, the stage goes on
                out.append(("rejected", "unencodable_row", f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
            out.append(("kept", rec, len(enc.input_ids), enc.truncated))
        return out

    return run
