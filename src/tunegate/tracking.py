"""Experiment tracking through MLflow (config `tracking.mlflow`) and Trackio (`tracking.trackio`); each is off unless
set, and both may be. mlflow and trackio are imported inside functions: `import tunegate` never loads them.

Layout in MLflow (experiment `tracking.mlflow.experiment`, default the project name):
  one MLflow run per tunegate run, found (or created) by its tags `tunegate.kind` = run, `tunegate.project` and
  `tunegate.run_id`, named after the run id. Tags: tunegate.project, tunegate.run_id, tunegate.config_hash (sha256 of the finished stages'
  config views, `config_hash`), tunegate.verdict (eval), tunegate.bundle_sha256 (release). Metrics: the gate's
  rules (`gate.<metric>.<rule>.value|ci_low|ci_high|threshold|passed`), logged again at each eval.
  one nested run per stage execution (tags mlflow.parentRunId, tunegate.kind = stage, tunegate.project,
  tunegate.run_id; run name and tag tunegate.stage = the stage name),
  created before the stage body runs; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME and MLFLOW_RUN_ID point to it
  while the body runs, so transformers' MLflowCallback (TRL config `report_to: mlflow`,
  recipes.defaults) logs the TrainingArguments as params and the training loss as metrics into the train stage's
  nested run. After the manifest is written (`StageRun.finish`) tunegate adds what only it knows: the stage's
  config view as `config.*` params, wall_s, and per stage:
    data     data.<count> from stats.json (rows read/kept/rejected/..., train/val/golden rows) and
             data.rejected.<rule> (rejection reasons)
    audit    audit.<candidate>.<figure> for every candidate (mean, ci_low, ci_high, costs), tag
             tunegate.recommendation
    eval     the gate metrics above, eval.<metric>.<candidate|baseline|delta>.<mean|ci_low|ci_high> (scores.json),
             tag tunegate.verdict
    release  tag tunegate.bundle_sha256: sha256 of the bundle's files.json (the digest of every bundled file)
  and the stage folder's .json/.html/.md/.png files (up to 5 MB each) as artifacts under `<stage>/` (report.html,
  audit.html, the data card, verdict.json, ...).

Layout in Trackio (project `tracking.trackio.project`, default the project name; a local store in
`tracking.trackio.dir`, default `trackio/` in the project folder, which becomes TRACKIO_DIR):
  one Trackio run per stage of a tunegate run, named `<run id>-<stage>`, in the group named after the run id. Its
  config holds the same tags (tunegate.project, tunegate.run_id, tunegate.stage, tunegate.config_hash,
  tunegate.verdict, ...) and `config.*` params; its metrics are the same per-stage metrics as the nested MLflow run's,
  logged once the manifest is written. While the train stage runs, transformers' TrackioCallback (`report_to:
  trackio`, with TrainingArguments `project` and `run_name` naming that run) logs the training loss into it. A stage
  run again appends to its run (the next step). The stage folder's pages and JSON files are logged as artifacts.

A tracking failure (no mlflow, server down, ...) never fails the pipeline: one warning line, and the run goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from tunegate.core.console import console

# Trackio sends a run to a Space, server or bucket when one of these is set: removed while a stage runs, so a
# tracked run stays in the project's store
TRACKIO_REMOTE_KEYS = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID")
# TUNEGATE_MLFLOW_RUN_ID marks an MLFLOW_RUN_ID tunegate set itself (not one left in the shell); TUNEGATE_TRACKIO_RUN
# names the Trackio run of the stage that is running
ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "TUNEGATE_MLFLOW_RUN_ID", "TUNEGATE_TRACKIO_RUN",
            *TRACKIO_REMOTE_KEYS)
ARTIFACT_SUFFIXES = (".json", ".html", ".md", ".png")
MAX_ARTIFACT_BYTES = 5 * 1024 * 1024
MAX_PARAM_CHARS = 500


def enabled(project) -> bool:
    """Whether the project reports to MLflow (`tracking.mlflow` set)."""
    return getattr(getattr(project, "tracking", None), "mlflow", None) is not None


def trackio_enabled(project) -> bool:
    """Whether the project reports to Trackio (`tracking.trackio` set)."""
    return getattr(getattr(project, "tracking", None), "trackio", None) is not None


def report_to(project) -> str | list[str]:
    """The TRL/transformers `report_to` for this project: "mlflow" and/or "trackio" while a tracked stage runs
    (MLFLOW_RUN_ID / TUNEGATE_TRACKIO_RUN set by `stage_run`), else "none" (so an unreachable tracker never reaches
    the trainer)."""
    run = os.environ.get("MLFLOW_RUN_ID")
    out = ["mlflow"] if enabled(project) and run and os.environ.get("TUNEGATE_MLFLOW_RUN_ID") == run else []
    if trackio_enabled(project) and os.environ.get("TUNEGATE_TRACKIO_RUN"):
        out.append("trackio")
    return out[0] if len(out) == 1 else (out or "none")


def trainer_settings(project) -> dict[str, Any]:
    """The TrainingArguments tracking needs: `report_to`, and with Trackio the `project` and `run_name` that make
    transformers' TrackioCallback log into the running stage's Trackio run."""
    out: dict[str, Any] = {"report_to": report_to(project)}
    targets = [out["report_to"]] if isinstance(out["report_to"], str) else out["report_to"]
    if "trackio" in targets:
        out.update(project=trackio_project(project), run_name=os.environ["TUNEGATE_TRACKIO_RUN"])
    return out


def trackio_project(project) -> str:
    return project.tracking.trackio.project or project.name


def experiment_name(project) -> str:
    return project.tracking.mlflow.experiment or project.name


def config_hash(run_dir: Path) -> str:
    """sha256 (hex) of the finished stages' config views ({stage: manifest config}, JSON with sorted keys)."""
    from tunegate.core.manifest import read_manifest

    configs = {}
    for stage_dir in sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = read_manifest(stage_dir)
        if m is not None:
            configs[m.stage] = m.config
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()


def _warn(what: str, exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    console.print(f"[yellow]tracking: {what} failed, going on without it ({type(exc).__name__}: {first})[/yellow]",
                  soft_wrap=True, highlight=False, markup=True)


def _client(project):
    from mlflow.tracking import MlflowClient

    uri = project.tracking.mlflow.tracking_uri
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    if uri.startswith(("http:", "https:")):  # a server that is down costs seconds per stage, not MLflow's minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, project) -> str:
    name = experiment_name(project)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = project.tracking.mlflow.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database (MLflow's default is ./mlruns in the cwd)
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def parent_run_id(client, project, run_id: str) -> str:
    """The MLflow run of tunegate run `run_id` of this project: found by its tags, else created."""
    exp = _experiment_id(client, project)
    found = client.search_runs(
        [exp], filter_string=f"tags.`tunegate.kind` = 'run' and tags.`tunegate.project` = '{_quote(project.name)}' "
                           f"and tags.`tunegate.run_id` = '{_quote(run_id)}'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(exp, run_name=run_id, tags={"tunegate.kind": "run", "tunegate.project": project.name,
                                                               "tunegate.run_id": run_id})
    return run.info.run_id


class StageRun:
    """The nested MLflow run of one stage execution (or a no-op when tracking is off or failed to start)."""

    def __init__(self, project, run_dir: Path, stage: str):
        self.project, self.run_dir, self.stage = project, Path(run_dir), stage
        self.client = self.parent = self.child = None

    def start(self) -> None:
        try:
            self.client = _client(self.project)
            self.parent = parent_run_id(self.client, self.project, self.run_dir.name)
            exp = self.client.get_run(self.parent).info.experiment_id
            self.child = self.client.create_run(exp, run_name=self.stage, tags={
                "mlflow.parentRunId": self.parent, "tunegate.kind": "stage", "tunegate.stage": self.stage,
                "tunegate.project": self.project.name, "tunegate.run_id": self.run_dir.name}).info.run_id
        except Exception as exc:  # noqa: BLE001 - tracking never fails the pipeline
            _warn(f"starting the MLflow run for stage {self.stage}", exc)
            self.child = None

    def finish(self, manifest, stage_dir: Path) -> None:
        """Log what tunegate knows about the finished stage (see the module docstring); never raises."""
        if self.child is None:
            return
        try:
            self._log(manifest, Path(stage_dir))
            self.client.set_terminated(self.child, "FINISHED")
            self.client.set_terminated(self.parent, "FINISHED")  # ends at its last stage (a later stage reopens nothing)
        except Exception as exc:  # noqa: BLE001
            _warn(f"logging stage {self.stage} to MLflow", exc)

    def failed(self) -> None:
        if self.child is not None:
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.child, "FAILED")

    def _log(self, manifest, stage_dir: Path) -> None:
        from mlflow.entities import Metric, Param, RunTag

        facts = stage_facts(self.stage, manifest, stage_dir, self.run_dir)
        now = int(time.time() * 1000)
        metric_list = [Metric(_key(k), float(v), now, 0) for k, v in facts["metrics"].items()]
        param_list = [Param(_key(k), str(v)[:MAX_PARAM_CHARS]) for k, v in facts["params"].items()]
        for i in range(0, max(len(metric_list), len(param_list), 1), 100):  # MLflow takes up to 100 params per batch
            self.client.log_batch(self.child, metrics=metric_list[i:i + 100], params=param_list[i:i + 100],
                                  tags=[RunTag(k, v) for k, v in facts["stage_tags"].items()] if i == 0 else [])
        step = _step(self.client, self.parent)
        self.client.log_batch(self.parent, metrics=[Metric(_key(k), v, now, step) for k, v in facts["run_metrics"].items()],
                              tags=[RunTag(k, v) for k, v in facts["run_tags"].items()])
        for path in artifacts(stage_dir):
            self.client.log_artifact(self.child, str(path), artifact_path=self.stage)


def artifacts(stage_dir: Path) -> list[Path]:
    """The stage folder's pages and JSON files a tracker keeps (ARTIFACT_SUFFIXES, up to MAX_ARTIFACT_BYTES each)."""
    return [p for p in sorted(Path(stage_dir).iterdir())
            if p.is_file() and p.suffix in ARTIFACT_SUFFIXES and p.stat().st_size <= MAX_ARTIFACT_BYTES]


def stage_facts(stage: str, manifest, stage_dir: Path, run_dir: Path) -> dict[str, dict[str, Any]]:
    """What only tunegate knows about a finished stage, for any tracker (the module docstring lists it per stage).

    Returns {"metrics": the stage's {name: float}, "params": {config.<key>: value, overrides}, "stage_tags": {name:
    str}, "run_tags": the tags the whole run carries, "run_metrics": the gate metrics the whole run carries}.
    """
    stage_dir = Path(stage_dir)
    metrics: dict[str, float] = {"wall_s": float(manifest.wall_s)}
    child_tags = {"tunegate.stage_fingerprint": manifest.fingerprint}
    parent_tags = {"tunegate.config_hash": config_hash(run_dir)}
    parent_metrics: dict[str, float] = {}
    if manifest.verdict:
        child_tags["tunegate.verdict"] = str(manifest.verdict)
    if stage == "data":
        stats = _read_json(stage_dir / "stats.json")
        metrics.update({f"data.{k}": v for k, v in _numbers(stats, depth=0).items()})
        metrics.update({f"data.rejected.{k}": v for k, v in _numbers(stats.get("rejected_by_rule") or {}, depth=0).items()})
    elif stage == "audit":
        audit = _read_json(stage_dir / "audit.json")
        for c in audit.get("candidates") or []:
            metrics.update({f"audit.{c.get('name', '?')}.{k}": v for k, v in _numbers(c).items()})
        rec = audit.get("recommendation") or {}
        if rec.get("recommendation"):
            parent_tags["tunegate.recommendation"] = child_tags["tunegate.recommendation"] = str(rec["recommendation"])
    elif stage == "eval":
        for rule in _read_json(stage_dir / "verdict.json").get("rules") or []:
            base = f"gate.{rule.get('metric')}.{rule.get('rule')}"
            ci = rule.get("ci") or [None, None]
            for key, value in (("value", rule.get("value")), ("ci_low", ci[0]), ("ci_high", ci[1]),
                               ("threshold", rule.get("threshold")), ("passed", float(bool(rule.get("passed"))))):
                if isinstance(value, (int, float)):
                    parent_metrics[f"{base}.{key}"] = float(value)
        metrics.update(parent_metrics)
        for name, s in (_read_json(stage_dir / "scores.json").get("metrics") or {}).items():
            metrics.update({f"eval.{name}.{k}": v for k, v in _numbers(s).items()})
        parent_tags["tunegate.verdict"] = str(manifest.verdict)
    elif stage == "release":
        files = stage_dir / "bundle" / "files.json"
        if files.is_file():
            parent_tags["tunegate.bundle_sha256"] = child_tags["tunegate.bundle_sha256"] = hashlib.sha256(files.read_bytes()).hexdigest()
    params = {f"config.{k}": v for k, v in _flatten(manifest.config).items()}
    if manifest.overrides:
        params["overrides"] = "; ".join(manifest.overrides)
    return {"metrics": metrics, "params": params, "stage_tags": child_tags, "run_tags": parent_tags, "run_metrics": parent_metrics}


class TrackioStage:
    """The Trackio run of one stage of a tunegate run, `<run id>-<stage>` in the group `<run id>` (or a no-op when
    Trackio is off or failed to start). The trainer's TrackioCallback opens it itself while the stage runs."""

    def __init__(self, project, run_dir: Path, stage: str):
        self.project, self.run_dir, self.stage = project, Path(run_dir), stage
        self.name = f"{self.run_dir.name}-{stage}"
        self.trackio = None

    def start(self) -> None:
        try:
            self.trackio = _import_trackio(self.project.tracking.trackio.dir)
        except Exception as exc:  # noqa: BLE001 - tracking never fails the pipeline
            _warn(f"starting Trackio for stage {self.stage}", exc)

    def _tags(self) -> dict[str, Any]:
        return {"tunegate.project": self.project.name, "tunegate.run_id": self.run_dir.name, "tunegate.stage": self.stage}

    def _open(self, config: dict[str, Any]) -> None:
        """Open (or reopen) the run with `config`, keeping from the config already there only what the trainer's
        TrackioCallback wrote (its arguments): tunegate's own keys of an earlier execution are replaced whole."""
        from trackio.sqlite_storage import SQLiteStorage

        project = trackio_project(self.project)
        try:
            prior = SQLiteStorage.get_run_config(project, self.name) or {}
        except Exception:  # noqa: BLE001 - a new project has no database yet
            prior = {}
        merged = {k: v for k, v in prior.items()
                  if not k.startswith(("_", "tunegate.", "config.")) and k not in ("overrides", "allow_val_change")}
        with _local_only(), contextlib.redirect_stdout(io.StringIO()):  # trackio prints dashboard hints on init and finish
            self.trackio.init(project=project, name=self.name, group=self.run_dir.name, config={**merged, **config},
                              resume="allow", embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def finish(self, facts: dict[str, dict[str, Any]], stage_dir: Path) -> None:
        """Log what tunegate knows about the finished stage (`stage_facts`); never raises."""
        if self.trackio is None:
            return
        try:
            self._open({**self._tags(), **facts["params"], **facts["stage_tags"], **facts["run_tags"], "tunegate.status": "FINISHED"})
            self.trackio.log(facts["metrics"])
            for path in artifacts(stage_dir):
                self.trackio.log_artifact(path, name=f"{self.name}-{path.name}", type="tunegate")
            with contextlib.redirect_stdout(io.StringIO()):
                self.trackio.finish()
        except Exception as exc:  # noqa: BLE001
            _warn(f"logging stage {self.stage} to Trackio", exc)

    def failed(self) -> None:
        """Mark the run FAILED (Trackio stores a run's config with its first log: one metric is logged)."""
        if self.trackio is not None:
            with contextlib.suppress(Exception):
                self._open({**self._tags(), "tunegate.status": "FAILED"})
                self.trackio.log({"tunegate.failed": 1.0})
                with contextlib.redirect_stdout(io.StringIO()):
                    self.trackio.finish()


def _no_user_lookup() -> str:
    raise RuntimeError("tunegate keeps Trackio local: no Hugging Face user lookup")


def _import_trackio(store: Path):
    """trackio, with its local store at `store` (TRACKIO_DIR, read once when trackio is first imported; the variable
    is put back as it was right after). Its Hugging Face user lookup, a network call on every `init` when a token
    is present, is switched off: runs are local. Raises RuntimeError when trackio was imported earlier in this
    process with another store."""
    import sys

    if "trackio" not in sys.modules:
        saved = os.environ.get("TRACKIO_DIR")
        os.environ["TRACKIO_DIR"] = str(store)
        try:
            import trackio  # noqa: F401
        finally:
            if saved is None:
                os.environ.pop("TRACKIO_DIR", None)
            else:
                os.environ["TRACKIO_DIR"] = saved
    import trackio
    import trackio.run
    from trackio.utils import TRACKIO_DIR

    if Path(TRACKIO_DIR).resolve() != Path(store).resolve():
        raise RuntimeError(f"trackio was imported in this process with TRACKIO_DIR={TRACKIO_DIR}, not {store}")
    trackio.run._get_default_namespace = _no_user_lookup  # Run._get_username catches it: the username is None
    return trackio


def _step(client, run_id: str) -> int:
    """The next step of the parent's gate metrics: one more than the eval stages logged so far."""
    return sum(1 for r in client.search_runs([client.get_run(run_id).info.experiment_id],
                                             filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`tunegate.stage` = 'eval'"))


@contextlib.contextmanager
def _local_only() -> Iterator[None]:
    """Without TRACKIO_REMOTE_KEYS in the environment (put back afterwards): the run opened here stays local."""
    saved = {k: os.environ.pop(k) for k in TRACKIO_REMOTE_KEYS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def stage_run(project, run_dir: Path, stage: str) -> Iterator["Trackers"]:
    """Around a stage body: creates the stage's nested MLflow run and points the MLFLOW_* variables at it, and
    names the stage's Trackio run in TUNEGATE_TRACKIO_RUN, while the body runs (ENV_KEYS, restored afterwards); a
    body that raises marks the runs FAILED. Yields the trackers (call `finish` once the manifest is written). A
    no-op when tracking is off."""
    tracked = Trackers(project, run_dir, stage)
    if not (enabled(project) or trackio_enabled(project)):
        yield tracked
        return
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    if enabled(project):
        tracked.mlflow.start()
        if tracked.mlflow.child is not None:
            os.environ.update({"MLFLOW_TRACKING_URI": project.tracking.mlflow.tracking_uri,
                               "MLFLOW_EXPERIMENT_NAME": experiment_name(project), "MLFLOW_RUN_ID": tracked.mlflow.child,
                               "TUNEGATE_MLFLOW_RUN_ID": tracked.mlflow.child})
    if trackio_enabled(project):
        for key in TRACKIO_REMOTE_KEYS:
            os.environ.pop(key, None)
        tracked.trackio.start()
        if tracked.trackio.trackio is not None:
            os.environ["TUNEGATE_TRACKIO_RUN"] = tracked.trackio.name
    try:
        yield tracked
    except BaseException:
        tracked.failed()
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Trackers:
    """The trackers of one stage execution: `mlflow` (StageRun) and `trackio` (TrackioStage), each a no-op when off."""

    def __init__(self, project, run_dir: Path, stage: str):
        self.mlflow = StageRun(project, run_dir, stage)
        self.trackio = TrackioStage(project, run_dir, stage)

    def finish(self, manifest, stage_dir: Path) -> None:
        self.mlflow.finish(manifest, stage_dir)
        if self.trackio.trackio is not None:
            try:
                facts = stage_facts(self.trackio.stage, manifest, Path(stage_dir), self.trackio.run_dir)
            except Exception as exc:  # noqa: BLE001
                _warn(f"reading stage {self.trackio.stage} for Trackio", exc)
                return
            self.trackio.finish(facts, stage_dir)

    def failed(self) -> None:
        self.mlflow.failed()
        self.trackio.failed()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _numbers(obj: dict[str, Any], depth: int = 2, prefix: str = "") -> dict[str, float]:
    """The int/float leaves of `obj` (booleans as 0/1), keys joined with '.', nested at most `depth` levels."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(v, bool):
            out[prefix + str(k)] = float(v)
        elif isinstance(v, (int, float)):
            out[prefix + str(k)] = float(v)
        elif isinstance(v, dict) and depth > 0:
            out.update(_numbers(v, depth - 1, f"{prefix}{k}."))
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(obj, default=str) if isinstance(obj, (list, dict)) else obj} if prefix else {}


def _key(name: str) -> str:
    """An MLflow metric/param key: letters, digits and _ - . space : / only."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)[:250]
