"""Experiment tracking through MLflow (issue 25): the tiny pipeline reports to a real local MLflow store (SQLite in
tmp_path, no server, no mocks), read back through MlflowClient; a tracker that is down never fails the pipeline."""

import hashlib
import importlib.util
import json

import pytest

from tunegate import tracking
from tunegate.config import load_project
from tunegate.core.manifest import Manifest
from tunegate.pipeline import run_pipeline

pytestmark = pytest.mark.mlflow
mlflow = pytest.importorskip("mlflow", reason='tracking needs: pip install "tunegate[tracking]"')
pytest.importorskip("alembic", reason="MLflow's SQLite store needs alembic (the tracking extra)")


def _track(root, uri):
    with open(root / "tunegate.yaml", "a") as f:
        f.write(f"tracking:\n  mlflow: {{tracking_uri: '{uri}', experiment: tiny-exp}}\n")
    return load_project(root)


def test_tiny_run_is_read_back_from_mlflow(tiny_project):
    from mlflow.tracking import MlflowClient

    project = _track(tiny_project, "sqlite:///mlflow.db")  # relative: inside the project folder
    assert project.tracking.mlflow.tracking_uri == f"sqlite:///{tiny_project / 'mlflow.db'}"
    with_release = importlib.util.find_spec("model_signing") is not None
    manifests = run_pipeline(project, run_id="r1", until="release" if with_release else "report")
    run_dir = project.run_dir("r1")

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-exp")
    assert exp.artifact_location.startswith((tiny_project / "mlartifacts").as_uri())
    parents = client.search_runs([exp.experiment_id], "tags.`tunegate.kind` = 'run' and tags.`tunegate.run_id` = 'r1' "
                                                    "and tags.`tunegate.project` = 'tiny'")
    assert len(parents) == 1
    parent = parents[0]
    tags = parent.data.tags
    assert tags["tunegate.verdict"] == manifests["eval"].verdict == "PASS"
    assert tags["tunegate.config_hash"] == tracking.config_hash(run_dir)
    rules = json.loads((run_dir / "eval" / "verdict.json").read_text())["rules"]
    rule = rules[0]
    assert parent.data.metrics[f"gate.{rule['metric']}.{rule['rule']}.value"] == pytest.approx(rule["value"])
    assert parent.data.metrics[f"gate.{rule['metric']}.{rule['rule']}.passed"] == 1.0
    if with_release:
        files = run_dir / "release" / "bundle" / "files.json"
        assert tags["tunegate.bundle_sha256"] == hashlib.sha256(files.read_bytes()).hexdigest()

    children = {r.data.tags["tunegate.stage"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert set(children) == set(manifests)
    assert all(r.data.tags["tunegate.kind"] == "stage" for r in children.values())
    assert all(r.info.status == "FINISHED" for r in children.values())

    data = children["data"].data
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert data.metrics["data.rows_kept"] == stats["rows_kept"] == 60
    assert data.metrics["data.train_rows"] == stats["train_rows"]

    train = children["train"].data
    assert train.params["config.train.method"] == "sft"  # tunegate's stage config view
    assert float(train.params["learning_rate"]) == pytest.approx(2e-4)  # TrainingArguments, via MLflowCallback
    history = client.get_metric_history(children["train"].info.run_id, "loss")  # TRL's logged training loss
    assert len(history) == 4 and all(m.value > 0 for m in history)

    ev = children["eval"].data
    assert ev.tags["tunegate.verdict"] == "PASS"
    assert ev.metrics[f"gate.{rule['metric']}.{rule['rule']}.value"] == pytest.approx(rule["value"])

    report_files = [f.path for f in client.list_artifacts(children["report"].info.run_id, "report")]
    assert "report/report.html" in report_files
    local = client.download_artifacts(children["report"].info.run_id, "report/report.html", str(tiny_project / "dl"))
    assert open(local).read() == (run_dir / "report" / "report.html").read_text()

    # the same tunegate run again (nothing changed, every stage skipped): still one MLflow run, no new stage runs
    run_pipeline(project, run_id="r1", until="eval")
    assert len(client.search_runs([exp.experiment_id], "tags.`tunegate.run_id` = 'r1'")) == len(children) + 1


def test_a_tracker_that_is_down_does_not_fail_the_run(tiny_project):
    project = _track(tiny_project, "http://127.0.0.1:9")  # nothing listens there
    manifests = run_pipeline(project, run_id="down", until="data")
    assert manifests["data"].metrics  # the stage finished and wrote its manifest
    log = (project.run_dir("down") / "log.txt").read_text()
    assert "tracking: starting the MLflow run for stage data failed, going on without it" in log


def test_audit_candidates_and_rejections_are_logged(tmp_path):
    """The stages the tiny pipeline does not run with an audit: audit.json candidates and data rejection reasons,
    logged by StageRun from hand-written stage files into a real SQLite store."""
    from mlflow.tracking import MlflowClient

    root = tmp_path
    (root / "tunegate.yaml").write_text(
        "name: p\ndata:\n  sources: [{path: t.jsonl}]\n  golden: {path: g.jsonl}\n"
        "tracking:\n  mlflow: {tracking_uri: 'sqlite:///t.db'}\n")
    project = load_project(root)
    run_dir = root / "runs" / "x"
    for stage, name, body in (("data", "stats.json", {"rows_kept": 9, "rows_rejected": 2, "rejected_by_rule": {"empty_answer": 2}}),
                              ("audit", "audit.json", {"candidates": [{"name": "few_shot", "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6,
                                                                       "usd_per_1k_requests": 0.02}],
                                                       "recommendation": {"recommendation": "no_train"}})):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / name).write_text(json.dumps(body))
        with tracking.stage_run(project, run_dir, stage) as tracked:
            pass
        tracked.finish(Manifest(stage=stage, fingerprint="f", config={"k": 1}, wall_s=1.5), run_dir / stage)

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 't.db'}")
    exp = client.get_experiment_by_name("p")  # default experiment: the project name
    runs = {r.data.tags.get("tunegate.stage", "parent"): r.data for r in client.search_runs([exp.experiment_id])}
    assert len(runs) == 3  # one run for the tunegate run, one nested run per stage
    assert runs["data"].metrics["data.rejected.empty_answer"] == 2 and runs["data"].metrics["data.rows_kept"] == 9
    audit = runs["audit"].metrics
    assert (audit["audit.few_shot.mean"], audit["audit.few_shot.ci_low"], audit["audit.few_shot.ci_high"]) == (0.5, 0.4, 0.6)
    assert audit["audit.few_shot.usd_per_1k_requests"] == 0.02
    assert runs["parent"].tags["tunegate.recommendation"] == "no_train"
    assert runs["audit"].params["config.k"] == "1" and runs["audit"].metrics["wall_s"] == 1.5
