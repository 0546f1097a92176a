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
    """peft.LoraConfig arguments: DEFAULT_LORA, DoRA off for `adapter: lora | qlora`, then `train.lora`."""
    adapter_default = {"use_dora": project.train.adapter == "dora"}
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
}


def trl_config_class(project: Project):
    """The TRL config class `train.trl` is passed to for this method."""
    method = project.train.method
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
        "report_to": "none",
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


def check_passthrough(project: Project) -> list[str]:
    """Build peft.LoraConfig and the method's TRL config (SFTConfig, DPOConfig, ...) from the project, without loading a model.

    Returns a list of problems, each naming the key path; empty when both accept their settings.
    """
    import tempfile

    problems = []
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
