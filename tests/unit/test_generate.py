"""The one generation path (tunegate.evals.generate): batched, length-sorted, left-padded, with a shared prompt prefix
computed once, gives the per-example greedy answers. On the real tokenizer and a tiny 2-layer Llama built in-process."""

import pytest


def test_shared_prefix_length_leaves_each_row_a_token_of_its_own():
    from tunegate.evals.generate import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # [1, 2] must keep its last token
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one row: nothing to share


def test_left_padded_puts_the_prefix_first_and_pads_between_it_and_each_row():
    from tunegate.evals.generate import _left_padded

    ids, mask = _left_padded([[5, 6, 1, 2, 3], [5, 6, 9]], [5, 6], pad_id=0)
    assert ids.tolist() == [[5, 6, 1, 2, 3], [5, 6, 0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from tunegate.models import load_model

    return load_model(tiny_model_dir), tokenizer


def _prompts(tokenizer):
    from tunegate.data.format import generation_prompt

    instruction = ("You route support messages for a bicycle shop. Answer with one JSON object with the keys queue, bike, "
                   "part and day, and nothing else. Queues: repairs, sales, rentals, warranty. ") * 2
    queries = ["my chain fell off", "the rear brake of my folding bike squeaks every morning since Tuesday", "hi",
               "can I rent an e-bike for the weekend of the 14th, and does it come with a helmet and a lock?", "refund"]
    return [generation_prompt(tokenizer, {"messages": [{"role": "system", "content": instruction},
                                                       {"role": "user", "content": q}, {"role": "assistant", "content": ""}]})
            for q in queries]


@pytest.fixture()
def prefixes(monkeypatch):
    """The (prefix ids, cache) or None each `generate` call got from _prefix_cache, in order."""
    import tunegate.evals.generate as gen

    made, real = [], gen._prefix_cache
    monkeypatch.setattr(gen, "_prefix_cache", lambda m, enc: made.append(real(m, enc)) or made[-1])
    return made


def _widths(model):
    """A list that collects the (batch, tokens) of every forward pass, read at the input embeddings."""
    widths = []
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: widths.append(tuple(args[0].shape)))
    return widths


def test_a_shared_prefix_is_computed_once_and_the_answers_are_the_per_example_greedy_ones(tiny_model_dir, tokenizer, prefixes):
    import torch

    from tunegate.data.format import stop_token_ids
    from tunegate.evals.generate import MIN_SHARED_PREFIX, generate
    from tunegate.models import load_model

    model = load_model(tiny_model_dir)
    widths = _widths(model)
    prompts = _prompts(tokenizer)
    stopped, conf = [], []
    out = generate(model, tokenizer, prompts, 12, batch_size=2, stopped=stopped, confidences=conf)
    n = len(prefixes[0][0])
    assert n >= MIN_SHARED_PREFIX  # the system prompt was shared
    own = sorted(len(tokenizer(p, add_special_tokens=False)["input_ids"]) - n for p in prompts)
    # one batch-1 forward over the prefix, then each batch's first forward reads only its rows' own tokens
    assert widths[0] == (1, n) and (2, max(own[:2])) in widths and (1, own[-1]) in widths
    assert max(w for _, w in widths) < n + own[-1]

    reference = []
    with torch.inference_mode():
        for p in prompts:  # the reference: model.generate per prompt, batch 1, no padding, no shared cache
            ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))[0, ids.shape[1]:]
            reference.append(tokenizer.decode(row, skip_special_tokens=True))
    assert out == reference

    stopped2, conf2 = [], []  # the same call without sharing
    assert generate(model, tokenizer, prompts, 12, batch_size=2, stopped=stopped2, confidences=conf2, share_prefix=False) == out
    assert stopped2 == stopped and conf2 == pytest.approx(conf, abs=1e-5)
    assert len(prefixes) == 1  # share_prefix=False never asked for one


def test_sampling_with_a_shared_prefix_draws_what_it_draws_without(tiny, prefixes):
    import torch

    from tunegate.evals.generate import generate

    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    torch.manual_seed(7)
    shared = generate(model, tokenizer, prompts, 8, batch_size=5, temperature=1.0, top_p=0.9)
    torch.manual_seed(7)
    assert generate(model, tokenizer, prompts, 8, batch_size=5, temperature=1.0, top_p=0.9, share_prefix=False) == shared
    assert prefixes[0] is not None
    torch.manual_seed(8)  # the samples depend on the seed, so the comparison above could fail
    assert generate(model, tokenizer, prompts, 8, batch_size=5, temperature=1.0, top_p=0.9) != shared


def test_rows_that_share_little_or_a_model_with_its_own_cache_get_no_prefix_cache(tiny, prefixes):
    import copy

    from tunegate.evals.generate import generate

    model, tokenizer = tiny
    short = ["short one", "another short one"]
    assert generate(model, tokenizer, short, 4, batch_size=2) == generate(model, tokenizer, short, 4, batch_size=2, share_prefix=False)
    static = copy.deepcopy(model)
    static.generation_config.cache_implementation = "static"  # transformers refuses a cache passed beside it
    prompts = _prompts(tokenizer)
    assert generate(static, tokenizer, prompts, 4, batch_size=2) == generate(model, tokenizer, prompts, 4, batch_size=2)
    # share_prefix=False asks for none: the calls that asked were short, static, then the plain model
    assert len(prefixes) == 3 and prefixes[0] is None and prefixes[1] is None and prefixes[2] is not None


def test_a_shared_prefix_through_a_peft_adapter_gives_the_unshared_answers(tiny_model_dir, tokenizer, prefixes):
    """The audit's LoRA probe and the eval's candidate generate through a PeftModel: the prefix's cache is computed
    with the adapter on, as the rows' tokens are."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunegate.evals.generate import generate
    from tunegate.models import load_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = _prompts(tokenizer)
    shared = generate(model, tokenizer, prompts, 8, batch_size=3)
    assert prefixes[0] is not None  # the PeftModel's prefix cache was built (config and generate through PEFT)
    assert generate(model, tokenizer, prompts, 8, batch_size=3, share_prefix=False) == shared
    with model.disable_adapter():  # the adapter changes the answers, so the comparison above saw it
        assert generate(model, tokenizer, prompts, 8, batch_size=3) != shared
