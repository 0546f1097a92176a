"""The audit stage on a tiny random Llama: every candidate, the recommendation, and the stop before training."""

import json
import subprocess
import sys

import pytest

from tunegate import EXIT_AUDIT_NO_TRAIN
from tunegate.config import load_project
from tunegate.core.io import read_jsonl
from tunegate.core.manifest import read_manifest
from tunegate.pipeline import AuditSaysNoTrain, run_pipeline, run_stage

from conftest import write_jsonl

AUDIT = """
audit:
  dev_rows: 10
  shots: [0, 2]
  corpus: {path: corpus.jsonl}
  probe: {max_steps: 2, rows: 20}
"""


@pytest.fixture
def audit_project(tiny_project):
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(tiny_project / "corpus.jsonl", [{"id": f"d{j}", "text": f"All about the {lab} topic, described at length."} for j, lab in enumerate(labels)])
    golden = read_jsonl(tiny_project / "golden.jsonl")
    for i, g in enumerate(golden):
        g["doc_id"] = f"d{i % 3}"  # a top-level key lands in meta: the gold passage for recall@k
    write_jsonl(tiny_project / "golden.jsonl", golden)
    cfg = (tiny_project / "tunegate.yaml").read_text().replace("audit:\n  enabled: false", AUDIT.strip())
    cfg = cfg.replace("min: 0.0, min_delta_ci_low", "min: 0.5, min_delta_ci_low")  # the bar
    (tiny_project / "tunegate.yaml").write_text(cfg)
    return tiny_project


def test_audit_scores_every_candidate_and_recommends_one_method(audit_project):
    project = load_project(audit_project / "tunegate.yaml", ["eval.metrics=[exact_match, chrf]"])
    run_dir = audit_project / "runs" / "default"
    run_stage(project, run_dir, "data")
    m = run_stage(project, run_dir, "audit")
    out = run_dir / "audit"
    report = json.loads((out / "audit.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    assert names == ["zero_shot", "prompt_optimization", "knn_fewshot", "knn_classifier", "rag_bm25", "rag_dense", "rag_hybrid",
                     "lora_probe", "lora_probe+rag"]
    assert report["task"] == "classification" and report["labels"] == 3 and report["bar"] == 0.5
    by = {c["name"]: c for c in report["candidates"]}
    # the tiny random model cannot answer; the kNN classifier needs no LLM and gets every golden row right
    assert by["zero_shot"]["mean"] == 0.0
    assert by["knn_classifier"]["mean"] == 1.0 and by["knn_classifier"]["prompt_tokens_per_request"] == 0
    for c in report["candidates"]:
        assert c["ci_low"] <= c["mean"] <= c["ci_high"]
        assert c["seconds_per_request"] > 0 and c["usd_per_1k_requests"] > 0
    assert by["lora_probe"]["trains"] and by["lora_probe"]["training_usd"] > 0
    # the full run (max_steps 4) extrapolated from the probe's measured tokens/s
    assert 0 < report["probe"]["full_run_estimated_s"] < 60
    assert report["probe"]["full_run_assumes"] == {"max_steps": 4, "budget_minutes": None}  # what the projection assumed
    assert "for train max_steps 4)" in report["recommendation"]["cost_of_being_wrong"]["train_when_it_does_not_pay"]
    assert "<code>max_steps</code> 4" in (out / "audit.html").read_text()
    chrf = by["knn_classifier"]["other_metrics"]["chrf"]  # the project's other metrics are reported beside the headline
    assert set(by["zero_shot"]["other_metrics"]) == {"chrf"} and chrf["mean"] == 1.0
    assert report["probe"]["steps"] == 2 and report["probe"]["rows"] == 20
    # every golden question's gold passage names its topic: all three retrievers find it first
    assert report["retrieval"]["gold_known"] == 12
    assert report["retrieval"]["recall"]["rag_bm25"]["@1"] == 1.0
    # the decision: a no-training candidate meets the bar, so training does not pay
    rec = report["recommendation"]
    assert m.verdict == rec["verdict"] == "NO_TRAIN"
    assert rec["decision"]["method"] == "prompt_optimization" and rec["best_no_training"]["name"] == "knn_classifier"
    assert rec["gap"]["ci_high"] < 0
    assert set(rec["cost_of_being_wrong"]) == {"train_when_it_does_not_pay", "skip_training_when_it_would_pay"}
    # prompt search used dev rows from the training split only, never the golden set
    search = json.loads((out / "prompt_search.json").read_text())
    assert len(search) == 2 * 2  # (project's prompt, label-list prompt) x (0, 2 shots)
    assert [len(s["shot_ids"]) for s in search] == [0, 2, 0, 2]
    golden_ids = {g["id"] for g in read_jsonl(run_dir / "data" / "golden.jsonl")}
    assert not {i for s in search for i in s["shot_ids"]} & golden_ids
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 12 and all("knn_classifier" in s and "lora_probe_exact_match" in s for s in samples)
    html = (out / "audit.html").read_text()
    assert "NO_TRAIN" in html and "data:image/png;base64," in html and "knn_classifier" in html
    # the project checked against the preflight's anti-pattern table, every rule with its result (the rules: test_preflight)
    table = {a["name"]: a for a in report["anti_patterns"]}
    assert len(table) == 10 and table["no_feedback_capture"]["found"] and not table["small_data_high_rank"]["found"]
    assert "found (warning)" in html and "no_feedback_capture" in html
    assert (out / "probe" / ".train.partial" / "adapter" / "adapter_config.json").is_file()  # the probe's adapter is kept


def test_run_stops_before_training_on_no_train_and_records_an_override(audit_project):
    cfg = (audit_project / "tunegate.yaml").read_text().replace("  probe: {max_steps: 2, rows: 20}", "  probe: null\n  candidates: [zero_shot, knn_classifier]")
    (audit_project / "tunegate.yaml").write_text(cfg)
    project = load_project(audit_project / "tunegate.yaml")
    run_dir = audit_project / "runs" / "default"
    with pytest.raises(AuditSaysNoTrain, match=r"audit\.html: training does not pay .*knn_classifier 1\.000.*--train-anyway") as err:
        run_pipeline(project)
    assert err.value.exit_code == EXIT_AUDIT_NO_TRAIN == 4
    assert not (run_dir / "train").exists() and (run_dir / "audit" / "manifest.json").is_file()

    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "train", str(audit_project / "tunegate.yaml")], capture_output=True, text=True)
    assert r.returncode == 4 and "training does not pay" in r.stderr

    manifests = run_pipeline(project, train_anyway=True)
    overrides = read_manifest(run_dir / "train").overrides
    assert len(overrides) == 1 and "--train-anyway" in overrides[0] and "NO_TRAIN" in overrides[0]
    assert manifests["eval"].verdict in ("PASS", "FAIL")


def test_audit_disabled_goes_straight_to_training(tiny_project):
    manifests = run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="train")
    assert "audit" not in manifests and "train" in manifests


def test_unknown_audit_settings_are_named(audit_project):
    from tunegate import TunegateError

    with pytest.raises(TunegateError, match=r"audit.candidates.*unknown audit candidate\(s\) \['gpt4'\]"):
        load_project(audit_project / "tunegate.yaml", ["audit.candidates=[gpt4]"])
    with pytest.raises(TunegateError, match=r"answer 'maybe' to verifier is not one of yes, no"):
        load_project(audit_project / "tunegate.yaml", ["audit.answers.verifier=maybe"])


def test_validate_checks_the_audit_corpus_and_price_table(audit_project):
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "validate", str(audit_project / "tunegate.yaml"),
                        "audit.corpus.path=nope.jsonl", "audit.prices=none.yaml"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "audit.corpus.path:" in r.stderr and "nope.jsonl not found" in r.stderr
    assert "audit.prices:" in r.stderr and "price table not found" in r.stderr
