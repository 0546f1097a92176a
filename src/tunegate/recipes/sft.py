"""SFT on demonstrations: TRL's SFTTrainer with the adapter of `train.adapter` (default LoRA r=16 + DoRA).

Rows are tokenized by tunegate (`tunegate.data.format`): labels are set by position, only assistant
tokens and their end-of-turn token are supervised, and TRL's collator pads labels with -100 by position
(never by token id: eos == pad for SmolLM2, case C01 in docs/cases.md). Used as is for LoRA, DoRA, QLoRA and full SFT, and
by the CPT and sequence-level distillation recipes.
"""

from __future__ import annotations

from typing import Any

from tunegate.data.format import IGNORE_INDEX, encode_record
from tunegate.recipes.common import Built, Context, load_policy


def tokenize_rows(tokenizer, rows: list[dict[str, Any]], max_length: int, policy: str) -> dict[str, list]:
    """Rows of the data stage -> {"input_ids", "labels"} columns. The data stage already rejected bad rows.

    Raises:
        TunegateError: a row the data stage's rules now reject (a data folder written before a rule, e.g.
            `control_token`), naming the row and the rule.
    """
    from tunegate import TunegateError
    from tunegate.data.records import RowError

    cols: dict[str, list] = {"input_ids": [], "labels": []}
    for r in rows:
        try:
            enc = encode_record(tokenizer, r, max_length, policy)
        except RowError as exc:
            where = f"{r['meta']['file']}:{r['meta']['line']} " if isinstance(r.get("meta"), dict) and "line" in r["meta"] else ""
            raise TunegateError(f"{where}(id {r.get('id')}): {exc.rule}: {exc.detail}; rerun the data stage "
                                "(tunegate data PROJECT --force)") from None
        cols["input_ids"].append(enc.input_ids)
        cols["labels"].append(enc.labels)
    return cols


def supervised_only_loss(model, inputs, num_items_in_batch=None):
    """Cross-entropy over supervised positions only: the LM head runs on those rows of the hidden states.

    inputs: input_ids and attention_mask (B, T), labels (B, T) with IGNORE_INDEX where no loss is taken.
    Returns (loss, n_supervised, n_correct). With `num_items_in_batch` (supervised tokens over all
    gradient-accumulation steps) the sum is divided by it, as transformers' Trainer expects.

    Why not TRL's fused LM head: off Triton devices it scores every position in fp32, which on a CPU cost
    more than a quarter of each step for a task whose answers are a few tokens (measured, bench/). With
    several processes the whole model's forward runs instead (all positions scored): DDP/FSDP hooks must see it.
    """
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    mask = labels != IGNORE_INDEX
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Multi-process (DDP, FSDP, DeepSpeed): the forward must go through the wrapped model, whose hooks
        # all-reduce gradients or gather sharded weights.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        logits = out.logits[:, :-1][mask]
    else:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = causal_lm.base_model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][mask])  # (N_supervised, V)
    target = labels[mask]
    loss_sum = F.cross_entropy(logits.float(), target, reduction="sum")
    n = int(mask.sum())
    denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
    with torch.no_grad():
        correct = int((logits.argmax(-1) == target).sum())
    return loss_sum / denom, n, correct


def trainer_class():
    from trl import SFTTrainer

    class TunegateSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with `supervised_only_loss`; everything else (collation, PEFT, checkpoints) is TRL's."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            loss, n, correct = supervised_only_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every process's tokens and DDP averages gradients over processes:
                # scale back up, as transformers' own compute_loss does, so loss and gradients are per token.
                loss = loss * self.accelerator.num_processes
            if n:
                self._metrics[mode]["mean_token_accuracy"].append(correct / n)
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, None) if return_outputs else loss

    return TunegateSFTTrainer


def build_from_columns(ctx: Context, train_cols: dict[str, list], val_cols: dict[str, list] | None) -> Built:
    """An SFT trainer over already tokenized {"input_ids", "labels"} columns (shared with CPT and distillation)."""
    from datasets import Dataset
    from trl import SFTConfig

    kwargs = ctx.trl_args(evaluate=bool(val_cols))
    model, peft = load_policy(ctx.project, ctx.base, ctx.tokenizer)
    train_ds = Dataset.from_dict(train_cols)
    trainer = trainer_class()(
        model=model,
        args=SFTConfig(**kwargs),
        train_dataset=train_ds,
        eval_dataset=Dataset.from_dict(val_cols) if val_cols else None,
        processing_class=ctx.tokenizer,
        peft_config=peft,
        callbacks=ctx.callbacks,
    )
    info = {
        "train_rows": len(train_ds),
        "train_tokens_per_epoch": sum(len(x) for x in train_cols["input_ids"]),
        "supervised_tokens_per_epoch": sum(sum(1 for y in lab if y != IGNORE_INDEX) for lab in train_cols["labels"]),
    }
    return Built(trainer, info, trl_kwargs=kwargs)


def build(ctx: Context) -> Built:
    dcfg = ctx.project.data
    train = tokenize_rows(ctx.tokenizer, ctx.train_rows, dcfg.max_length, dcfg.overlength)
    val = tokenize_rows(ctx.tokenizer, ctx.val_rows, dcfg.max_length, dcfg.overlength) if ctx.val_rows else None
    return build_from_columns(ctx, train, val)
