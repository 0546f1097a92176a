"""Batched greedy generation with left padding and the KV cache; a prompt prefix every prompt shares is computed once.

The audit's candidates, the eval gate, the suites (IFEval, safety), the judge, distillation's teacher answers,
synthetic data and the merge check generate through `generate`. Not yet: GRPO's rollouts (recipes.grpo, several
samples per prompt) and the embedded server (serve.engine, one request at a time with its own stop rules).
"""

from __future__ import annotations

from typing import Any, Sequence

# A shared prefix shorter than this is computed with each batch: one batch-1 forward and a copy of its KV cache
# per batch cost about what they save. Measured once on 48 quickstart golden prompts (batch 24, fp32, 2 cores, each
# against generation without sharing in the same process): the 30-token shared system prompt gave no gain, a
# 190-token instruction with three fixed examples 2.2x. bench/eval_throughput.py times the audit's label list.
MIN_SHARED_PREFIX = 64


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """The number of leading token ids every row of `encoded` has in common, leaving each row at least one token of
    its own (generation needs a last prompt token to start from). 0 for fewer than two rows."""
    if len(encoded) < 2:
        return 0
    first, most = encoded[0], min(len(e) for e in encoded) - 1
    n = 0
    while n < most and all(e[n] == first[n] for e in encoded):
        n += 1
    return n


def generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, desc: str = "generating",
    temperature: float = 0.0, top_p: float = 1.0, stopped: list[bool] | None = None,
    confidences: list[float] | None = None, share_prefix: bool = True,
) -> list[str]:
    """Completions of `prompts` (rendered text), in input order: greedy, or sampled when `temperature` > 0
    (nucleus sampling with `top_p`, Holtzman et al. 2019; seed torch for reproducible samples).

    Prompts are sorted by length so each batch pads little; left padding keeps the last prompt token next
    to the first generated one. When every prompt starts with the same MIN_SHARED_PREFIX tokens or more (an audit
    instruction with its label list or fixed few-shot examples), that prefix is run through the model once and
    its KV cache copied into each batch; each row's own tokens follow it, left-padded: [prefix][pad][row]. The
    token ids the model reads are the same either way (`share_prefix=False` turns it off, for comparisons).
    Generation stops at the end-of-turn or eos token.

    `stopped`, when given, is filled with one bool per prompt, in input order: whether its answer ended at one of
    those tokens (False: it ran to `max_new_tokens`). `confidences`, when given, is filled with each answer's
    confidence, in input order: the geometric mean of its tokens' probabilities through the stop token
    (tunegate.evals.abstain.answer_confidences).
    """
    import torch

    from tunegate.core.console import progress
    from tunegate.data.format import stop_token_ids
    from tunegate.evals.abstain import answer_confidences

    stop = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    ended = [False] * len(prompts)
    confidence = [1.0] * len(prompts)
    scored = {"output_logits": True, "return_dict_in_generate": True} if confidences is not None else {}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    model.eval()
    with torch.inference_mode(), progress(desc, len(prompts)) as advance:
        prefix = _prefix_cache(model, encoded) if share_prefix else None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, attention_mask = _left_padded([encoded[i] for i in idx], prefix[0] if prefix else [], pad_id)
            cached = {"cache": _copy_for_batch(prefix[1], len(idx))} if prefix else {}
            out = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                **sampling,
                pad_token_id=pad_id,
                eos_token_id=stop,
                **scored,
                **cached,
            )
            sequences = out.sequences if scored else out
            new = sequences[:, input_ids.shape[1] :]  # (B, new_tokens)
            if scored:
                for i, c in zip(idx, answer_confidences(out.logits, new, stop)):
                    confidence[i] = c
            for i, row in zip(idx, new):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
                ended[i] = any(int(t) in stop for t in row)
            advance(len(idx))
    if stopped is not None:
        stopped[:] = ended
    if confidences is not None:
        confidences[:] = confidence
    return outputs


def _prefix_cache(model, encoded: Sequence[Sequence[int]]) -> tuple[list[int], Any] | None:
    """(prefix token ids, its KV cache at batch 1) when the rows share MIN_SHARED_PREFIX tokens or more and the
    model generates with transformers' plain DynamicCache of full-attention layers; None otherwise (no forward
    run). A generation config naming a cache_implementation (static, offloaded, quantized) would refuse a cache
    passed in, one with use_cache off generates without one, and a sliding-window or recurrent layer's state cannot
    be copied row by row this way."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    n = shared_prefix_length(encoded)
    config = model.generation_config
    if n < MIN_SHARED_PREFIX or getattr(config, "cache_implementation", None) is not None or config.use_cache is False:
        return None
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    ids = list(encoded[0][:n])
    model(input_ids=torch.tensor([ids], device=model.device), cache=cache, use_cache=True, logits_to_keep=1)
    return ids, cache


def _copy_for_batch(cache, rows: int):
    """A copy of a batch-1 KV cache repeated to `rows` rows (generate extends the cache it is given in place)."""
    import copy

    batch = copy.deepcopy(cache)
    batch.batch_repeat_interleave(rows)
    return batch


def _left_padded(rows: Sequence[Sequence[int]], prefix: Sequence[int], pad_id: int):
    """(input_ids, attention_mask), each (B, len(prefix) + L) with L the longest row after the prefix: the shared
    prefix, then each row's own tokens left-padded to L. Position ids follow the mask (transformers' generate counts
    them from it), so a row's tokens sit right after the prefix whatever its padding."""
    import torch

    n = len(prefix)
    own = [r[n:] for r in rows]
    width = n + max(len(r) for r in own)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    if n:
        input_ids[:, :n] = torch.tensor(prefix, dtype=torch.long)
        attention_mask[:, :n] = 1
    for b, r in enumerate(own):
        if r:
            input_ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, width - len(r) :] = 1
    return input_ids, attention_mask
