"""Scale-out: the same train stage across processes and machines, launched with torchrun or accelerate.

`tunegate train` is launch-aware (tunegate.pipeline.run_stage): under torchrun / `accelerate launch` every
process trains its shard of each batch (transformers' Trainer wraps the model in DDP, FSDP or DeepSpeed as
the accelerate config says); rank 0 alone writes the checkpoints, the adapter and the manifest, and the
other ranks work in scratch folders that are removed afterwards. Only the train stage is multi-process: run
`tunegate run PROJECT --until audit` first.

`launch_config(kind, processes)` writes an accelerate config from the ones TRL ships (trl/accelerate_configs,
kept in step with accelerate by TRL's maintainers), with the process count set:

    cpu      MULTI_CPU data parallel over gloo (what the test suite runs with 2 processes)
    ddp      MULTI_GPU data parallel (DDP), bf16
    fsdp     FSDP2, transformer-block wrapping, full state dict on save (PEFT adapters save as usual)
    zero2    DeepSpeed ZeRO-2 (optimizer and gradient sharding); needs `pip install deepspeed`
    zero3    DeepSpeed ZeRO-3 (parameters sharded too; 16-bit model saved); needs `pip install deepspeed`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunegate import TunegateError

TRL_CONFIGS = {"ddp": "multi_gpu.yaml", "fsdp": "fsdp2.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml", "cpu": "multi_gpu.yaml"}


def launch_config(kind: str, processes: int, machines: int = 1) -> dict[str, Any]:
    """An accelerate config (dict) for `kind` with `processes` processes in all over `machines` machines.

    Raises TunegateError for an unknown kind or a process count that does not split over the machines.
    """
    import importlib.resources

    import yaml

    if kind not in TRL_CONFIGS:
        raise TunegateError(f"unknown launch kind {kind!r}; kinds: {', '.join(TRL_CONFIGS)}")
    if processes < 1 or machines < 1 or processes % machines:
        raise TunegateError(f"--processes {processes} must be a positive multiple of --machines {machines}")
    text = (importlib.resources.files("trl") / "accelerate_configs" / TRL_CONFIGS[kind]).read_text()
    cfg = yaml.safe_load(text)
    cfg.update(num_processes=processes, num_machines=machines)
    if kind == "cpu":
        cfg.update(distributed_type="MULTI_CPU", use_cpu=True, mixed_precision="no")
        cfg.pop("gpu_ids", None)
    return cfg


def launch_command(config_file: Path, project_file: Path) -> str:
    """The command that trains `project_file` with `config_file` (after `tunegate run --until audit`)."""
    return f"accelerate launch --config_file {config_file} -m tunegate.cli train {project_file}"
