"""Train stage (SFT): TRL's SFTTrainer with a PEFT adapter, default LoRA r=16, alpha=32, DoRA, all linear layers.

Rows are tokenized by tunegate (`tunegate.data.format`): labels are set by position, only assistant
tokens and their end-of-turn token are supervised, and TRL's collator pads labels with -100 by position
(never by token id: eos == pad for SmolLM2, case C01). bf16 autocast where the device supports it,
fp32 otherwise. Checkpoints go to `checkpoints/`; a rerun after a kill resumes from the last one.

Writes: adapter/ (PEFT format), metrics.jsonl (every logged step), loss.png, train_summary.json.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.config import check_passthrough, lora_kwargs, sft_kwargs
from tunegate.data.format import IGNORE_INDEX, encode_record
from tunegate.data.records import read_jsonl
from tunegate.manifest import atomic_write_json, atomic_write_jsonl
from tunegate.pipeline import Stage, StageResult, console


def tokenize_rows(tokenizer, rows: list[dict[str, Any]], max_length: int, policy: str) -> dict[str, list]:
    """Rows of the data stage -> {"input_ids", "labels"} columns. The data stage already rejected bad rows."""
    cols: dict[str, list] = {"input_ids": [], "labels": []}
    for r in rows:
        enc = encode_record(tokenizer, r, max_length, policy)
        cols["input_ids"].append(enc.input_ids)
        cols["labels"].append(enc.labels)
    return cols


def supervised_only_loss(model, inputs, num_items_in_batch=None):
    """Cross-entropy over supervised positions only: the LM head runs on those rows of the hidden states.

    inputs: input_ids and attention_mask (B, T), labels (B, T) with IGNORE_INDEX where no loss is taken.
    Returns (loss, n_supervised, n_correct). With `num_items_in_batch` (supervised tokens over all
    gradient-accumulation steps) the sum is divided by it, as transformers' Trainer expects.

    Why not TRL's fused LM head: off Triton devices it scores every position in fp32, which on a CPU cost
    more than a quarter of each step for a task whose answers are a few tokens (measured, bench/).
    """
    import torch
    import torch.nn.functional as F

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    hidden = causal_lm.base_model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).last_hidden_state
    mask = labels != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][mask])  # (N_supervised, V)
    target = labels[mask]
    loss_sum = F.cross_entropy(logits.float(), target, reduction="sum")
    n = int(mask.sum())
    denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
    with torch.no_grad():
        correct = int((logits.argmax(-1) == target).sum())
    return loss_sum / denom, n, correct


def _trainer_class():
    from trl import SFTTrainer

    class TunegateSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with `supervised_only_loss`; everything else (collation, PEFT, checkpoints) is TRL's."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            loss, n, correct = supervised_only_loss(model, inputs, num_items_in_batch)
            if n:
                self._metrics[mode]["mean_token_accuracy"].append(correct / n)
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, None) if return_outputs else loss

    return TunegateSFTTrainer


def _tracker(st: Stage, budget_s: float | None):
    from transformers import TrainerCallback

    metrics_path = st.dir / "metrics.jsonl"

    class MetricsAndBudget(TrainerCallback):
        """Writes the whole log history after every log (atomically), and stops at the time budget."""

        def __init__(self):
            self.t0 = time.perf_counter()
            self.start_step = 0
            self.start_tokens = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.start_step = state.global_step  # > 0 after a resume
            self.start_tokens = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            rows = state.log_history
            for r in rows[-1:]:
                if "loss" in r and (r["loss"] is None or (isinstance(r["loss"], float) and math.isnan(r["loss"]))):
                    control.should_training_stop = True
                    raise TunegateError(f"step {r.get('step')}: loss is NaN; a batch had no supervised tokens or the run diverged")
            atomic_write_jsonl(metrics_path, rows)

        def on_step_end(self, args, state, control, **kw):
            if budget_s is not None and time.perf_counter() - self.t0 > budget_s:
                console.print(f"[yellow]time budget of {budget_s / 60:.1f} min reached at step {state.global_step}; saving and stopping[/yellow]")
                control.should_training_stop = True
                control.should_save = True

    return MetricsAndBudget()


def run(st: Stage) -> StageResult:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    from tunegate.models import bf16_supported, load_model, load_tokenizer, resolve_base_model

    project = st.project
    problems = check_passthrough(project)
    if problems:
        raise TunegateError("\n".join(f"{project.source_file}: {p}" for p in problems))
    data_dir = st.upstream_dir("data")
    train_rows = read_jsonl(data_dir / "train.jsonl")
    val_rows = read_jsonl(data_dir / "val.jsonl")

    base = resolve_base_model(project.base_model)
    tokenizer = load_tokenizer(base)
    dcfg = project.data
    train_ds = Dataset.from_dict(tokenize_rows(tokenizer, train_rows, dcfg.max_length, dcfg.overlength))
    val_ds = Dataset.from_dict(tokenize_rows(tokenizer, val_rows, dcfg.max_length, dcfg.overlength)) if val_rows else None
    n_tokens = sum(len(x) for x in train_ds["input_ids"])
    n_supervised = sum(sum(1 for y in lab if y != IGNORE_INDEX) for lab in train_ds["labels"])

    torch.manual_seed(project.train.seed)
    use_bf16 = bf16_supported()
    ckpt_dir = st.checkpoint_dir
    kwargs = sft_kwargs(project, ckpt_dir, use_bf16)
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")
    if val_ds is not None:
        kwargs.setdefault("eval_strategy", "steps")
        kwargs.setdefault("eval_steps", kwargs.get("save_steps", 50))
        kwargs.setdefault("per_device_eval_batch_size", kwargs["per_device_train_batch_size"])
    args = SFTConfig(**kwargs)
    model = load_model(base)
    lora = LoraConfig(**lora_kwargs(project))
    tracker = _tracker(st, project.train.budget_minutes * 60 if project.train.budget_minutes else None)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[tracker],
    )
    trainable, total = trainer.model.get_nb_trainable_parameters()
    console.print(
        f"{len(train_ds)} train rows, {n_tokens} tokens ({n_supervised} supervised); "
        f"adapter: {trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M; "
        f"precision: {'bf16 autocast' if use_bf16 else 'fp32'}"
    )
    resume = any(ckpt_dir.glob("checkpoint-*"))
    if resume:
        console.print(f"resuming from the last checkpoint in {ckpt_dir}")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_s = time.perf_counter() - t0

    # st.dir is the stage's partial folder: the adapter becomes visible only when the whole stage succeeds.
    trainer.model.save_pretrained(st.dir / "adapter")
    tokenizer.save_pretrained(st.dir / "adapter")

    history = trainer.state.log_history
    atomic_write_jsonl(st.dir / "metrics.jsonl", history)
    _plot_loss(history, st.dir / "loss.png")
    state = trainer.state
    tokens_this_session = state.num_input_tokens_seen - tracker.start_tokens
    summary = {
        "train_rows": len(train_ds),
        "val_rows": len(val_rows),
        "train_tokens_per_epoch": n_tokens,
        "supervised_tokens_per_epoch": n_supervised,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "stopped_by_budget": state.global_step < state.max_steps,
        "epochs_seen": round(state.epoch or 0.0, 3),
        "tokens_seen": state.num_input_tokens_seen,  # non-padding input tokens, all sessions
        "train_wall_s": round(train_s, 1),
        "train_tokens_per_s": round(tokens_this_session / train_s, 1) if train_s > 0 else None,
        "resumed_from_step": tracker.start_step,
        "final_train_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
        "final_eval_loss": next((r["eval_loss"] for r in reversed(history) if "eval_loss" in r), None),
        "precision": "bf16" if use_bf16 else "fp32",
        "trainable_params": trainable,
        "total_params": total,
        "lora": lora_kwargs(project),
        "trl": {k: v for k, v in kwargs.items() if k != "output_dir"},
    }
    atomic_write_json(st.dir / "train_summary.json", summary)
    console.print(
        f"trained {state.global_step} steps in {train_s:.0f} s, {summary['train_tokens_per_s']} tokens/s; "
        f"final loss {summary['final_train_loss']}"
    )
    return StageResult(metrics=summary)


def _plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

