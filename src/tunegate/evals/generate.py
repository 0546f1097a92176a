"""Batched greedy generation with left padding and the KV cache."""

from __future__ import annotations

from typing import Sequence


def generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, desc: str = "generating",
    temperature: float = 0.0, top_p: float = 1.0, stopped: list[bool] | None = None,
    confidences: list[float] | None = None,
) -> list[str]:
    """Completions of `prompts` (rendered text), in input order: greedy, or sampled when `temperature` > 0
    (nucleus sampling with `top_p`, Holtzman et al. 2019; seed torch for reproducible samples).

    Prompts are sorted by length so each batch pads little; left padding keeps the last prompt token next
    to the first generated one. Generation stops at the end-of-turn or eos token. `stopped`, when given, is
    filled with one bool per prompt, in input order: whether its answer ended at one of those tokens (False: it
    ran to `max_new_tokens`). `confidences`, when given, is filled with each answer's confidence, in input order:
    the geometric mean of its tokens' probabilities through the stop token (tunegate.evals.abstain.answer_confidences).
    """
    import torch

    from tunegate.core.console import progress
    from tunegate.data.format import stop_token_ids
    from tunegate.evals.abstain import answer_confidences

    tokenizer.padding_side = "left"
    stop = stop_token_ids(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    ended = [False] * len(prompts)
    confidence = [1.0] * len(prompts)
    scored = {"output_logits": True, "return_dict_in_generate": True} if confidences is not None else {}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    model.eval()
    with torch.inference_mode(), progress(desc, len(prompts)) as advance:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                **sampling,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop,
                **scored,
            )
            sequences = out.sequences if scored else out
            new = sequences[:, batch["input_ids"].shape[1] :]  # (B, new_tokens)
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
