"""Experiment tracking through Trackio (issue 25): `tunegate run` on the tiny project reports to a real local Trackio
store (TRACKIO_DIR inside the project, no server, no mocks), read back through trackio's own Api and storage.

Both run in subprocesses: trackio reads TRACKIO_DIR once, when it is first imported."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tunegate import tracking
from tunegate.config import load_project

pytestmark = pytest.mark.trackio
pytest.importorskip("trackio", reason='tracking needs: pip install "tunegate[tracking]"')

READ_BACK = """
import json, sys, trackio
from trackio.sqlite_storage import SQLiteStorage
runs = {r.name: r.config for r in trackio.Api().runs(sys.argv[1])}
print(json.dumps({name: {"config": config, "logs": SQLiteStorage.get_logs(sys.argv[1], name)} for name, config in runs.items()},
                 default=str))
"""


def test_tiny_run_is_read_back_from_trackio(tiny_project):
    with open(tiny_project / "tunegate.yaml", "a") as f:
        f.write("tracking:\n  trackio: {project: tiny-trk}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRACKIO_DIR", None)
    run = subprocess.run([sys.executable, "-m", "tunegate.cli", "run", str(tiny_project), "--run-id", "r1"],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "tracking:" not in run.stderr  # no tracking warning
    store = tiny_project / "trackio"
    out = subprocess.run([sys.executable, "-c", READ_BACK, "tiny-trk"], capture_output=True, text=True,
                         env={**env, "TRACKIO_DIR": str(store)}, timeout=120, check=True)
    runs = json.loads(out.stdout)

    released = importlib.util.find_spec("model_signing") is not None
    assert set(runs) == {"r1-data", "r1-train", "r1-eval", "r1-report"} | ({"r1-release"} if released else set())
    for name, r in runs.items():
        assert r["config"]["tunegate.project"] == "tiny" and r["config"]["tunegate.run_id"] == "r1"
        assert r["config"]["tunegate.stage"] == name[len("r1-"):] and r["config"]["_Group"] == "r1"
        assert r["config"]["tunegate.status"] == "FINISHED" and any("wall_s" in log for log in r["logs"])
    train, ev, data = runs["r1-train"], runs["r1-eval"], runs["r1-data"]
    # the trainer's own TrackioCallback logged into the train stage's run: its arguments and the loss per step
    assert train["config"]["learning_rate"] == 2e-4 and train["config"]["config.train.trl.max_steps"] == 4
    losses = [log["train/loss"] for log in train["logs"] if "train/loss" in log]
    assert len(losses) == 4 and all(x > 0 for x in losses)
    assert ev["config"]["tunegate.verdict"] == "PASS"
    gate = next(log for log in ev["logs"] if "gate.exact_match.min.value" in log)
    scores = json.loads((tiny_project / "runs" / "r1" / "eval" / "scores.json").read_text())
    assert gate["gate.exact_match.min.passed"] == 1.0
    assert gate["eval.exact_match.candidate.mean"] == scores["metrics"]["exact_match"]["candidate"]["mean"]
    stats = json.loads((tiny_project / "runs" / "r1" / "data" / "stats.json").read_text())
    data_log = next(log for log in data["logs"] if "wall_s" in log)
    assert data_log["data.train_rows"] == stats["train_rows"]
    last = runs["r1-release" if released else "r1-report"]["config"]["tunegate.config_hash"]
    assert last == tracking.config_hash(load_project(tiny_project).run_dir("r1"))
    blobs = [p for p in (store / "artifacts").rglob("*") if p.is_file()]
    assert len(blobs) >= len(tracking.artifacts(tiny_project / "runs" / "r1" / "report"))  # the stage pages and JSON files


RERUN_AND_FAIL = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from tunegate import tracking
from tunegate.core.manifest import Manifest

root = Path(sys.argv[1])
project = SimpleNamespace(name="p", tracking=SimpleNamespace(mlflow=None, trackio=SimpleNamespace(project="p", dir=root / "store")))
run_dir = root / "runs" / "r1"
(run_dir / "eval").mkdir(parents=True, exist_ok=True)

def execute(overrides, fail=False):
    try:
        with tracking.stage_run(project, run_dir, "eval") as tracked:
            if fail:
                raise RuntimeError("the stage body failed")
        tracked.finish(Manifest(stage="eval", fingerprint="f", config={"eval": {"k": 1}}, wall_s=2.0, overrides=overrides),
                       run_dir / "eval")
    except RuntimeError:
        pass
    from trackio.sqlite_storage import SQLiteStorage
    return SQLiteStorage.get_run_config("p", "r1-eval"), SQLiteStorage.get_logs("p", "r1-eval")

first = execute(["eval.k=1"])
second = execute([])
failed = execute([], fail=True)
print(json.dumps({"first": first, "second": second, "failed": failed}, default=str))
"""


def test_a_stage_run_again_replaces_tunegates_keys_and_a_failure_is_recorded(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_SERVER_URL": "http://127.0.0.1:9/not-used"}
    out = subprocess.run([sys.executable, "-c", RERUN_AND_FAIL, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.splitlines()[-1])
    first, second, failed = runs["first"], runs["second"], runs["failed"]
    assert first[0]["overrides"] == "eval.k=1" and first[0]["tunegate.status"] == "FINISHED"
    assert "overrides" not in second[0] and second[0]["config.eval.k"] == 1  # an earlier execution's keys do not linger
    assert failed[0]["tunegate.status"] == "FAILED" and any(log.get("tunegate.failed") == 1.0 for log in failed[1])
    assert (tmp_path / "store" / "p.db").is_file()  # the project's store, not the TRACKIO_SERVER_URL of the shell
