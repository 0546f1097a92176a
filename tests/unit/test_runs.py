"""`tunegate runs` and the page header without a model: run folders written by hand (manifests, eval samples)."""

from __future__ import annotations

import json

import pytest

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.core.io import atomic_write_json, atomic_write_jsonl
from tunegate.core.manifest import Manifest, manifest_hash, read_manifest, write_manifest
from tunegate.evals.bootstrap import paired_bootstrap
from tunegate.report import header
from tunegate import runs

from conftest import chat, project_yaml, write_jsonl


@pytest.fixture
def project(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", "a", f"t{i}") for i in range(4)])
    write_jsonl(tmp_path / "golden.jsonl", [chat(f"g{i}", "a", f"g{i}") for i in range(4)])
    (tmp_path / "tunegate.yaml").write_text(project_yaml("p", "smollm2-135m-instruct", train="  method: sft"))
    return load_project(tmp_path / "tunegate.yaml")


def fake_run(project, rid, lr, em, outputs, started="2026-01-01T00:00:00+00:00", overrides=()):
    """A run folder with data, train and eval manifests (train config: learning rate `lr`) and eval samples: row i has
    candidate exact_match em[i] and answer outputs[i]."""
    run = project.runs_dir / rid
    for stage, cfg in (("data", {"data": {"max_length": 64, "sources": [{"path": str(project.root / "train.jsonl")}]}}),
                       ("train", {"train": {"method": "sft", "adapter": "dora", "trl": {"learning_rate": lr}}}),
                       ("eval", {"eval": {"gate": [{"metric": "exact_match", "min": 0.0}]}})):
        (run / stage).mkdir(parents=True)
        upstream = {"data": manifest_hash(run / "data")} if stage != "data" else {}
        write_manifest(run / stage, Manifest(stage=stage, fingerprint="x", config=cfg, upstream=upstream, started_at=started,
                                             wall_s=1.5, verdict="PASS" if stage == "eval" else None,
                                             overrides=list(overrides) if stage == "train" else []))
    rows = [{"id": f"g{i}", "prompt": f"g{i}", "reference": "a", "baseline_output": "", "candidate_output": o,
             "baseline_exact_match": 0.0, "candidate_exact_match": e} for i, (e, o) in enumerate(zip(em, outputs))]
    atomic_write_jsonl(run / "eval" / "samples.jsonl", rows)
    mean = sum(em) / len(em)
    atomic_write_json(run / "eval" / "scores.json", {"headline": "exact_match", "bootstrap_samples": 500, "metrics": {
        "exact_match": {"candidate": {"mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1}}}})
    return run


def test_flatten_gives_dotted_keys_and_indexes_lists_of_dicts():
    got = runs.flatten({"train": {"lora": {"r": 4}, "x": [1, 2]}, "data": {"sources": [{"path": "a"}, {"path": "b"}]}})
    assert got == {"train.lora.r": 4, "train.x": [1, 2], "data.sources.0.path": "a", "data.sources.1.path": "b"}


def test_list_shows_status_method_differing_settings_headline_and_time(project):
    fake_run(project, "r1", 1e-4, [1.0, 0.0, 1.0, 1.0], ["a", "b", "a", "a"], started="2026-01-01T00:00:00+00:00",
             overrides=["--train-anyway"])
    fake_run(project, "r2", 2e-4, [1.0, 1.0, 1.0, 1.0], ["a", "a", "a", "a"], started="2026-01-02T00:00:00+00:00")
    (project.runs_dir / "not a run").mkdir()
    rows = runs.list_runs(project)
    assert [r["run_id"] for r in rows] == ["r1", "r2"]
    r1 = rows[0]
    # hand-written manifests carry no real fingerprint: stale against the project file, with the reason
    states = {s["name"]: s["status"] for s in r1["stages"]}
    assert states == {"data": "stale", "audit": "skipped", "train": "stale", "eval": "stale", "report": "missing", "release": "missing"}
    assert r1["method"] == "sft (dora)" and r1["metric"] == "exact_match" and r1["value"]["mean"] == 0.75
    assert r1["differs"] == {"train.trl.learning_rate": 1e-4} and rows[1]["differs"] == {"train.trl.learning_rate": 2e-4}
    assert r1["verdict"] == "PASS" and r1["total_s"] == 4.5 and r1["overrides"] == ["--train-anyway"]
    assert r1["config"]["data.sources.0.path"] == "train.jsonl"  # relative to the project
    # run.js carries the same statuses for the pages' headers
    js = (project.runs_dir / "r1" / "run.js").read_text()
    data = json.loads(js.split("=", 1)[1].split(";\n", 1)[0])
    assert [s["status"] for s in data["stages"]] == [s["status"] for s in r1["stages"]]
    index = runs.write_index(project, rows).read_text()
    assert 'href="r1/eval/eval.html"' not in index  # no page written there: no link
    assert "train.trl.learning_rate" in index and "0.750 [0.650, 0.850]" in index


def test_compare_gives_config_diff_paired_ci_on_shared_rows_and_changed_rows(project):
    fake_run(project, "a", 1e-4, [1.0, 0.0, 0.0, 1.0], ["a", "b", "c", "a"])
    b = fake_run(project, "b", 2e-4, [1.0, 1.0, 1.0, 1.0], ["a", "a", "a", "a"])
    # b scored one more row, and one of its rows has another prompt: neither is paired
    rows = [json.loads(line) for line in (b / "eval" / "samples.jsonl").read_text().splitlines()]
    rows[3]["prompt"] = "changed"
    rows.append({**rows[0], "id": "g9"})
    atomic_write_jsonl(b / "eval" / "samples.jsonl", rows)
    for run in (project.runs_dir / "a", b):  # sample fields that are no metric (catalog.SAMPLE_FIELDS) are not compared
        rows = [{**json.loads(line), "candidate_confidence": 0.5, "candidate_probability": 0.9, "candidate_generated": "x"}
                for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
        atomic_write_jsonl(run / "eval" / "samples.jsonl", rows)
    r = runs.compare_runs(project, "a", "b", n_samples=500)
    assert r["config"] == [{"key": "train.trl.learning_rate", "a": 1e-4, "b": 2e-4}]
    assert r["n_shared"] == 3 and r["only_a"] == ["g3"] and r["only_b"] == ["g3", "g9"]
    (m,) = r["metrics"]
    assert (m["metric"], m["n"], m["a"], m["b"]) == ("exact_match", 3, 1 / 3, 1.0)
    assert m["delta"] == paired_bootstrap([1.0, 0.0, 0.0], [1.0, 1.0, 1.0], n_samples=500, seed=0).as_dict()
    assert [c["id"] for c in r["changed"]] == ["g1", "g2"] and r["changed"][0]["a_output"] == "b"
    page = runs.write_compare(project, r)
    assert page.name == "compare-a.vs.b.html" and "+0.667" in page.read_text()


def test_compare_recomputes_corpus_metrics_with_a_paired_ci(project):
    """macro_f1 has no per-row score: --compare recomputes it over the shared rows from both runs' answers, as the
    eval gate scores a baseline and a candidate, so its delta has a paired CI instead of none."""
    from tunegate.evals.gate import score_metrics

    refs = ["x", "y", "x", "y"]
    out_a, out_b = ["x", "x", "x", "x"], ["x", "y", "x", "x"]
    for rid, outs in (("a", out_a), ("b", out_b)):
        run = fake_run(project, rid, 1e-4, [1.0] * 4, outs)
        rows = [{**json.loads(line), "reference": r} for line, r in
                zip((run / "eval" / "samples.jsonl").read_text().splitlines(), refs)]
        atomic_write_jsonl(run / "eval" / "samples.jsonl", rows)
        scores = json.loads((run / "eval" / "scores.json").read_text())
        scores["metrics"]["macro_f1"] = {"candidate": {"mean": 0.123, "ci_low": 0.0, "ci_high": 1.0}}
        atomic_write_json(run / "eval" / "scores.json", scores)
    r = runs.compare_runs(project, "a", "b", n_samples=500)
    m = {x["metric"]: x for x in r["metrics"]}["macro_f1"]
    want, _ = score_metrics(["macro_f1"], out_a, out_b, refs, n_samples=500, seed=0)
    # a: x always (F1 x = 2/3, y = 0) -> 1/3; b: one y right (F1 x = 0.8, y = 2/3) -> 0.733
    assert m["n"] == 4 and m["a"] == pytest.approx(1 / 3) and m["b"] == pytest.approx(11 / 15)
    assert m["delta"] == want["macro_f1"]["delta"] and m["delta"]["mean"] == pytest.approx(11 / 15 - 1 / 3)


def test_an_unknown_run_id_names_the_runs_there_are(project):
    fake_run(project, "a", 1e-4, [1.0], ["a"])
    fake_run(project, "b", 1e-4, [1.0], ["a"])
    with pytest.raises(TunegateError, match=r"^--compare zz: no run .*runs/zz; existing runs: a, b$"):
        runs.compare_runs(project, "a", "zz")  # pipeline.existing_run_dir: one rule and message for every verb


def test_header_links_only_existing_pages_relative_to_the_published_folder(project):
    run = fake_run(project, "a", 1e-4, [1.0], ["a"])
    (run / "eval" / "eval.html").write_text("<html></html>")
    partial = run / ".report.partial"
    partial.mkdir()
    h = header.run_header("p", run, partial)
    states = {s["name"]: (s["status"], s["page"]) for s in h["runs"][0]["stages"]}
    assert states["report"] == ("running", None)  # being written: no link until it exists
    assert states["eval"] == ("done", "eval/eval.html") and states["data"] == ("done", None)
    assert h["base"] == ".." and h["run_js"] == "../run.js"
    # an upstream manifest rewritten after a stage was built makes that stage stale
    write_manifest(run / "data", Manifest(stage="data", fingerprint="y", config={}))
    states = {s["name"]: s for s in header.stage_states(run)}
    assert states["train"]["status"] == "stale" and "older data" in states["train"]["why"]


def test_differing_keys_ignore_keys_a_run_lacks():
    rows = [{"config": {"train.lr": 1, "eval.n": 4}}, {"config": {"train.lr": 2, "eval.n": 4}}, {"config": {"eval.n": 4}}]
    assert runs.differing_keys(rows) == ["train.lr"]


def test_a_run_folder_linked_outside_the_project_is_not_listed_nor_written(project, tmp_path_factory):
    fake_run(project, "a", 1e-4, [1.0], ["a"])
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    fake_run(project, "b", 1e-4, [1.0], ["a"])
    (project.runs_dir / "b").rename(elsewhere / "b")
    (project.runs_dir / "b").symlink_to(elsewhere / "b")  # review finding 6: run.js was written into the target
    assert [r["run_id"] for r in runs.list_runs(project)] == ["a"]
    assert not (elsewhere / "b" / "run.js").exists() and (project.runs_dir / "a" / "run.js").is_file()


def test_the_eval_task_is_read_back_from_its_manifest_dump(project):
    """--compare scores corpus metrics with the task the run's eval used: its stage config view holds the full dump
    (defaults included), which reads back as the same section."""
    from tunegate.config import TaskConfig

    for task in (TaskConfig(kind="classification", abstain_label="oos"), TaskConfig(kind="multilabel", separator="; ")):
        run = fake_run(project, f"t{task.kind}", 1e-4, [1.0], ["a"])
        m = read_manifest(run / "eval")
        write_manifest(run / "eval", m.model_copy(update={"config": {**m.config, "task": task.model_dump(mode="json")}}))
        assert runs._eval_task(run, project) == task
    assert runs._eval_task(project.runs_dir / "none", project) is project.task
