"""Scale-out: the train stage as a 2-process CPU (gloo) data-parallel job, and the generated launch configs."""

import json
import socket
import subprocess
import sys

import pytest
import yaml

from tunegate.config import load_project
from tunegate.core.manifest import read_manifest
from tunegate.pipeline import run_pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_data_parallel_training_writes_one_adapter(tiny_project):
    """torchrun with 2 CPU processes: each trains half of every batch; rank 0 alone writes adapter and manifest."""
    path = tiny_project / "tunegate.yaml"
    overrides = ["train.trl.max_steps=3", "train.trl.per_device_train_batch_size=2", "data.val_fraction=0.0", "train.trl.logging_steps=1"]
    run_pipeline(load_project(path, overrides), until="data")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "tunegate.cli", "train", str(path), *overrides],
        capture_output=True, text=True, timeout=600, cwd=tiny_project,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tiny_project / "runs/default"
    m = read_manifest(run_dir / "train")
    assert m.metrics["world_size"] == 2 and m.metrics["steps"] == 3
    # 2 processes x 2 rows per step x 3 steps: the run saw 12 rows, twice what one process would
    assert m.metrics["epochs_seen"] == pytest.approx(12 / m.metrics["train_rows"], abs=0.02)
    assert (run_dir / "train/adapter/adapter_model.safetensors").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no worker scratch left behind
    assert json.loads((run_dir / "train/train_summary.json").read_text())["world_size"] == 2

    # The loss is per supervised token over the global batch: 2 processes x 2 rows log what 1 process x 4 rows
    # logs on the same first 4 rows (a missing x world-size rescale would halve it).
    def first_loss(run):
        rows = [json.loads(x) for x in (tiny_project / "runs" / run / "train/metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in rows if "loss" in r)

    single = overrides[:1] + ["train.trl.per_device_train_batch_size=4", "data.val_fraction=0.0", "train.trl.logging_steps=1"]
    run_pipeline(load_project(path, single), run_id="single", until="data")
    run_pipeline(load_project(path, single), run_id="single", until="train")
    assert first_loss("default") == pytest.approx(first_loss("single"), abs=2e-3)


@pytest.mark.parametrize("kind,expected", [("cpu", "MULTI_CPU"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero3", "DEEPSPEED")])
def test_launch_configs_come_from_trl_with_the_process_count_set(tmp_path, kind, expected):
    out = tmp_path / "acc.yaml"
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "launch-config", kind, "--processes", "8", "--machines", "2",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(out.read_text())
    assert (cfg["distributed_type"], cfg["num_processes"], cfg["num_machines"]) == (expected, 8, 2)
    assert "accelerate launch --config_file" in r.stdout and "-m tunegate.cli train" in r.stdout
    if kind == "zero3":
        assert cfg["deepspeed_config"]["zero_stage"] == 3
    if kind == "fsdp":
        assert cfg["fsdp_config"]["fsdp_version"] == 2
