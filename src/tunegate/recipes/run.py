"""The training body: the preflight, the recipe of `train.method` (tunegate.recipes), and what it trained, saved.

The train stage calls `run_training` on the data stage's rows; the audit's LoRA probe calls it on a sample of
them, in its own folder. Writes preflight.json, adapter/ (PEFT format, with the tokenizer, a
generation_config.json whose eos ids include the end-of-turn token, and tunegate_vocabulary.json: the embedding
rows and `train.added_tokens` it trained with; `model/` instead for `adapter: full`),
metrics.jsonl (every logged step), loss.png and train_summary.json.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.recipes.defaults import adapter_kind, check_passthrough
from tunegate.core.console import console
from tunegate.core.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from tunegate.core.stage import Stage
from tunegate.recipes import common, recipe
from tunegate.recipes.lean_adapter import exact_dora_magnitude, use_lean_forward

# Logged series worth plotting beside the loss, per method (TRL's names).
PLOTTED = {
    "dpo": ("rewards/margins",),
    "kto": ("rewards/margins",),
    "orpo": ("rewards/margins",),
    "grpo": ("reward",),
}


def _trained_lora(model) -> dict[str, Any]:
    """The LoRA settings of the adapter that trained (an init adapter keeps its own), JSON-ready."""
    cfg = model.peft_config["default"].to_dict()
    keys = ("r", "lora_alpha", "lora_dropout", "use_dora", "target_modules", "task_type")
    out = {k: cfg.get(k) for k in keys}
    if isinstance(out["target_modules"], (set, frozenset)):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def _preflight(project, data_dir: Path) -> dict[str, Any]:
    """The preflight before every training (tunegate.preflight, without the micro-benchmark): warnings are
    printed, errors stop the run before a model is trained."""
    from tunegate.preflight import run_checks

    check = run_checks(project, data_dir, measure=False)
    for f in check["findings"]:
        colour = "red" if f["level"] == "error" else "yellow"
        console.print(f"[{colour}]preflight {f['level']} [{f['name']}][/{colour}] {f['message']} (fix: {f['fix']})")
    if check["errors"]:
        errors = "\n".join(f"  [{f['name']}] {f['message']} (fix: {f['fix']})" for f in check["findings"] if f["level"] == "error")
        raise TunegateError(f"preflight: {check['errors']} error(s), nothing trained:\n{errors}")
    return {k: v for k, v in check.items() if k != "text"}


def _precision(project) -> dict[str, Any]:
    """How this training holds its weights and which autocast it runs (models.train_precision), with what the
    method or the project's `train.trl` decides instead: QLoRA's 4-bit base, classify's fp32 model, and an explicit
    `train.trl` bf16 / fp16 (the base then stays fp32, under the autocast asked for)."""
    from tunegate.models import train_precision

    t = project.train
    if t.adapter == "qlora":
        return {"base_weights": "nf4", "autocast": "bf16", "reason": "QLoRA: 4-bit NF4 base weights, bf16 compute"}
    asked = {k: t.trl[k] for k in ("bf16", "fp16") if k in t.trl}
    if asked:
        autocast = "fp16" if asked.get("fp16") else "bf16" if asked.get("bf16") else None
        return {"base_weights": "fp32", "autocast": autocast, "reason": f"train.trl sets {asked}: fp32 base weights"}
    if t.method == "classify":  # recipes.classify loads its sequence-classification model in fp32
        chosen = train_precision(full=True)
        return {**chosen, "reason": chosen["reason"].split(";")[0] + "; the classification head's model loads in fp32"}
    return train_precision(full=t.adapter == "full")


def run_training(st: Stage, data_dir: Path) -> dict[str, Any] | None:
    """Train `st.project`'s `train.method` on the rows of `data_dir` and save what it trained.

    st: the training's folders and settings: st.project (the project), st.dir (preflight.json, metrics.jsonl,
    loss.png, train_summary.json), st.partial_dir (adapter/, or model/ for `adapter: full`: the weights only
    become visible when the stage folder is published), st.checkpoint_dir (resumed from after a kill).
    data_dir: a folder with train.jsonl and val.jsonl (and the data stage's stats.json, read by the preflight).

    Before any weights load: the settings passed through to PEFT and TRL are checked (`recipes.defaults.check_passthrough`)
    and the preflight runs (`tunegate.preflight.run_checks`, without the micro-benchmark): its warnings are
    printed, its result written to preflight.json. Then the base model and tokenizer load, the recipe's trainer
    trains (precision by the hardware, models.train_precision: bf16 frozen base weights and bf16 autocast where bf16
    is native, fp32 otherwise; resumed from the last checkpoint in
    st.checkpoint_dir), and the weights, the logged history and the summary are written.

    Returns the summary written to train_summary.json (steps, tokens/s, wall time, final losses, trained
    parameters, the TRL arguments); None in a data-parallel worker (rank > 0), which writes nothing but the weights
    it helps gather.

    Raises:
        TunegateError: a passthrough setting is not accepted by PEFT/TRL, the preflight found errors (nothing is
            trained), or the recipe refused (e.g. QLoRA without CUDA, a NaN loss).
    """
    import torch

    from tunegate.data.format import stop_token_ids
    from tunegate.models import (
        VOCAB_RECORD,
        describe_precision,
        load_tokenizer,
        resolve_base_model,
        vocabulary_record,
        write_stop_tokens,
    )

    project = st.project
    method = project.train.method
    problems = check_passthrough(project)
    if problems:
        raise TunegateError("\n".join(f"{project.source_file}: {p}" for p in problems))
    check = _preflight(project, data_dir)
    atomic_write_json(st.dir / "preflight.json", check)
    base = resolve_base_model(project.base_model)
    tokenizer = load_tokenizer(base, project.train.added_tokens)  # the data stage's (models.load_project_tokenizer)
    torch.manual_seed(project.train.seed)
    full = project.train.adapter == "full"
    precision = _precision(project)
    use_bf16 = precision["autocast"] == "bf16"
    track = common.tracker(st, project.train.budget_minutes * 60 if project.train.budget_minutes else None)
    ctx = common.Context(st, project, base, tokenizer, read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "val.jsonl"),
                         use_bf16, [track], base_weights=str(precision["base_weights"]))
    built = recipe(method).build(ctx)
    trainer = built.trainer
    if not (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)):
        use_lean_forward(trainer.model)  # PEFT's LoRA/DoRA layers, fewer operations per step (recipes.lean_adapter)
        if project.train.init_adapter is None:
            exact_dora_magnitude(trainer.model)  # a fresh DoRA adapter starts as the base model, exactly
    bar = common.console_progress(trainer)

    if full:
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
    else:
        trainable, total = trainer.model.get_nb_trainable_parameters()
    console.print(
        f"{method}: {built.info.get('train_rows', len(ctx.train_rows))} train rows"
        + (f", {built.info['train_tokens_per_epoch']} tokens per epoch" if "train_tokens_per_epoch" in built.info else "")
        + f"; {'full fine-tune' if full else 'adapter'}: {trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M; "
        f"precision: {describe_precision(precision, not full)} ({precision['reason']})"
    )
    ckpt_dir = st.checkpoint_dir
    resume = any(ckpt_dir.glob("checkpoint-*"))
    if resume:
        console.print(f"resuming from the last checkpoint in {ckpt_dir}")
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    after = built.after_train(trainer) if built.after_train else {}

    # The stage's partial folder: the weights become visible only when the whole stage succeeds.
    out = st.partial_dir / ("model" if full else "adapter")
    if trainer.args.world_size > 1:
        # Every process takes part (FSDP/DeepSpeed gather sharded weights); the main process writes.
        trainer.save_model(str(out))
        if not trainer.is_world_process_zero():
            return None  # a data-parallel worker: rank 0 writes the rest (tunegate.pipeline)
        shutil.rmtree(out / "ref", ignore_errors=True)  # TRL's frozen reference copy of an init adapter
    elif full:
        trainer.model.save_pretrained(out, safe_serialization=True)
    else:  # only the trained adapter: DPO/KTO/GRPO from an init adapter also hold a frozen `ref` copy
        # Added tokens: their rows are in the adapter (trainable tokens); PEFT's "auto" would add the whole resized
        # embedding and output layer, which the loader rebuilds from the base (models.fit_to_adapter).
        trainer.model.save_pretrained(out, selected_adapters=["default"],
                                      **({"save_embedding_layers": False} if project.train.added_tokens else {}))
    tokenizer.save_pretrained(out)
    if built.save is not None:  # the recipe's own files (classify: its labels and abstain threshold)
        built.save(out)
    # The vocabulary it trained with: a loader grows the base model's embedding to it before loading the adapter
    vocab = getattr(trainer.model, "tunegate_vocabulary", None)
    if vocab is not None:
        vocab = vocabulary_record(tokenizer, vocab["base_vocab_size"], vocab["vocab_size"], project.train.added_tokens)
        atomic_write_json(out / VOCAB_RECORD, vocab)
    # generation_config.json: eos and end of turn, so the files stop at the end of a turn wherever they are served
    write_stop_tokens(out, stop_token_ids(tokenizer), tokenizer.pad_token_id, source=base)

    history = trainer.state.log_history
    atomic_write_jsonl(st.dir / "metrics.jsonl", history)
    common.plot_loss(history, st.dir / "loss.png", PLOTTED.get(method, ()))
    state = trainer.state
    tokens_this_session = state.num_input_tokens_seen - track.start_tokens
    summary: dict[str, Any] = {
        "method": method,
        "adapter": adapter_kind(project),
        "init_adapter": str(project.train.init_adapter) if project.train.init_adapter else None,
        "train_rows": len(ctx.train_rows),
        "val_rows": len(ctx.val_rows),
        **built.info,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "stopped_by_budget": state.global_step < state.max_steps,
        "epochs_seen": round(state.epoch or 0.0, 3),
        "tokens_seen": state.num_input_tokens_seen,  # non-padding input tokens, all sessions
        "train_wall_s": round(train_s, 1),
        "train_tokens_per_s": round(tokens_this_session / train_s, 1) if train_s > 0 and tokens_this_session else None,
        "resumed_from_step": track.start_step,
        "final_train_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
        "final_eval_loss": next((r["eval_loss"] for r in reversed(history) if "eval_loss" in r), None),
        "precision": describe_precision(precision, not full),
        "precision_choice": precision,  # models.train_precision: what the hardware decided, and why
        "world_size": trainer.args.world_size,  # data-parallel processes (torchrun / accelerate launch)
        "trainable_params": trainable,
        "total_params": total,
        "lora": None if full else _trained_lora(trainer.model),
        "vocab_size": vocab["vocab_size"] if vocab else None,  # embedding rows: the base's plus the added tokens'
        "added_tokens": vocab["added_tokens"] if vocab else {},  # train.added_tokens -> token id
        "trl": {k: v for k, v in built.trl_kwargs.items() if k != "output_dir"},
        **after,
    }
    atomic_write_json(st.dir / "train_summary.json", summary)
    console.print(
        f"trained {state.global_step} steps in {train_s:.0f} s"
        + (f", {summary['train_tokens_per_s']} tokens/s" if summary["train_tokens_per_s"] else "")
        + f"; final loss {summary['final_train_loss']}"
    )
    return summary
