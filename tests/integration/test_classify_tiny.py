"""train.method classify end to end on the tiny random Llama: a held-out label becomes out of scope, the head and its
labels are saved beside the adapter with a threshold tuned on the validation rows, the eval answers the golden set
in one forward pass (probabilities in the samples) and goes through the gate, the release stage signs a bundle
that verifies (not merged), the embedded server answers a chat completion with the label, and vLLM, export and GGUF
refuse it by name."""

import json

import pytest

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.core.io import read_jsonl

TASK = "task: {kind: classification, abstain_label: oos}\n"


@pytest.fixture(scope="module")
def classified(tmp_path_factory, tiny_model_dir):
    """The tiny project as a classify run (gamma dropped from training, out of scope in the golden set), run whole:
    data, train, eval, report, release."""
    from conftest import hold_out_gamma, make_tiny_project

    from tunegate.pipeline import run_pipeline

    root = make_tiny_project(tmp_path_factory.mktemp("classify"), tiny_model_dir)
    cfg = (root / "tunegate.yaml").read_text()
    cfg = cfg.replace("train:\n", "train:\n  method: classify\n  classify: {val_abstain_rate: 0.5}\n")
    cfg = hold_out_gamma(cfg)
    (root / "tunegate.yaml").write_text(cfg + TASK)
    project = load_project(root / "tunegate.yaml", ["data.val_fraction=0.2"])
    run_pipeline(project)
    return root, project, root / "runs" / "default"


def test_the_head_and_its_labels_are_saved_with_a_threshold_tuned_on_validation_rows(classified):
    _, _, run = classified
    adapter = run / "train" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in cfg["modules_to_save"]
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert any(k.endswith("score.weight") for k in f.keys())  # the trained head travels with the adapter
    head = json.loads((adapter / "tunegate_classify.json").read_text())
    assert head["labels"] == ["alpha", "beta"] and head["abstain_label"] == "oos" and head["max_length"] == 64
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["method"] == "classify" and summary["steps"] == 4
    preflight = json.loads((run / "train" / "preflight.json").read_text())
    assert set(preflight["rows_per_label"]) == {"alpha", "beta"} and preflight["errors"] == 0
    val = read_jsonl(run / "data" / "val.jsonl")
    # val_abstain_rate 0.5: the floor(0.5 n)-th smallest largest probability of the n validation rows
    assert summary["classify"]["val_rows"] == len(val) >= 2
    assert 0.5 <= head["abstain_threshold"] <= 1.0 and "val_abstain_rate 0.5" in head["threshold_rule"]


def test_eval_answers_by_one_forward_pass_with_probabilities_and_abstains_under_the_threshold(classified):
    _, _, run = classified
    head = json.loads((run / "train" / "adapter" / "tunegate_classify.json").read_text())
    samples = read_jsonl(run / "eval" / "samples.jsonl")
    assert len(samples) == 12
    for s in samples:
        p = s["candidate_probability"]
        assert 0.5 <= p <= 1.0  # two labels: the larger probability
        abstained = s["candidate_output"] == "oos"
        assert abstained == (p < head["abstain_threshold"]) and s["candidate_output"] in ("alpha", "beta", "oos")
    assert 0 < sum(s["candidate_output"] == "oos" for s in samples) < len(samples)  # some rows under the threshold
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert set(scores["metrics"]) == {"exact_match", "in_scope_accuracy", "oos_recall", "oos_precision"}
    assert json.loads((run / "eval" / "verdict.json").read_text())["verdict"] == "PASS"


def test_the_release_stage_signs_an_unmerged_bundle_that_verifies(classified):
    root, project, run = classified
    from tunegate.release import public_key_for, verify_bundle

    bundle = run / "release" / "bundle"
    release = verify_bundle(bundle, public_key_for(project))
    assert release["method"] == "classify" and release["classify"]["labels"] == ["alpha", "beta"]
    assert release["vllm"]["merged"] is None and not (bundle / "merged").exists()
    assert any("classification head" in r for r in release["vllm"]["reasons"])
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card


def test_export_and_vllm_refuse_a_classification_head_by_name(classified):
    root, project, run = classified
    from tunegate.export import merge_run
    from tunegate.serve.vllm import plan_launch

    with pytest.raises(TunegateError, match="classification head"):
        merge_run(project, run, root / "merged")
    bundle = run / "release" / "bundle"
    release = json.loads((bundle / "release.json").read_text())
    with pytest.raises(TunegateError, match=r"refused for vLLM: a classification head .*embedded engine"):
        plan_launch(root, "base", {"clf": (bundle, release)})


def test_the_embedded_server_answers_with_the_label(classified, tiny_model_dir):
    root, project, run = classified
    from fastapi.testclient import TestClient

    from tunegate.serve import create_app
    from tunegate.serve import db as servedb

    text = (root / "tunegate.yaml").read_text() + "serve:\n  bundles: [{path: runs/default/release/bundle, name: intents}]\n"
    (root / "tunegate.yaml").write_text(text)
    project = load_project(root / "tunegate.yaml", ["data.val_fraction=0.2"])
    app = create_app(project)
    key = servedb.add_tenant(servedb.connect(servedb.project_url(project)), "acme", ["intents"], allow_base=True)
    head = json.loads((run / "train" / "adapter" / "tunegate_classify.json").read_text())
    golden = {s["prompt"]: s["candidate_output"] for s in read_jsonl(run / "eval" / "samples.jsonl")}
    with TestClient(app) as client:
        for prompt in list(golden)[:3]:
            r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "intents", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1})
            assert r.status_code == 200, r.text
            body = r.json()
            answer = body["choices"][0]["message"]["content"]
            assert answer in head["labels"] + ["oos"]
            assert answer == golden[prompt]  # the label the eval's forward pass gave
            assert body["choices"][0]["finish_reason"] == "stop"
        base = app.state.engine.base_name  # the base model still generates
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": base, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_promoted_classify_version_is_served_under_the_project_name(classified):
    root, project, run = classified
    from fastapi.testclient import TestClient

    from tunegate.serve import create_app, production
    from tunegate.serve import db as servedb

    project = load_project(root / "tunegate.yaml", ["data.val_fraction=0.2"])
    entry = production.promote(project, "default")
    app = create_app(project)
    key = servedb.add_tenant(servedb.connect(servedb.project_url(project)), "globex", [project.name])
    prompt, label = next((s["prompt"], s["candidate_output"]) for s in read_jsonl(run / "eval" / "samples.jsonl"))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": project.name, "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == label
        assert r.headers["X-Tunegate-Adapter-Version"] == f"{project.name}-v{entry['version']}"


def test_the_audit_probes_the_classification_head(tmp_path, tiny_model_dir):
    """train.method classify: the audit's lora_probe trains the head (the dev rows as its validation rows) and scores
    the golden rows with it, next to the kNN classifier; the recommendation follows the closed_label_set answer."""
    from conftest import make_tiny_project

    from tunegate.pipeline import run_stage

    root = make_tiny_project(tmp_path, tiny_model_dir)
    cfg = (root / "tunegate.yaml").read_text().replace("train:\n", "train:\n  method: classify\n")
    cfg = cfg.replace("audit:\n  enabled: false", "audit:\n  dev_rows: 12\n  candidates: [knn_classifier, lora_probe]\n"
                      "  knn_k: [1, 3]\n  probe: {max_steps: 2, rows: 30, budget_minutes: 1}\n"
                      "  answers: {changing_knowledge: 'no', verifier: 'no', preference: none, demonstrations: closed_label_set}")
    (root / "tunegate.yaml").write_text(cfg + "task: {kind: classification}\n")
    project = load_project(root / "tunegate.yaml")
    run = root / "runs" / "default"
    run_stage(project, run, "data")
    run_stage(project, run, "audit")
    report = json.loads((run / "audit" / "audit.json").read_text())
    probe = next(c for c in report["candidates"] if c["name"] == "lora_probe")
    assert probe["trains"] and probe["method"] == "classify" and "classification-head probe: 2 steps on 30 rows" in probe["detail"]
    assert 0.0 <= probe["mean"] <= 1.0
    head = json.loads((run / "audit" / "probe" / ".train.partial" / "adapter" / "tunegate_classify.json").read_text())
    assert head["labels"] == ["alpha", "beta", "gamma"]
    summary = json.loads((run / "audit" / "probe" / ".train.partial" / "train_summary.json").read_text())
    assert summary["method"] == "classify" and summary["classify"]["val_rows"] == 12  # the dev rows
    assert report["recommendation"]["decision"]["method"] in ("classify", "prompt_optimization")
