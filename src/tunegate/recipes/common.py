"""What every recipe shares: the policy model (adapter kind, QLoRA, a starting adapter), the TRL
arguments, the metrics/budget callback, and the loss plot."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunegate import TunegateError
from tunegate.config import Project
from tunegate.core.io import atomic_write_jsonl
from tunegate.core.console import console
from tunegate.core.stage import Stage
from tunegate.recipes.defaults import lora_kwargs, trl_kwargs


@dataclass
class Context:
    """What the train stage hands a recipe."""

    st: Stage
    project: Project
    base: Path | str  # the base model folder (or hub id)
    tokenizer: Any
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    use_bf16: bool  # bf16 autocast (TRL's bf16 argument)
    callbacks: list[Any]
    base_weights: str = "fp32"  # the frozen base weights' dtype, "bf16" or "fp32" (models.train_precision)

    def trl_args(self, evaluate: bool = True) -> dict[str, Any]:
        """`recipes.defaults.trl_kwargs` for this method, with eval settings when `evaluate` and there are validation rows."""
        kwargs = trl_kwargs(self.project, self.st.checkpoint_dir, self.use_bf16)
        kwargs.setdefault("include_num_input_tokens_seen", "non_padding")
        if evaluate and self.val_rows:
            kwargs.setdefault("eval_strategy", "steps")
            kwargs.setdefault("eval_steps", kwargs.get("save_steps", 50))
            kwargs.setdefault("per_device_eval_batch_size", kwargs["per_device_train_batch_size"])
        return kwargs


@dataclass
class Built:
    """A recipe's trainer, facts for train_summary.json, and an optional step after training."""

    trainer: Any
    info: dict[str, Any] = field(default_factory=dict)
    after_train: Callable[[Any], dict[str, Any]] | None = None  # trainer -> more facts for the summary
    trl_kwargs: dict[str, Any] = field(default_factory=dict)
    save: Callable[[Path], None] | None = None  # writes the recipe's own files into the saved adapter folder


def peft_config(project: Project, model=None, tokenizer=None):
    """The adapter to train (peft.LoraConfig), or None for `adapter: full`. With `train.added_tokens`, `model` (grown
    by `load_policy`) and `tokenizer` (with the tokens) give the new rows PEFT trains (`added_token_indices`)."""
    if project.train.adapter == "full":
        return None
    from peft import LoraConfig

    kwargs = lora_kwargs(project)
    if project.train.added_tokens:
        kwargs["trainable_token_indices"] = added_token_indices(model, [tokenizer.convert_tokens_to_ids(t) for t in project.train.added_tokens])
    return LoraConfig(**kwargs)


def added_token_indices(model, ids: list[int]) -> list[int] | dict[str, list[int]]:
    """PEFT's `trainable_token_indices` for the rows of the added tokens `ids`: only those rows train (PEFT's
    trainable tokens, saved with the adapter as a (n_added, hidden) tensor per layer), not the whole embedding
    (`modules_to_save` would save all of it). A list targets the input embedding, which a tied output layer
    follows; an untied output layer (lm_head) is named too, so the model also learns to write the new tokens and
    its rows travel with the adapter (they would otherwise stay at the resize's starting values)."""
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_out is None or emb_out.weight is emb_in.weight:
        return list(ids)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(emb_in)]: list(ids), names[id(emb_out)]: list(ids)}


def load_policy(project: Project, base: Path | str, tokenizer, base_weights: str = "fp32"):
    """The model training starts from, and the PEFT config for the trainer (None when the model already carries
    its adapter, or for a full fine-tune).

    - `base_weights` "bf16": the base model is loaded in bf16 (models.train_precision: native bf16, an adapter);
      the adapter PEFT adds on top stays fp32 (autocast_adapter_dtype).

    - `adapter: qlora`: the base loaded in 4-bit NF4 with double quantisation (Dettmers et al. 2023) through
      bitsandbytes. Raises TunegateError without a CUDA GPU or without bitsandbytes: its 4-bit kernels are CUDA's.
    - `train.init_adapter`: that adapter, loaded trainable; TRL's DPO/KTO/GRPO then keep a frozen copy of it as
      the reference (`ref` adapter), so at step 0 the policy equals the reference (case C19).
    - `train.added_tokens` (`tokenizer` holds them): the embeddings grow to len(tokenizer) rows
      (`models.fit_embeddings`) and the LoRA config trains the new rows (`added_token_indices`); a full
      fine-tune trains them with every other weight. An init adapter must have been trained with the same added
      tokens (its vocabulary record). The model carries `tunegate_vocabulary` ({base_vocab_size, vocab_size,
      added_tokens}: models.fit_embeddings) for the adapter's record (recipes.run).
    """
    import torch

    from tunegate.models import fit_embeddings, fit_to_adapter, load_model, quiet_loading, read_vocabulary_record

    t = project.train
    if t.adapter == "qlora":
        if not torch.cuda.is_available():
            raise TunegateError(
                "train.adapter qlora: QLoRA loads the base in 4-bit with bitsandbytes, whose 4-bit kernels need a "
                "CUDA GPU, and this machine has none. Use `adapter: dora` (or lora): the base model in 16/32-bit "
                "with the same adapter on top."
            )
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TunegateError("train.adapter qlora needs bitsandbytes: pip install bitsandbytes") from None
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        quiet_loading()
        model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=quant, dtype=torch.bfloat16)
        if t.init_adapter is None:  # the embedding is not quantised: it grows before the k-bit preparation
            fit_embeddings(model, tokenizer, t.added_tokens)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_model(base, dtype=torch.bfloat16 if base_weights == "bf16" and t.adapter != "full" else torch.float32)
    added = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in t.added_tokens}
    if t.init_adapter is not None:
        from peft import PeftModel

        if t.adapter == "full":
            raise TunegateError("train.init_adapter with adapter full: merge the adapter first (`tunegate export`)")
        if not (t.init_adapter / "adapter_config.json").is_file():
            raise TunegateError(f"{t.init_adapter}: train.init_adapter has no adapter_config.json (a PEFT adapter folder)")
        recorded = (read_vocabulary_record(t.init_adapter) or {}).get("added_tokens", {})
        if recorded != added:
            raise TunegateError(f"train.init_adapter {t.init_adapter}: trained with added tokens {recorded or 'none'}, "
                                f"but train.added_tokens gives {added or 'none'}; set train.added_tokens to the init adapter's")
        fit_embeddings(model, tokenizer, ())  # the base's rows, recorded; the adapter's record grows them
        fit_to_adapter(model, t.init_adapter)
        return PeftModel.from_pretrained(model, str(t.init_adapter), is_trainable=True), None
    fit_embeddings(model, tokenizer, t.added_tokens)
    return model, peft_config(project, model, tokenizer)


def tracker(st: Stage, budget_s: float | None):
    """A TrainerCallback that writes the log history after every log (atomically), stops on a NaN loss,
    and stops (saving) at the time budget."""
    from transformers import TrainerCallback

    metrics_path = st.dir / "metrics.jsonl"

    class MetricsAndBudget(TrainerCallback):
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
            elapsed = time.perf_counter() - self.t0
            if rows and state.num_input_tokens_seen and elapsed > 0:  # throughput since this session started
                rows[-1]["tokens_per_s"] = round((state.num_input_tokens_seen - self.start_tokens) / elapsed, 1)
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


# What the training bar shows after each log: (logged key, slot on the bar, format); a later value replaces its slot.
BAR_FIELDS = (("loss", "loss", "loss {:.4g}"), ("train_loss", "loss", "loss {:.4g}"),
              ("eval_loss", "eval_loss", "eval_loss {:.4g}"), ("tokens_per_s", "tokens_per_s", "{:.0f} tok/s"))


def console_progress(trainer, desc: str = "training"):
    """Put the trainer's progress on tunegate's console: removes transformers' ProgressCallback and PrinterCallback
    (tqdm bars, raw `{'loss': ...}` dicts) and adds a callback that drives one bar (core.console.StepBar):
    step/total, ETA, and after each log the loss, eval loss and tokens/s. Every logged dict also goes to the run's
    log file as one line (`step 3/8 loss=2.31 learning_rate=0.0002 ...`, core.console.log_only).

    Returns the callback; call its `close()` when training ends or fails (the bar stays up otherwise).
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tunegate.core.console import StepBar, log_only

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)

    class ConsoleProgress(TrainerCallback):
        def __init__(self):
            self.bar = StepBar(desc)
            self.last: dict[str, str] = {}  # the latest of each shown series: an eval log keeps the train loss

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:  # data-parallel workers show nothing (update/close are no-ops then)
                self.bar.start(state.max_steps, completed=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            row = state.log_history[-1] if state.log_history else dict(logs or {})  # with the tracker's tokens_per_s
            for key, slot, fmt in BAR_FIELDS:
                if isinstance(row.get(key), (int, float)):
                    self.last[slot] = fmt.format(row[key])
            self.bar.update(state.global_step, info=", ".join(self.last.values()))
            log_only(f"step {state.global_step}/{state.max_steps} " + " ".join(f"{k}={_short(v)}" for k, v in row.items() if k != "step"))

        def on_train_end(self, args, state, control, **kw):
            self.close()

        def close(self) -> None:
            self.bar.close()

    callback = ConsoleProgress()
    trainer.add_callback(callback)
    return callback


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot_loss(history: list[dict[str, Any]], path: Path, extra: tuple[str, ...] = ()) -> None:
    """Train and validation loss against step (plus any `extra` logged series, e.g. rewards/margins)."""
    from tunegate.report.render import pyplot

    plt = pyplot()

    series = [("loss", "train loss", "-"), ("eval_loss", "val loss", "o-")] + [(k, k, "-") for k in extra]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    for key, label, style in series:
        pts = [(r["step"], r[key]) for r in history if key in r and r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
