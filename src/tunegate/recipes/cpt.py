"""Continued pretraining (CPT) on raw domain text: next-token loss on every token, texts packed into blocks.

Gururangan et al. 2020 ("Don't Stop Pretraining"): more pretraining on in-domain text before task tuning.
Each text is tokenized with one eos after it; the concatenation is cut into blocks of `data.max_length`
tokens (the last partial block is kept when it has at least 2 tokens), so no text is truncated and no
padding is trained on. Held-out perplexity, exp(mean token loss) on the validation texts packed the same
way, is measured before and after training: `perplexity_before`, `perplexity_after` in the summary.
"""

from __future__ import annotations

import math
from typing import Any

from tunegate.data.format import encode_text
from tunegate.recipes.common import Built, Context
from tunegate.recipes.sft import build_from_columns


def pack(tokenizer, rows: list[dict[str, Any]], block: int) -> dict[str, list]:
    """Raw-text records -> {"input_ids", "labels"} blocks of `block` tokens (labels = inputs: every token)."""
    stream: list[int] = []
    for r in rows:
        stream += encode_text(tokenizer, r["text"]).input_ids
    blocks = [stream[i : i + block] for i in range(0, len(stream), block)]
    blocks = [b for b in blocks if len(b) >= 2]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def perplexity(trainer) -> float | None:
    """exp(mean validation loss per token) on the trainer's eval blocks, or None without validation rows."""
    if trainer.eval_dataset is None:
        return None
    loss = trainer.evaluate()["eval_loss"]
    return math.exp(loss)


def build(ctx: Context) -> Built:
    block = ctx.project.data.max_length
    train = pack(ctx.tokenizer, ctx.train_rows, block)
    val = pack(ctx.tokenizer, ctx.val_rows, block) if ctx.val_rows else None
    built = build_from_columns(ctx, train, val)
    built.info.update(train_rows=len(ctx.train_rows), texts=len(ctx.train_rows), blocks=len(train["input_ids"]), block_tokens=block)
    before = perplexity(built.trainer)

    def after(trainer) -> dict[str, Any]:
        return {"perplexity_before": before, "perplexity_after": perplexity(trainer)}

    built.after_train = after
    return built
