"""Label tasks from a project file alone, on the tiny random Llama: out-of-scope classification (a held-out label,
the kNN classifier's tuned abstain threshold, CLINC-style metrics through the gate) and multi-label answers
(JSON label lists read in canonical form, label voting kNN, the eval page's per-label table)."""

import json

import pytest

from tunegate.config import load_project
from tunegate.core.io import read_jsonl
from tunegate.pipeline import run_stage

from conftest import write_jsonl

OOS_TASK = """
task: {kind: classification, abstain_label: oos}
"""


def _configure(root, task: str, metrics: str, sources: str, golden: str):
    cfg = (root / "tunegate.yaml").read_text()
    cfg = cfg.replace("  sources: [{path: train.jsonl, format: chat}]", f"  sources: [{sources}]")
    cfg = cfg.replace("  golden: {path: golden.jsonl, format: chat}", f"  golden: {golden}")
    cfg = cfg.replace("  gate: [{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}]", f"  metrics: {metrics}\n  gate: []")
    cfg = cfg.replace("audit:\n  enabled: false", "audit:\n  dev_rows: 20\n  candidates: [knn_classifier, knn_classifier_abstain]\n  knn_k: [1, 3]")
    (root / "tunegate.yaml").write_text(cfg + task)


def test_held_out_label_becomes_out_of_scope_and_the_knn_classifier_learns_to_abstain(tiny_project):
    _configure(tiny_project, OOS_TASK, "[exact_match, in_scope_accuracy, oos_recall, oos_precision]",
               "{path: train.jsonl, format: chat, drop_labels: [gamma]}", "{path: golden.jsonl, format: chat, label_map: {gamma: oos}}")
    project = load_project(tiny_project / "tunegate.yaml", ["eval.gate=[{metric: oos_recall, min: 0.0}]"])
    run_dir = tiny_project / "runs" / "default"
    run_stage(project, run_dir, "data")
    train = read_jsonl(run_dir / "data" / "train.jsonl") + read_jsonl(run_dir / "data" / "val.jsonl")
    assert len(train) == 40 and {r["messages"][-1]["content"] for r in train} == {"alpha", "beta"}
    rejected = read_jsonl(run_dir / "data" / "rejected.jsonl")
    assert len(rejected) == 20 and {r["rule"] for r in rejected} == {"dropped_label"}  # deliberate: no rejected-fraction stop

    run_stage(project, run_dir, "audit")
    report = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert report["task"] == "classification" and report["labels"] == 3  # alpha, beta and the abstain label
    by = {c["name"]: c for c in report["candidates"]}
    plain, abstain = by["knn_classifier"], by["knn_classifier_abstain"]
    assert plain["other_metrics"]["oos_recall"]["mean"] == 0.0  # a classifier that never abstains finds no oos row
    assert plain["other_metrics"]["in_scope_accuracy"]["mean"] > 0.5
    tuned = abstain["abstain"]
    # no oos row in training: one of the two training labels is hidden as simulated out-of-scope on the dev rows
    assert tuned["protocol"] == "1 training labels hidden as simulated out-of-scope" and tuned["dev_oos_rows"] > 0
    assert tuned["dev_score"] > tuned["dev_score_without"] and 0.0 <= tuned["threshold"] <= 1.0 + 1e-5
    assert abstain["other_metrics"]["oos_recall"]["mean"] > 0.0  # it abstains on the golden set's held-out label
    for m in ("in_scope_accuracy", "oos_recall", "oos_precision"):
        s = abstain["other_metrics"][m]
        assert s["ci_low"] <= s["mean"] <= s["ci_high"]

    run_stage(project, run_dir, "train")
    run_stage(project, run_dir, "eval")
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert set(scores["metrics"]) == {"exact_match", "in_scope_accuracy", "oos_recall", "oos_precision"}
    verdict = json.loads((run_dir / "eval" / "verdict.json").read_text())
    assert [r["metric"] for r in verdict["rules"]] == ["oos_recall"]
    assert [r["label"] for r in scores["per_label"][:3]] == ["alpha", "beta", "oos"] and scores["per_label"][2]["support"] == 4
    assert "<h2>Per label</h2>" in (run_dir / "eval" / "eval.html").read_text()
    from tunegate.report.release_docs import render_release_docs

    card = render_release_docs(run_dir, project)["MODEL_CARD.md"]
    assert "the answer `oos` means the model judged the request to be outside the labels" in card


def test_a_golden_set_without_out_of_scope_rows_is_refused_before_anything_trains(tiny_project):
    from tunegate import TunegateError

    _configure(tiny_project, OOS_TASK, "[exact_match, oos_recall]", "{path: train.jsonl, format: chat, drop_labels: [gamma]}",
               "{path: golden.jsonl, format: chat, label_map: {gamma: out_of_scope}}")  # a typo: no golden row says oos
    project = load_project(tiny_project / "tunegate.yaml", ["eval.gate=[{metric: oos_recall, min: 0.0}]"])
    with pytest.raises(TunegateError, match=r"golden.jsonl: no golden row's reference is the abstain label 'oos'"):
        run_stage(project, tiny_project / "runs" / "default", "data")
    assert not (tiny_project / "runs" / "default" / "data").exists()
    assert not (tiny_project / "golden.lock.json").exists()  # refused before it was frozen: fixing the label_map is enough


def test_multilabel_lists_are_read_canonically_and_scored_as_sets(tiny_project):
    words = ["alpha", "beta", "gamma"]
    sets = [[words[i % 3]] + ([words[(i + 1) % 3]] if i % 2 else []) for i in range(72)]
    write_jsonl(tiny_project / "train_ml.jsonl", [{"id": f"t{i}", "text": f"message {i} about {' and '.join(s)}", "labels": s[::-1]}
                                                  for i, s in enumerate(sets[:60])])
    write_jsonl(tiny_project / "golden_ml.jsonl", [{"id": f"g{i}", "text": f"golden {i} on {' and '.join(s)}", "labels": s}
                                                   for i, s in enumerate(sets[60:])] + [{"id": "g-none", "text": "nothing at all"}])
    source = "{{path: {}, format: csv, prompt_column: text, completion_column: labels}}"
    _configure(tiny_project, "task: {kind: multilabel}\n", "[set_match, label_micro_f1, label_macro_f1, jaccard]",
               source.format("train_ml.jsonl"), source.format("golden_ml.jsonl"))
    project = load_project(tiny_project / "tunegate.yaml")
    run_dir = tiny_project / "runs" / "default"
    run_stage(project, run_dir, "data")
    answers = [r["messages"][-1]["content"] for r in read_jsonl(run_dir / "data" / "train.jsonl")]
    assert "alpha, beta" in answers and "beta, alpha" not in answers  # sorted, whatever order the source wrote

    run_stage(project, run_dir, "audit")
    report = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert report["task"] == "multilabel" and report["metric"] == "set_match" and report["labels"] == 3
    knn = report["candidates"][0]
    assert knn["name"] == "knn_classifier" and set(knn["other_metrics"]) == {"label_micro_f1", "label_macro_f1", "jaccard"}
    samples = read_jsonl(run_dir / "audit" / "samples.jsonl")
    assert samples[-1]["prompt"] == "nothing at all" and samples[-1]["reference"] == "none"  # no labels field: the empty set

    run_stage(project, run_dir, "train")
    run_stage(project, run_dir, "eval")
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert scores["headline"] == "set_match" and {r["label"] for r in scores["per_label"]} >= set(words)
    verdict = json.loads((run_dir / "eval" / "verdict.json").read_text())
    assert verdict["rules"] == [] and verdict["verdict"] == "FAIL"  # `gate: []` given: a gate without rules does not pass
    from tunegate.report.release_docs import render_release_docs

    assert 'a set of labels, written sorted and joined by ", "; "none" means no label applies' in render_release_docs(run_dir, project)["MODEL_CARD.md"]
