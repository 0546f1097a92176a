"""`tracking.mlflow` in the project file (issue 25): off by default, local stores resolve inside the project."""

import pytest

from tunegate import TunegateError, tracking
from tunegate.config import load_project

BASE = "name: p\ndata:\n  sources: [{path: t.jsonl}]\n  golden: {path: g.jsonl}\n"


def _load(tmp_path, extra=""):
    (tmp_path / "tunegate.yaml").write_text(BASE + extra)
    return load_project(tmp_path)


def test_tracking_is_off_by_default_and_the_trainer_reports_nowhere(tmp_path, monkeypatch):
    project = _load(tmp_path)
    monkeypatch.setenv("MLFLOW_RUN_ID", "someone-elses")
    assert project.tracking.mlflow is None and not tracking.enabled(project)
    assert tracking.report_to(project) == "none"


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite:///{root}/mlflow.db"),
    ("sqlite:///sub/../m.db", "sqlite:///{root}/m.db"),
    ("file:mlruns", "file://{root}/mlruns"),
    ("mlruns", "file://{root}/mlruns"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_local_store_uris_resolve_inside_the_project(tmp_path, uri, expected):
    project = _load(tmp_path, f"tracking:\n  mlflow: {{tracking_uri: '{uri}'}}\n")
    assert project.tracking.mlflow.tracking_uri == expected.format(root=tmp_path.resolve())
    assert tracking.experiment_name(project) == "p"


def test_a_relative_store_outside_the_project_is_refused(tmp_path):
    with pytest.raises(TunegateError, match="tracking.mlflow.tracking_uri: .*outside the project folder"):
        _load(tmp_path, "tracking:\n  mlflow: {tracking_uri: 'sqlite:///../elsewhere.db'}\n")


def test_report_to_is_mlflow_only_inside_a_tracked_stage(tmp_path, monkeypatch):
    project = _load(tmp_path, "tracking:\n  mlflow: {experiment: e}\n")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert tracking.report_to(project) == "none"
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    assert tracking.report_to(project) == "none"  # an MLFLOW_RUN_ID left in the shell is not a tracked stage
    monkeypatch.setenv("TUNEGATE_MLFLOW_RUN_ID", "abc")
    assert tracking.report_to(project) == "mlflow"


def test_trackio_store_resolves_inside_the_project_and_the_trainer_logs_into_the_stage_run(tmp_path, monkeypatch):
    project = _load(tmp_path, "tracking:\n  trackio: {}\n")
    assert project.tracking.trackio.dir == tmp_path.resolve() / "trackio" and tracking.trackio_project(project) == "p"
    monkeypatch.delenv("TUNEGATE_TRACKIO_RUN", raising=False)
    assert tracking.trainer_settings(project) == {"report_to": "none"}  # outside a tracked stage
    monkeypatch.setenv("TUNEGATE_TRACKIO_RUN", "r1-train")
    assert tracking.trainer_settings(project) == {"report_to": "trackio", "project": "p", "run_name": "r1-train"}
    both = _load(tmp_path, "tracking:\n  trackio: {project: q}\n  mlflow: {}\n")
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("TUNEGATE_MLFLOW_RUN_ID", "abc")
    assert tracking.trainer_settings(both) == {"report_to": ["mlflow", "trackio"], "project": "q", "run_name": "r1-train"}
    with pytest.raises(TunegateError, match="tracking.trackio.dir: .*outside the project folder"):
        _load(tmp_path, "tracking:\n  trackio: {dir: ../elsewhere}\n")
    with pytest.raises(TunegateError, match="tracking.trackio.dir is the project folder itself"):
        _load(tmp_path, "tracking:\n  trackio: {dir: .}\n")
