"""Runs the stages in order, skipping finished ones whose inputs and config are unchanged.

A stage reads files and writes files into `runs/<run-id>/<stage>/`, and is finished exactly when its
`manifest.json` exists (written last, atomically). While it runs it writes into `.<stage>.partial/`, which
replaces the finished folder only on success: a stage that fails on bad input or is killed midway damages
nothing already written, leaves no manifest, and is redone. The train stage keeps its checkpoints in
`.train.checkpoints/` across an interruption and resumes from the last one when its fingerprint is unchanged.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from tunegate import EXIT_AUDIT_NO_TRAIN, TunegateError
from tunegate.config import Project
from tunegate.manifest import (
    Manifest,
    fingerprint,
    hash_outputs,
    manifest_hash,
    read_manifest,
    sha256_file,
    verify_outputs,
    write_manifest,
)

console = Console(stderr=True)

STAGES = ("data", "audit", "train", "eval", "report")
UPSTREAM = {"data": (), "audit": ("data",), "train": ("data",), "eval": ("data", "train"), "report": ("data", "train", "eval")}
CONFIG_SECTIONS = {
    "data": ("base_model", "data"),
    "audit": ("base_model", "audit", "eval", "train"),  # eval: the metric and bar; train: the probe's settings
    "train": ("base_model", "train"),
    "eval": ("base_model", "eval"),
    "report": ("name",),
}


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    verdict: str | None = None
    inputs: dict[str, Path] = field(default_factory=dict)  # files read that were not known before the stage ran


@dataclass
class Stage:
    project: Project
    run_dir: Path
    name: str
    worker_dir: Path | None = None  # a data-parallel worker (rank > 0) writes here instead; removed afterwards

    @property
    def dir(self) -> Path:
        """Where the stage writes while it runs; renamed to `final_dir` when it succeeds."""
        return self.worker_dir or self.partial_dir

    @property
    def partial_dir(self) -> Path:
        """Rank 0's writing folder, also for a data-parallel worker (which writes only its scratch `dir`)."""
        return self.run_dir / f".{self.name}.partial"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def checkpoint_dir(self) -> Path:
        """Survives an interruption (resume); removed when the stage succeeds."""
        return self.run_dir / f".{self.name}.checkpoints"

    def upstream_dir(self, name: str) -> Path:
        return self.run_dir / name


def run_dir_for(project: Project, run_id: str) -> Path:
    return project.runs_dir / run_id


# The eval settings the audit reads: changing suites, the judge, the server or the baseline must not rerun it.
AUDIT_EVAL_KEYS = ("metrics", "json_schema", "max_new_tokens", "batch_size", "bootstrap_samples", "seed", "gate")
# The train settings the audit's probe does not train with (it drops these and sets its own steps, logging and
# budget; stages/audit._train_probe): they only scale the audit's projection of a full run's cost, so changing them
# must not rerun a 15-minute audit. The projection records the settings it assumed (audit.json probe.full_run_assumes).
AUDIT_IGNORED_TRL_KEYS = ("max_steps", "num_train_epochs", "eval_steps", "save_steps", "logging_steps")


def _config_for(project: Project, stage: str) -> dict[str, Any]:
    dumped = project.model_dump(mode="json")
    config = {k: dumped[k] for k in CONFIG_SECTIONS[stage]}
    if stage == "audit":
        config["eval"] = {k: v for k, v in config["eval"].items() if k in AUDIT_EVAL_KEYS}
        train = {k: v for k, v in config["train"].items() if k != "budget_minutes"}
        train["trl"] = {k: v for k, v in train["trl"].items() if k not in AUDIT_IGNORED_TRL_KEYS}
        config["train"] = train
    return config


def stage_inputs(project: Project, stage: str) -> dict[str, Path]:
    """Files outside the run folder that a stage reads (their sha256 goes into its fingerprint)."""
    if stage == "data":
        from tunegate.data.records import source_files

        files = {f"source{i}" + (f".{j}" if j else ""): f for i, s in enumerate(project.data.sources) for j, f in enumerate(source_files(s))}
        files["golden"] = project.data.golden.path
        return files
    if stage == "train":
        t, files = project.train, {}
        if t.init_adapter is not None:
            files["init_adapter"] = t.init_adapter / "adapter_model.safetensors"
        if t.grpo is not None:
            if t.grpo.json_schema is not None:
                files["grpo_json_schema"] = t.grpo.json_schema
            if ":" in t.grpo.verifier or t.grpo.verifier.endswith(".py"):  # a verifier file of the project
                files["grpo_verifier"] = project.root / t.grpo.verifier.split(":")[0]
        if t.distillation is not None and Path(t.distillation.teacher).is_dir():
            teacher = Path(t.distillation.teacher)  # its weights: a retrained teacher reruns the stage
            for i, w in enumerate(sorted(teacher.glob("*.safetensors")) or [teacher / "config.json"]):
                files[f"teacher{i}"] = w
        return files
    if stage == "eval":
        files = project.eval.suites.files() if project.eval.suites else {}
        judge = project.eval.judge
        if judge and judge.calibration_file.is_file():  # a new calibration changes what the gate may count
            files["judge_calibration"] = judge.calibration_file
        if project.eval.baseline == "production":  # a newly promoted version is a new baseline
            from tunegate.registry import production

            entry = production(project.registry, project.name)
            if entry is not None:
                files["production_adapter"] = Path(entry["adapter_dir"]) / "adapter_model.safetensors"
        return files
    return {}


def run_stage(
    project: Project,
    run_dir: Path,
    stage: str,
    body: Callable[[Stage], StageResult],
    force: bool = False,
    overrides: list[str] | None = None,
) -> Manifest:
    """Run one stage unless an identical finished run exists. Returns its manifest.

    overrides: decisions a person took against a gate's advice (e.g. training after the audit said NO_TRAIN);
    recorded in the manifest, not part of the fingerprint.
    """
    rank, world = distributed_rank()
    if world > 1 and stage != "train":
        raise TunegateError(f"stage {stage} runs in one process; only `tunegate train` is launched with torchrun/accelerate "
                            f"(run `tunegate run --until audit` first)")
    st = Stage(project, run_dir, stage)
    upstream = {}
    for up in UPSTREAM[stage]:
        up_manifest = read_manifest(st.upstream_dir(up))
        if up_manifest is None:
            raise TunegateError(f"stage {stage} needs stage {up} first: no {st.upstream_dir(up)}/manifest.json")
        upstream[up] = manifest_hash(st.upstream_dir(up))
        # The upstream stages must belong together: `eval` must not score an adapter trained on older data.
        for up2, digest in up_manifest.upstream.items():
            if (st.upstream_dir(up2) / "manifest.json").is_file() and manifest_hash(st.upstream_dir(up2)) != digest:
                raise TunegateError(
                    f"{st.upstream_dir(up)}: stage {up} was built from an older {up2} stage than the one in {run_dir}; "
                    f"rule: a run's stages must come from one chain. Run `tunegate run` (or `tunegate {up}`) first."
                )
    input_files = stage_inputs(project, stage)
    for path in input_files.values():
        if not Path(path).is_file():
            raise TunegateError(f"{path}: input file not found (stage {stage})")
    named_inputs = {name: sha256_file(p) for name, p in input_files.items()}
    inputs = {str(p): named_inputs[name] for name, p in input_files.items()}
    config = _config_for(project, stage)
    # Paths inside the project folder enter the fingerprint relative to it, so a moved or copied project
    # (with its runs/) is still recognised as finished.
    fp = fingerprint(stage, _relative_to(config, project.root), named_inputs, upstream)

    old = read_manifest(st.final_dir)
    if old is not None and old.fingerprint == fp and not force:
        broken = verify_outputs(st.final_dir, old)
        if not broken:
            console.print(f"[dim]- {stage}: unchanged since {old.started_at}, skipped[/dim]")
            return old
        console.print(f"[yellow]- {stage}: outputs changed since the manifest ({', '.join(broken)}); rerunning[/yellow]")

    if old is not None and old.fingerprint != fp:
        changed = [name for name, a, b in (("config", old.config, config), ("input files", {k: old.inputs.get(k) for k in inputs}, inputs),
                                           ("upstream stages", old.upstream, upstream)) if a != b]
        console.print(f"[dim]- {stage}: rerunning, changed since the last run: {', '.join(changed) or 'tunegate version'}[/dim]")
    if rank > 0:  # data-parallel training: rank 0 owns the stage folder, checkpoints and manifest
        return _run_as_worker(st, body, rank)
    shutil.rmtree(st.dir, ignore_errors=True)
    st.dir.mkdir(parents=True)
    if stage == "train":
        _prepare_checkpoints(st.checkpoint_dir, fp)
    console.rule(f"[bold]{stage}")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    _wait_for_everyone(world)  # workers start once the checkpoint folder is settled
    t0 = time.perf_counter()
    result = body(st)
    wall = time.perf_counter() - t0
    for path in result.inputs.values():
        inputs[str(path)] = sha256_file(path)
    # Swap the finished folder into place, then write the manifest last.
    trash = st.run_dir / f".{stage}.old"
    shutil.rmtree(trash, ignore_errors=True)
    if st.final_dir.exists():
        st.final_dir.rename(trash)
    st.dir.rename(st.final_dir)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(st.checkpoint_dir, ignore_errors=True)
    manifest = Manifest(
        stage=stage,
        fingerprint=fp,
        config=config,
        inputs=inputs,
        outputs=hash_outputs(st.final_dir),
        upstream=upstream,
        started_at=started,
        wall_s=round(wall, 2),
        metrics=result.metrics,
        verdict=result.verdict,
        overrides=overrides or [],
    )
    write_manifest(st.final_dir, manifest)
    console.print(f"[green]- {stage}: done in {wall:.1f} s[/green]" + (f" verdict {result.verdict}" if result.verdict else ""))
    _wait_for_everyone(world)  # workers read the manifest once it exists
    return manifest


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun / accelerate environment; (0, 1) in a plain process."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _wait_for_everyone(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # initialises the process group (gloo on CPU, NCCL on GPUs)


def _run_as_worker(st: Stage, body: Callable[[Stage], StageResult], rank: int) -> Manifest:
    """A data-parallel worker (rank > 0) of the train stage: it trains its shard of every batch in a scratch
    folder that is removed afterwards; rank 0 writes the adapter and the manifest, which the worker returns."""
    world = distributed_rank()[1]
    scratch = st.run_dir / f".{st.name}.rank{rank}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    worker = Stage(st.project, st.run_dir, st.name, worker_dir=scratch)
    _wait_for_everyone(world)
    try:
        body(worker)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _wait_for_everyone(world)
    manifest = read_manifest(st.final_dir)
    if manifest is None:
        raise TunegateError(f"rank {rank}: rank 0 wrote no manifest in {st.final_dir}")
    return manifest


def _relative_to(obj: Any, root: Path) -> Any:
    import json

    prefix = json.dumps(str(root) + "/")[1:-1]
    return json.loads(json.dumps(obj, sort_keys=True, default=str).replace(prefix, ""))


def _prepare_checkpoints(ckpt_dir: Path, fp: str) -> None:
    """Keep checkpoints only if they were written by a run with the same fingerprint."""
    fp_file = ckpt_dir / ".fingerprint"
    if ckpt_dir.exists() and not (fp_file.is_file() and fp_file.read_text().strip() == fp):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fp + "\n")


class AuditSaysNoTrain(TunegateError):
    """The audit measured that training does not pay; `tunegate run` stops before the train stage."""

    exit_code = EXIT_AUDIT_NO_TRAIN


def stage_bodies() -> dict[str, Callable[[Stage], StageResult]]:
    from tunegate.report import build as report_stage
    from tunegate.stages import audit as audit_stage
    from tunegate.stages import data as data_stage
    from tunegate.stages import evaluate as eval_stage
    from tunegate.stages import train as train_stage

    return {"data": data_stage.run, "audit": audit_stage.run, "train": train_stage.run, "eval": eval_stage.run, "report": report_stage.run}


def training_override(project: Project, run_dir: Path, train_anyway: bool) -> list[str]:
    """The audit gate in front of training. Returns the override to record, or raises AuditSaysNoTrain."""
    audit = read_manifest(run_dir / "audit")
    if audit is None or audit.verdict != "NO_TRAIN":
        return []
    rec = audit.metrics
    why = f"the audit recommends {str(rec.get('recommendation', '?')).upper()}: best no-training candidate {rec['best']['name']} {rec['best']['mean']:.3f}"
    if rec.get("gap"):
        g = rec["gap"]
        why += f", fine-tuning gap {g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
    if not train_anyway:
        raise AuditSaysNoTrain(
            f"{run_dir / 'audit' / 'audit.html'}: training does not pay ({why}); stopped before training. "
            "Read the audit, or rerun with --train-anyway (recorded in the train manifest)."
        )
    return [f"trained although the audit said NO_TRAIN ({why}): --train-anyway"]


def run_pipeline(project: Project, run_id: str = "default", until: str = "report", force: tuple[str, ...] = (),
                 train_anyway: bool = False) -> dict[str, Manifest]:
    """data -> audit -> train -> eval -> report. Returns the manifests; the caller reads the eval verdict.

    Raises AuditSaysNoTrain when the audit's verdict is NO_TRAIN and `train_anyway` is false.
    """
    bodies = stage_bodies()
    run_dir = run_dir_for(project, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifests = {}
    audit_runs = project.audit.enabled and project.train.method != "cpt"
    for stage in STAGES:
        overrides = []
        if stage == "audit" and not audit_runs:
            why = "audit.enabled: false" if not project.audit.enabled else "continued pretraining: raw text has no answers to few-shot or probe with"
            console.print(f"[dim]- audit: skipped ({why})[/dim]")
        else:
            if stage == "train":
                overrides = training_override(project, run_dir, train_anyway) if audit_runs else []
                for o in overrides:
                    console.print(f"[yellow]{o}[/yellow]")
            manifests[stage] = run_stage(project, run_dir, stage, bodies[stage], force=stage in force or "all" in force, overrides=overrides)
        if stage == until:
            break
    return manifests
