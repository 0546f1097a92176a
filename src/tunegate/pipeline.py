"""Runs the stages in order, skipping finished ones whose inputs and config are unchanged.

A stage reads files and writes files into `runs/<run-id>/<stage>/`, and is finished exactly when its
`manifest.json` exists (written last, atomically). While it runs it writes into `.<stage>.partial/` (locked, so
that a second process neither deletes nor reuses it), which replaces the finished folder only on success
(core.io.publish_dir): a stage that fails on bad input or is killed midway damages nothing already written,
leaves no manifest, and is redone; what a kill left beside the stage folder is deleted on the next run. The train stage keeps its checkpoints in
`.train.checkpoints/` across an interruption and resumes from the last one when its fingerprint is unchanged.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tunegate import EXIT_AUDIT_NO_TRAIN, TunegateError
from tunegate.config import Project
from tunegate.core.console import console, fmt_seconds, log_to
from tunegate.core.io import atomic_write_text, claim_dir, clean_stale, fault_point, publish_dir, remove_dir
from tunegate.core.manifest import (
    Manifest,
    fingerprint,
    hash_outputs,
    manifest_hash,
    read_manifest,
    sha256_file,
    verify_outputs,
    write_manifest,
)
from tunegate.core.stage import Stage, StageSpec, distributed_rank
from tunegate.release import bundle_dir
from tunegate.report.header import write_run_js
from tunegate import tracking
from tunegate.stages import audit, data, evaluate, release, report, train

# The stages in order. Each file under tunegate/stages/ declares its SPEC (name, body, upstream stages, the config
# view it fingerprints, the files it reads); adding a stage is one such file and one entry here.
STAGES: tuple[StageSpec, ...] = (data.SPEC, audit.SPEC, train.SPEC, evaluate.SPEC, report.SPEC, release.SPEC)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_spec(name: str) -> StageSpec:
    """The SPEC of stage `name`. Raises TunegateError naming the stages when there is no such stage."""
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise TunegateError(f"{name}: not a stage; stages: {', '.join(STAGE_NAMES)}")


def run_dir_for(project: Project, run_id: str) -> Path:
    """`runs_dir/<run_id>` (config.Project.run_dir). Raises TunegateError when the run id is not an identifier or
    the folder is a symbolic link that leads outside the project."""
    return project.run_dir(run_id)


def stage_config(project: Project, spec: StageSpec) -> dict[str, Any]:
    """The config view `spec` fingerprints, with paths inside the project folder made relative to it (so a moved
    or copied project, with its runs/, is still recognised as finished)."""
    return _relative_to(spec.config(project), project.root)


def stage_fingerprint(project: Project, spec: StageSpec, named_inputs: dict[str, str], upstream: dict[str, str]) -> str:
    """The fingerprint a finished `spec` stage of this project must carry to be skipped.

    named_inputs: input name -> sha256 of the files `spec.inputs(project)` names; upstream: stage -> manifest sha256.
    """
    return fingerprint(spec.name, stage_config(project, spec), named_inputs, upstream)


def _input_hashes(project: Project, spec: StageSpec) -> tuple[dict[str, Path], dict[str, str]]:
    """The files `spec` reads from outside the run ({name: path}) and their sha256 ({name: hex}).
    Raises TunegateError naming the first file that is missing."""
    files = spec.inputs(project)
    for path in files.values():
        if not Path(path).is_file():
            raise TunegateError(f"{path}: input file not found (stage {spec.name})")
    return files, {name: sha256_file(p) for name, p in files.items()}


def stale_reason(project: Project, run_dir: Path, spec: StageSpec | str) -> str | None:
    """None when `run_dir/<stage>` is finished and current: its fingerprint matches the config, input files and
    upstream manifests it would run with now, and its outputs are unchanged since. Otherwise, why not (also when
    the config view cannot be read now, e.g. a missing release.key: the error's line). Reads only: creates nothing
    (the stage's `prepare` is not called)."""
    spec = stage_spec(spec) if isinstance(spec, str) else spec
    stage_dir = run_dir / spec.name
    m = read_manifest(stage_dir)
    if m is None:
        return f"no finished {spec.name} stage in {stage_dir}"
    try:
        _, named = _input_hashes(project, spec)
    except TunegateError as exc:
        return str(exc)
    upstream = {up: manifest_hash(run_dir / up) for up in spec.upstream if read_manifest(run_dir / up) is not None}
    try:
        fp = stage_fingerprint(project, spec, named, upstream)
    except TunegateError as exc:  # e.g. release.key not found: the stage cannot be current, and the listing goes on
        return str(exc)
    if fp != m.fingerprint:
        return f"{stage_dir} was built from another {spec.name} config or other files than the current ones"
    broken = verify_outputs(stage_dir, m)
    if broken:
        return f"{stage_dir}: {', '.join(broken)} changed since the stage finished"
    return None


def run_stage(
    project: Project,
    run_dir: Path,
    spec: StageSpec | str,
    *,
    force: bool = False,
    overrides: list[str] | None = None,
    position: tuple[int, int] | None = None,
) -> Manifest:
    """Run one stage unless an identical finished run exists. Returns its manifest.

    overrides: decisions a person took against a gate's advice (e.g. training after the audit said NO_TRAIN);
    recorded in the manifest, not part of the fingerprint.
    position: (number, count) for the console's `stage 3/6 train` lines; default the stage's place in STAGES.
    Everything printed meanwhile is appended to `run_dir/log.txt` (core.console.log_to; rank 0 only).
    """
    spec = stage_spec(spec) if isinstance(spec, str) else spec
    if distributed_rank()[0] > 0:
        return _run_stage(project, run_dir, spec, force, overrides, position)
    with log_to(log_path(run_dir)):
        return _run_stage(project, run_dir, spec, force, overrides, position)


def log_path(run_dir: Path) -> Path:
    """`runs/<id>/log.txt`: everything a command printed about this run, appended per invocation (plain text)."""
    return run_dir / "log.txt"


def stage_label(spec: StageSpec, position: tuple[int, int] | None = None) -> str:
    """`stage 3/6 train`: the stage's number among the stages this command runs (default: its place in STAGES)."""
    if position is None:
        names = [s.name for s in STAGES]
        position = (names.index(spec.name) + 1, len(names)) if spec.name in names else (1, 1)
    return f"stage {position[0]}/{position[1]} {spec.name}"


def _run_stage(project: Project, run_dir: Path, spec: StageSpec, force: bool, overrides: list[str] | None,
               position: tuple[int, int] | None) -> Manifest:
    label = stage_label(spec, position)
    stage, body = spec.name, spec.run
    rank, world = distributed_rank()
    if world > 1 and not spec.distributed:
        raise TunegateError(f"stage {stage} runs in one process; only `tunegate train` is launched with torchrun/accelerate "
                            f"(run `tunegate run --until audit` first)")
    st = Stage(project, run_dir, stage)
    upstream = {}
    for up in spec.upstream:
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
    spec.prepare(project)  # e.g. the release stage's project-local key: made before it is fingerprinted
    input_files, named_inputs = _input_hashes(project, spec)
    inputs = {str(p): named_inputs[name] for name, p in input_files.items()}
    config = spec.config(project)
    fp = stage_fingerprint(project, spec, named_inputs, upstream)

    if rank == 0:
        clean_stale(st.final_dir)  # a killed run's `.<stage>.partial`, or the old folder a publish swapped out (core.io)
    old = read_manifest(st.final_dir)
    if old is not None and old.fingerprint == fp and not force:
        broken = verify_outputs(st.final_dir, old)
        if not broken:
            console.print(f"[dim]{label}: unchanged since {old.started_at}, skipped[/dim]")
            return old
        console.print(f"[yellow]{label}: outputs changed since the manifest ({', '.join(broken)}); rerunning[/yellow]")

    if old is not None and old.fingerprint != fp:
        changed = [name for name, a, b in (("config", old.config, config), ("input files", {k: old.inputs.get(k) for k in inputs}, inputs),
                                           ("upstream stages", old.upstream, upstream)) if a != b]
        console.print(f"[dim]{label}: rerunning, changed since the last run: {', '.join(changed) or 'tunegate version'}[/dim]")
    if rank > 0:  # data-parallel training: rank 0 owns the stage folder, checkpoints and manifest
        return _run_as_worker(st, body, rank)
    try:
        lock = claim_dir(st.dir)
    except BlockingIOError:
        raise TunegateError(f"{st.dir}: another tunegate process is running stage {stage} of this run now; "
                            f"wait for it, or use another --run-id") from None
    try:
        if spec.checkpoints:
            _prepare_checkpoints(st.checkpoint_dir, fp)
        console.rule(f"[bold]{label}", align="left")
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        _wait_for_everyone(world)  # workers start once the checkpoint folder is settled
        t0 = time.perf_counter()
        with tracking.stage_run(project, run_dir, stage) as tracked:  # MLflow / Trackio, when `tracking` sets them
            result = body(st)
        wall = time.perf_counter() - t0
        for path in result.inputs.values():
            inputs[str(path)] = sha256_file(path)
        publish_dir(st.dir, st.final_dir)  # the finished folder swaps into place; the manifest is written last
        fault_point("stage:published")
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
        tracked.finish(manifest, st.final_dir)  # params, metrics, tags and artifacts of this stage (tunegate.tracking)
        write_run_js(run_dir)  # the live status every page's header shows (report.header); no stage's output
    finally:
        os.close(lock)
    console.print(f"[green]{label}: done in {fmt_seconds(wall)}[/green]" + (f", verdict {result.verdict}" if result.verdict else ""))
    if stage == "eval" and release_gate({"eval": manifest}) and remove_dir(run_dir / "release"):
        # `tunegate eval` alone: a bundle of an earlier PASS must not outlive this chain's FAIL (served by path, listed)
        console.print(f"[yellow]- release: removed the release of an earlier chain, {run_dir / 'release'} "
                      f"(eval verdict {manifest.verdict})[/yellow]", soft_wrap=True)
    _wait_for_everyone(world)  # workers read the manifest once it exists
    return manifest


def _wait_for_everyone(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # initialises the process group (gloo on CPU, NCCL on GPUs)


def _run_as_worker(st: Stage, body, rank: int) -> Manifest:
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
    atomic_write_text(fp_file, fp + "\n")


class AuditSaysNoTrain(TunegateError):
    """The audit measured that training does not pay; `tunegate run` stops before the train stage."""

    exit_code = EXIT_AUDIT_NO_TRAIN


def training_override(project: Project, run_dir: Path, train_anyway: bool) -> list[str]:
    """The audit gate in front of training. Returns the override to record, or raises AuditSaysNoTrain."""
    if audit.SPEC.skip(project):
        return []
    audit_manifest = read_manifest(run_dir / "audit")
    if audit_manifest is None or audit_manifest.verdict != "NO_TRAIN":
        return []
    rec = audit_manifest.metrics
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


def release_gate(manifests: dict[str, Manifest]) -> str | None:
    """Why the release stage does not run after these stages (the eval verdict is not PASS), or None when it runs."""
    ev = manifests.get("eval")
    if ev is None:
        return "no eval stage ran"
    return None if ev.verdict == "PASS" else f"eval verdict {ev.verdict}"


def check_stage_names(until: str, force: tuple[str, ...] = (), stages: tuple[StageSpec, ...] = STAGES) -> list[str]:
    """The stage names, once `--until` and every `--force` entry name one of them (or `all`). Raises TunegateError
    naming the stages otherwise (checked before anything is written)."""
    names = [s.name for s in stages]
    if until not in names:
        raise TunegateError(f"--until {until}: not a stage; stages: {', '.join(names)}")
    bogus = [f for f in force if f not in names and f != "all"]
    if bogus:
        raise TunegateError(f"--force {bogus[0]}: not a stage; stages: {', '.join(names)} (or all)")
    return names


def run_pipeline(project: Project, run_id: str = "default", until: str = STAGE_NAMES[-1], force: tuple[str, ...] = (),
                 train_anyway: bool = False, stages: tuple[StageSpec, ...] = STAGES) -> dict[str, Manifest]:
    """data -> audit -> train -> eval -> report -> release (`stages`, in order). Returns the manifests; the caller
    reads the eval verdict. The release stage runs only when the eval verdict is PASS (`release_gate`); otherwise
    the run ends after the report, saying why, and a `runs/<id>/release/` left by an earlier PASS is removed
    (core.io.remove_dir), so no bundle of an older chain stays in the run.

    Prints `stage N/M name` lines (M: the stages up to `until` that this project does not skip) and, when the eval
    stage is among them, the summary block (`print_summary`); all of it is appended to `runs/<id>/log.txt`.

    Raises TunegateError when `until` or a `force` entry is not a stage (or `all`); AuditSaysNoTrain when the
    audit's verdict is NO_TRAIN and `train_anyway` is false.
    """
    names = check_stage_names(until, force, stages)
    run_dir = run_dir_for(project, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    planned = stages[: names.index(until) + 1]
    counted = [s.name for s in planned if not s.skip(project)]
    for spec in planned:  # what the stages need from this machine, before any of them runs (StageSpec.requires)
        if spec.name in counted:
            spec.requires(project)
    manifests: dict[str, Manifest] = {}
    timings: dict[str, str] = {}
    with log_to(log_path(run_dir)):
        for spec in planned:
            skipped = spec.skip(project) or (release_gate(manifests) if spec.name == "release" else None)
            if skipped and spec.name == "release" and remove_dir(run_dir / spec.name):
                # a bundle of an earlier PASS must not outlive this chain's FAIL: it would be served or listed
                skipped += f"; removed the release of an earlier chain, {run_dir / spec.name}"
            if skipped:
                console.print(f"[dim]stage -/{len(counted)} {spec.name}: skipped ({skipped})[/dim]", soft_wrap=True)  # paths whole
                timings[spec.name] = "skipped"
                continue
            overrides = training_override(project, run_dir, train_anyway) if spec.name == "train" else []
            for o in overrides:
                console.print(f"[yellow]{o}[/yellow]")
            before = read_manifest(run_dir / spec.name)
            t0 = time.perf_counter()
            manifests[spec.name] = run_stage(project, run_dir, spec, force=spec.name in force or "all" in force,
                                             overrides=overrides, position=(counted.index(spec.name) + 1, len(counted)))
            unchanged = before is not None and before.started_at == manifests[spec.name].started_at
            timings[spec.name] = "unchanged" if unchanged else fmt_seconds(time.perf_counter() - t0)
        if "eval" in manifests:
            print_summary(project, run_dir, manifests, timings)
    return manifests


def print_summary(project: Project, run_dir: Path, manifests: dict[str, Manifest], timings: dict[str, str]) -> None:
    """The block at the end of `tunegate run`: verdict (and the gate rules that failed), headline metric (the first
    gate rule's) with its 95% CI and the baseline's, time per stage, and where the report, the release bundle (if
    one exists, built on the eval stage in the run now: `release.bundle_dir`) and the log are. One line per item, never cut (paths stay whole for copying)."""
    from rich.text import Text

    rows: list[tuple[str, str]] = []  # (key, plain text: never read as rich markup)
    verdict = manifests["eval"].verdict
    failed = [r["description"] for r in _gate_rules(run_dir) if not r.get("passed")]
    rows.append(("verdict", f"{verdict} (eval gate)" + (f"; failed: {'; '.join(failed)}" if failed else "")))
    scores = manifests["eval"].metrics
    metric = project.eval.gate[0].metric if project.eval.gate else scores.get("headline")
    s = scores.get("metrics", {}).get(metric)
    if s:
        c, b, d = s["candidate"], s["baseline"], s["delta"]
        rows.append(("headline", f"{metric} {c['mean']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] vs "
                                 f"{scores.get('baseline', 'baseline')} {b['mean']:.3f}; delta {d['mean']:+.3f} "
                                 f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (95% CI, n={scores.get('n')})"))
    rows.append(("time", ", ".join(f"{name} {t}" for name, t in timings.items())))
    report = run_dir / "report" / "report.html"
    if report.is_file():
        rows.append(("report", str(report)))
    bundle = bundle_dir(run_dir)
    if bundle.is_dir() and _current_release(run_dir):
        rows.append(("bundle", str(bundle)))
    rows.append(("log", str(log_path(run_dir))))
    console.rule("[bold]summary", align="left")
    colour = "green" if verdict == "PASS" else "red"
    for key, value in rows:
        line = Text.assemble((f"{key:<9} ", "bold"), value)
        if key == "verdict":
            line.stylize(f"bold {colour}", 10, 10 + len(verdict))
        console.print(line, soft_wrap=True, highlight=False)


def _current_release(run_dir: Path) -> bool:
    """Whether `run_dir/release` was built on the eval stage in the run now (not on an older chain's)."""
    m, ev = read_manifest(run_dir / "release"), read_manifest(run_dir / "eval")
    return m is not None and ev is not None and m.upstream.get("eval") == manifest_hash(run_dir / "eval")


def _gate_rules(run_dir: Path) -> list[dict[str, Any]]:
    import json

    path = run_dir / "eval" / "verdict.json"
    return json.loads(path.read_text()).get("rules", []) if path.is_file() else []


def existing_run_dir(project: Project, run_id: str, flag: str = "--run-id") -> Path:
    """`run_dir_for`, for a command that reads a run that must already exist (eval, report, docs, export, promote,
    release, data-preview, runs --compare). Raises TunegateError naming `flag` and the runs that do exist when
    `runs/<run_id>` does not."""
    path = run_dir_for(project, run_id)
    if not path.is_dir():
        runs = sorted(p.name for p in project.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if project.runs_dir.is_dir() else []
        listed = f"existing runs: {', '.join(runs)}" if runs else "there are no runs yet; start one with `tunegate run`"
        raise TunegateError(f"{flag} {run_id}: no run {path}; {listed}")
    return path


VALIDATE_ROWS = 5  # rows of each source `tunegate validate` parses: enough to catch a wrong format or column


def validate_project(p: Project) -> list[str]:
    """What `tunegate validate` finds wrong with a project without loading a model or touching the network, one line
    per problem (empty when none): a `base_model` that does not resolve (models.describe_base_model: a misspelled
    embedded name, a missing folder, a hub id not in the local cache while offline); missing source, golden, corpus
    or suite files; a source whose header lacks a mapped column or whose first VALIDATE_ROWS rows all fail to parse
    as its `format` (Hub dataset sources are not read); bad golden rows or a golden set that changed since its lock;
    an unreadable price table; TRL/PEFT settings their config classes do not accept or tunegate cannot honour; a
    tokenizer with more tokens than the base model's embedding (when the base model is on this machine)."""
    from tunegate.data import golden
    from tunegate.data.records import read_source
    from tunegate.models import describe_base_model
    from tunegate.preflight import check_vocabulary
    from tunegate.prices import load_prices
    from tunegate.recipes.defaults import check_passthrough

    problems = []
    try:
        describe_base_model(p.base_model)
    except TunegateError as exc:
        problems.append(str(exc))
    for i, src in enumerate(p.data.sources):
        if src.path is None:
            continue  # a Hub dataset: reading it would need the network
        if src.feedback is not None and not src.path.exists():
            continue  # not exported yet (nothing served, or a fresh clone): `tunegate run` writes it, empty if need be
        if not src.path.exists():
            problems.append(f"data.sources.{i}.path: {src.path} not found")
            continue
        try:
            rows, rejected = read_source(src, limit=VALIDATE_ROWS)
        except TunegateError as exc:
            problems.append(f"data.sources.{i}: {exc}")
            continue
        if rejected and not rows:
            problems.append(f"data.sources.{i} (format {src.format}): none of the first {len(rejected)} row(s) parse "
                            f"as {src.format}; first: {rejected[0]}")
    if not p.data.golden.path.exists():
        problems.append(f"data.golden.path: {p.data.golden.path} not found")
    if p.data.golden.path.exists() and not p.data.golden_lock.is_file():
        try:
            rows, rejected = read_source(p.data.golden, role="golden", limit=VALIDATE_ROWS)
        except TunegateError as exc:
            rows, rejected = [], []
            problems.append(f"data.golden: {exc}")
        if rejected and not rows:
            problems.append(f"data.golden (format {p.data.golden.format}): none of the first {len(rejected)} row(s) "
                            f"parse as {p.data.golden.format}; first: {rejected[0]}")
    if p.data.golden.path.exists() and p.data.golden_lock.is_file():
        rows, rejected = read_source(p.data.golden, role="golden")
        problems += [f"data.golden: {r}" for r in rejected[:5]]
        try:
            golden.check(p.data.golden, rows, golden.read_lock(p.data.golden_lock), p.data.golden_lock)
        except TunegateError as exc:
            problems.append(str(exc))
    if p.audit.enabled and p.audit.corpus is not None and not p.audit.corpus.path.is_file():
        problems.append(f"audit.corpus.path: {p.audit.corpus.path} not found")
    if p.audit.enabled:
        try:
            load_prices(p.audit.prices)
        except TunegateError as exc:
            problems.append(f"audit.prices: {exc}")
    if p.eval.suites:
        problems += [f"eval.suites: {path} not found" for path in p.eval.suites.files().values() if not path.is_file()]
    return problems + check_passthrough(p) + check_vocabulary(p)
