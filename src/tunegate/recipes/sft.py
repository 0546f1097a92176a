"""SFT on demonstrations: TRL's SFTTrainer with the adapter of `train.adapter` (default LoRA r=16 + DoRA).

Rows are tokenized by tunegate (`tunegate.data.format`): labels are set by position, only assistant
tokens and their end-of-turn token are supervised, and labels are padded with -100 by position (never by token
id: eos == pad for SmolLM2, case C01 in docs/cases.md). Used as is for LoRA, DoRA, QLoRA and full SFT, and by
the CPT and sequence-level distillation recipes.

Padding-free batches (`PackedCollator`): a step's rows are the ones TRL's sampler gives it, as with padding, but
laid end to end in a few packed sequences of at most PACK_TOKENS tokens, each row with its own position ids
from 0. With no attention mask, transformers builds the attention from the position ids: block-diagonal and
causal, so a row never attends to another (`masking_utils.find_packed_sequence_indices`). Loss mask, supervised
tokens and per-token loss are those of the padded batch; only the padding is gone.
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


# The longest packed sequence a padding-free batch is built of (a row longer than this is a sequence of its own).
# Attention over a packed sequence is dense, O(T²), on a CPU (no varlen kernel): on banking77 rows (~41 tokens,
# batch 16, 2 cores, bf16 base) a step took 2.19 s packed into sequences of <=256 tokens, 2.29 s at 128, 3.76 s at
# 512, against 2.61 s padded (medians of 7 steps of one forward/backward/AdamW timed by hand in one run, LoRA r16,
# 2026-12-08); as one sequence of ~650 tokens, 2.38 s and 2.80 s in two other runs.
PACK_TOKENS = 256


def pack_rows(lengths: list[int], budget: int = PACK_TOKENS) -> list[list[int]]:
    """First-fit decreasing: row indices grouped into sequences of at most max(budget, longest row) tokens.

    lengths: tokens per row. Returns one list of row indices per packed sequence, in packing order.
    """
    cap = max([budget, *lengths])
    bins: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for j, (used, members) in enumerate(bins):
            if used + lengths[i] <= cap:
                bins[j] = (used + lengths[i], members + [i])
                break
        else:
            bins.append((lengths[i], [i]))
    return [members for _, members in bins]


class PackedCollator:
    """A padding-free batch of tokenized rows (module docstring): {"input_ids", "labels", "position_ids",
    "attention_mask"}, each (S, T) with S packed sequences of T <= max(budget, longest row) tokens.

    - labels: each row's own, except its first position set to IGNORE_INDEX (a row's first label is never a target
      in a padded batch either: position t predicts t+1), so the last token of one row never learns the next row's
      first token.
    - position_ids: 0..n-1 for each row; a sequence's padding continues the last row's positions (it comes after
      every real token, so causal attention never lets a real token see it).
    - attention_mask: 1 on real tokens, 0 on padding. It counts tokens (Trainer's num_input_tokens_seen) and must
      NOT be given to the model: a mask, or a KV cache, makes transformers ignore the position ids and attend
      across rows (`supervised_only_loss` passes position_ids, no mask and use_cache=False).
    """

    def __init__(self, pad_token_id: int, budget: int = PACK_TOKENS):
        self.pad_token_id = pad_token_id
        self.budget = budget

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        packs = pack_rows([len(ids) for ids, _ in rows], self.budget)
        width = max(sum(len(rows[i][0]) for i in pack) for pack in packs)
        out = {
            "input_ids": torch.full((len(packs), width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((len(packs), width), dtype=torch.long),
            "attention_mask": torch.zeros((len(packs), width), dtype=torch.long),
        }
        for s, pack in enumerate(packs):
            at = 0
            for i in pack:
                ids, labels = rows[i]
                n = len(ids)
                out["input_ids"][s, at:at + n] = torch.tensor(ids)
                out["labels"][s, at:at + n] = torch.tensor([IGNORE_INDEX, *labels[1:]])
                out["position_ids"][s, at:at + n] = torch.arange(n)
                out["attention_mask"][s, at:at + n] = 1
                at += n
            last = int(out["position_ids"][s, at - 1])
            out["position_ids"][s, at:] = torch.arange(last + 1, last + 1 + width - at)
        return out


def supervised_only_loss(model, inputs, num_items_in_batch=None):
    """Cross-entropy over supervised positions only: the LM head runs on those rows of the hidden states.

    inputs: input_ids and attention_mask (B, T), labels (B, T) with IGNORE_INDEX where no loss is taken; with
    position_ids (B, T) the batch is packed (`PackedCollator`): the model gets the position ids and no attention
    mask, so its attention stays within each row.
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
    position_ids = inputs.get("position_ids")
    attention_mask = None if position_ids is not None else inputs.get("attention_mask")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Multi-process (DDP, FSDP, DeepSpeed): the forward must go through the wrapped model, whose hooks
        # all-reduce gradients or gather sharded weights.
        out = model(input_ids=inputs["input_ids"], attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = out.logits[:, :-1][mask]
    else:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = causal_lm.base_model(input_ids=inputs["input_ids"], attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False).last_hidden_state
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
        """TRL's SFTTrainer with `supervised_only_loss` and padding-free batches (`PackedCollator`); everything
        else (sampling, PEFT, checkpoints) is TRL's."""

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
    model, peft = load_policy(ctx.project, ctx.base, ctx.tokenizer, ctx.base_weights)
    train_ds = Dataset.from_dict(train_cols)
    trainer = trainer_class()(
        model=model,
        args=SFTConfig(**kwargs),
        train_dataset=train_ds,
        eval_dataset=Dataset.from_dict(val_cols) if val_cols else None,
        processing_class=ctx.tokenizer,
        peft_config=peft,
        callbacks=ctx.callbacks,
        data_collator=PackedCollator(ctx.tokenizer.pad_token_id),
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
