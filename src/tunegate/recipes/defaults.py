"""tunegate's TRL and PEFT defaults, and the arguments the trainer and the adapter are built with.

What a run trains with is tunegate's defaults for the method, then the project's settings on top:
`lora_kwargs` (peft.LoraConfig: DEFAULT_LORA, then `train.lora`) and `trl_kwargs` (the method's TRL config,
`trl_config_class`: the defaults below, then `train.trl`). "What learning rate does SFT use?" is answered
here (`_DEFAULT_LR`). `check_passthrough` builds both config objects from a project without loading a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunegate.config import Project
from tunegate import tracking
from tunegate.models import bf16_supported, cuda_available

DEFAULT_LORA: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    # No dropout by default: on a CPU, LoRA dropout made each step 1.6x slower (measured, 2 cores, bf16).
    "lora_dropout": 0.0,
    "use_dora": True,
    "target_modules": "all-linear",
    "task_type": "CAUSAL_LM",
}


def lora_kwargs(project: Project) -> dict[str, Any]:
    """peft.LoraConfig arguments: DEFAULT_LORA, DoRA off for `adapter: lora | qlora`, then `train.lora`. Method
    classify trains a sequence-classification head: task_type SEQ_CLS (PEFT then trains and saves the `score`
    layer whole, as a module to save)."""
    adapter_default = {"use_dora": project.train.adapter == "dora"}
    if project.train.method == "classify":
        adapter_default["task_type"] = "SEQ_CLS"
    return {**DEFAULT_LORA, **adapter_default, **project.train.lora}


def adapter_kind(project: Project) -> str:
    """The adapter that will actually be trained: "full", "qlora", "dora" or "lora".

    `train.adapter` names the default, but `train.lora.use_dora` decides for LoRA/DoRA (`adapter: dora` with
    `lora: {use_dora: false}` trains plain LoRA), so messages and manifests name what peft builds.
    """
    adapter = project.train.adapter
    if adapter in ("full", "qlora"):
        return adapter
    return "dora" if lora_kwargs(project).get("use_dora") else "lora"


# Learning rates by method and parameterisation: adapters train a few new weights and take ~10-100x the rate
# a full fine-tune takes (Hu et al. 2021; TRL's examples). Preference and RL objectives move the policy less.
_DEFAULT_LR = {
    ("sft", "adapter"): 2e-4, ("sft", "full"): 2e-5,
    ("cpt", "adapter"): 1e-4, ("cpt", "full"): 1e-5,
    ("distillation", "adapter"): 2e-4, ("distillation", "full"): 2e-5,
    ("dpo", "adapter"): 5e-5, ("dpo", "full"): 5e-7,
    ("kto", "adapter"): 5e-5, ("kto", "full"): 5e-7,
    ("orpo", "adapter"): 8e-5, ("orpo", "full"): 8e-6,
    ("grpo", "adapter"): 1e-5, ("grpo", "full"): 1e-6,
    ("classify", "adapter"): 2e-4,  # the new score head trains with the adapter
}


def trl_config_class(project: Project):
    """The TRL config class `train.trl` is passed to for this method (classify: transformers' TrainingArguments,
    TRL has no classification trainer)."""
    method = project.train.method
    if method == "classify":
        from transformers import TrainingArguments

        return TrainingArguments
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig
    if method == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    if method == "distillation" and project.train.distillation.mode == "logits":
        from trl import DistillationConfig

        return DistillationConfig
    from trl import SFTConfig

    return SFTConfig


def trl_kwargs(project: Project, output_dir: Path, device_bf16: bool) -> dict[str, Any]:
    """The TRL config arguments for `train.method`: tunegate's defaults, then the project's `train.trl` on top."""
    method = project.train.method
    defaults = _trainer_defaults(project, output_dir, device_bf16)
    defaults["learning_rate"] = _DEFAULT_LR[(method, "full" if project.train.adapter == "full" else "adapter")]
    if method in ("dpo", "kto", "orpo"):
        # TRL tokenizes pairs itself: its max_length cuts prompt+answer (the data stage already applied the
        # over-length policy with data.max_length, so nothing is cut here).
        defaults.update(max_length=project.data.max_length, logging_steps=1, per_device_train_batch_size=4)
    if method == "grpo":
        defaults.pop("max_length")
        n_gen = project.train.trl.get("num_generations", 4)
        # a step holds whole groups: the batch defaults to one group (TRL requires a multiple of num_generations)
        defaults.update(num_generations=n_gen, max_completion_length=64, per_device_train_batch_size=n_gen,
                        logging_steps=1, temperature=1.0, beta=0.0)
    if method == "classify":
        defaults.pop("max_length")  # TrainingArguments has none: recipes.classify cuts prompts to data.max_length
    if method == "distillation" and project.train.distillation.mode == "logits":
        defaults.pop("max_length")  # DistillationConfig has no max_length: the data stage already fit the rows
        defaults.update(max_completion_length=project.train.distillation.max_new_tokens)
    return {**defaults, **project.train.trl}


def _trainer_defaults(project: Project, output_dir: Path, device_bf16: bool) -> dict[str, Any]:
    """tunegate's defaults for every TRL config (a transformers TrainingArguments underneath)."""
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": 2e-4,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "logging_steps": 5,
        "save_steps": 50,
        "save_total_limit": 2,
        # report_to "mlflow" / "trackio" inside a tracked stage, with Trackio's project and run name (tunegate.tracking)
        **tracking.trainer_settings(project),
        "seed": project.train.seed,
        "bf16": device_bf16,
        "use_cpu": not cuda_available(),
        # TRL 1.x turns activation checkpointing on by default; small models on CPU train ~1.3x faster without.
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "max_length": None,  # tunegate tokenizes and applies the over-length policy itself
        "disable_tqdm": False,
    }
    return defaults


def trains_on_tokenized_rows(project: Project) -> bool:
    """Whether `train.method` runs tunegate's SFT trainer (recipes.sft) on rows tunegate tokenized itself, with its
    own loss mask and loss: SFT, CPT (texts packed into blocks by recipes.cpt) and sequence-level distillation."""
    method = project.train.method
    return method in ("sft", "cpt") or (method == "distillation" and project.train.distillation.mode == "sequence")


def unsupported_passthrough(project: Project) -> list[str]:
    """Pass-through settings TRL/PEFT accept but tunegate's own data path or loss cannot honour: each one would
    crash mid-run, after the model loaded, or silently train something else than asked. One line per setting set,
    naming it and why (`check_passthrough` adds them to its problems: `tunegate validate`, the preflight and every
    training refuse them).

    For the recipes on tunegate-tokenized rows (`trains_on_tokenized_rows`; TRL 1.x SFTTrainer):
      packing, eval_packing  TRL packs rows into one padding-free sequence: tunegate's loss reads the attention
                             mask packing drops (KeyError mid-run), and outside flash-attention kernels packed
                             rows attend to each other. Rows are fit by data.max_length / data.overlength; the cpt
                             method packs texts itself.
      padding_free           the same flattening without packing.
      max_length             below data.max_length: TRL cuts rows the over-length policy already fit, dropping
                             the supervised end-of-turn token (TRL's own truncation, keep_start).
      assistant_only_loss    TRL builds that mask from conversational rows; it gets tokenized rows and stops
                             with ValueError. tunegate's labels already supervise only assistant tokens.
      loss_type (not nll), label_smoothing_factor > 0
                             tunegate's loss (recipes.sft.supervised_only_loss) replaces TRL's: ignored silently.
    For every method:
      train.lora.trainable_token_indices, or modules_to_save naming embed_tokens / lm_head, with train.added_tokens
                             tunegate sets trainable_token_indices to the added tokens' rows; PEFT refuses a layer
                             both trained whole and by rows.
      model_init_kwargs      tunegate loads the model itself (train.adapter) and hands TRL the loaded model, which
                             TRL then leaves as it is: the kwargs would be ignored.
      report_to, run_name, project, with `tracking:` set
                             tunegate names the stage's MLflow / Trackio run itself (tunegate.tracking).
      train.lora.target_modules selecting lm_head
                             TRL's SFT, DPO, KTO, GRPO and distillation trainers stop with ValueError (they read
                             lm_head.weight directly); ORPO's does not.
    Settings that are harmless here (completion_only_loss, dataset_text_field, dataset_kwargs: the rows carry
    input_ids and labels, so TRL neither renders nor masks them) are not refused.
    """
    trl = project.train.trl
    problems = []

    def refuse(key: str, why: str) -> None:
        problems.append(f"train.trl.{key}: {trl[key]!r} is not supported by tunegate: {why}")

    if trl.get("model_init_kwargs"):
        refuse("model_init_kwargs", "tunegate loads the base model itself (train.adapter; TRL ignores these kwargs "
                                    "for a loaded model); remove it")
    if project.tracking.mlflow is not None or project.tracking.trackio is not None:
        for key in ("report_to", "run_name", "project"):
            if key in trl:
                refuse(key, "with tracking: set, tunegate points the trainer's logging at the stage's own run "
                            "(tunegate.tracking); another value would log elsewhere. Remove it")
    if project.train.adapter != "full" and project.train.method != "orpo" and _targets_lm_head(lora_kwargs(project)):
        problems.append("train.lora.target_modules: an adapter on lm_head is not supported: TRL's "
                        f"{project.train.method.upper()} trainer refuses it (it computes log-probabilities from "
                        "lm_head.weight directly); remove lm_head (all-linear leaves it out)")
    lora = project.train.lora
    if project.train.added_tokens and lora.get("trainable_token_indices") is not None:
        problems.append("train.lora.trainable_token_indices: set by train.added_tokens (the rows of the added tokens "
                        "train); remove it")
    embeddings = sorted({"embed_tokens", "lm_head"} & set(lora.get("modules_to_save") or ()))
    if project.train.added_tokens and embeddings:
        problems.append(f"train.lora.modules_to_save: {embeddings} with train.added_tokens: PEFT trains either the whole "
                        "layer or the added tokens' rows, not both; remove them (the added tokens' rows train)")
    if project.train.method == "classify" and lora.get("task_type", "SEQ_CLS") != "SEQ_CLS":
        problems.append(f"train.lora.task_type: {lora['task_type']!r} with method classify; rule: the classification "
                        "head trains with task_type SEQ_CLS (set by tunegate); remove it")
    if not trains_on_tokenized_rows(project):
        return problems
    packs = ("TRL would pack tunegate's tokenized rows into one padding-free sequence: tunegate's loss needs the "
             "attention mask packing drops, and packed rows would attend to each other; remove it (data.max_length "
             "and data.overlength fit rows; `method: cpt` packs raw text itself)")
    for key in ("packing", "eval_packing"):
        if trl.get(key) is True:
            refuse(key, packs)
    if trl.get("padding_free") is True:
        refuse("padding_free", "TRL would flatten each batch into one sequence without an attention mask, which "
                               "tunegate's loss reads; rows would attend to each other; remove it")
    max_length = trl.get("max_length")
    if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length < project.data.max_length:
        refuse("max_length", f"below data.max_length {project.data.max_length}, TRL would cut rows the data stage "
                             f"already fit (data.overlength {project.data.overlength}), dropping their supervised "
                             "end-of-turn token; set data.max_length instead")
    if trl.get("assistant_only_loss") is True:
        refuse("assistant_only_loss", "TRL builds that mask from conversational rows and stops on tunegate's tokenized "
                                      "rows; tunegate's labels already supervise only the assistant's tokens; remove it")
    if trl.get("loss_type", "nll") not in ("nll", None):
        refuse("loss_type", "tunegate's loss (supervised tokens' cross-entropy) replaces TRL's, so it would be "
                            "ignored; remove it")
    smoothing = trl.get("label_smoothing_factor", 0)
    if isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool) and smoothing > 0:
        refuse("label_smoothing_factor", "tunegate's loss (supervised tokens' cross-entropy) replaces the trainer's, "
                                         "so it would be ignored; remove it")
    return problems


def _targets_lm_head(lora: dict[str, Any]) -> bool:
    """Whether LoRA `target_modules` selects the `lm_head` module, by PEFT's rules: a list names a module or a
    suffix of its path, a string is a full-match regex ("all-linear" excludes the output layer)."""
    import re

    targets = lora.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        try:
            return re.fullmatch(targets, "lm_head") is not None
        except re.error:
            return False  # peft.LoraConfig / the preflight report a bad pattern
    return isinstance(targets, (list, tuple, set)) and "lm_head" in targets


def check_passthrough(project: Project) -> list[str]:
    """Build peft.LoraConfig and the method's TRL config (SFTConfig, DPOConfig, ...) from the project, without
    loading a model, and refuse the settings tunegate cannot honour (`unsupported_passthrough`).

    Returns a list of problems, each naming the key path; empty when both accept their settings.
    """
    import tempfile

    problems = unsupported_passthrough(project)
    if project.train.adapter != "full":
        try:
            from peft import LoraConfig

            LoraConfig(**lora_kwargs(project))
        except (TypeError, ValueError) as exc:
            problems.append(f"train.lora: peft.LoraConfig refused it: {exc}")
    config_cls = trl_config_class(project)
    try:
        problems += _check_types(config_cls, project.train.trl)
        with tempfile.TemporaryDirectory() as tmp:
            config_cls(**trl_kwargs(project, Path(tmp), bf16_supported()))
    except (TypeError, ValueError) as exc:
        problems.append(f"train.trl: trl.{config_cls.__name__} refused it: {exc}")
    return problems


def _check_types(config_cls, values: dict[str, Any]) -> list[str]:
    """TrainingArguments does not check types: `num_train_epochs: one` fails mid-run. Check numbers and flags here."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    problems = []
    for key, value in values.items():
        default = defaults.get(key, dataclasses.MISSING)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            problems.append(f"train.trl.{key}: expected {type(default).__name__} like its default {default!r}, got {value!r}")
    return problems
