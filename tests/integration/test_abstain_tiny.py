"""eval.abstain end to end on the tiny random Llama: a generating candidate abstains (task.abstain_label) when its
answer's confidence is under a threshold tuned on the validation rows; the confidence is what a teacher-forced
forward pass gives (batched, left-padded generation included); the rule is signed into the release, the embedded
server applies it, and vLLM and the merged export refuse it by name."""

import json
import math

import pytest

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.core.io import read_jsonl

TASK = "task: {kind: classification, abstain_label: oos}\n"


@pytest.fixture(scope="module")
def abstaining(tmp_path_factory, tiny_model_dir):
    """The tiny project as an SFT run whose candidate abstains (gamma dropped from training, out of scope in the golden
    set; eval.abstain with val_abstain_rate 0.5), run whole: data, train, eval, report, release."""
    from conftest import hold_out_gamma, make_tiny_project

    from tunegate.pipeline import run_pipeline

    root = make_tiny_project(tmp_path_factory.mktemp("abstain"), tiny_model_dir)
    cfg = hold_out_gamma((root / "tunegate.yaml").read_text(), "  abstain: {val_abstain_rate: 0.5}\n")
    (root / "tunegate.yaml").write_text(cfg + TASK)
    project = load_project(root / "tunegate.yaml", ["data.val_fraction=0.2"])
    run_pipeline(project)
    return root, project, root / "runs" / "default"


def test_the_threshold_is_tuned_on_validation_rows_and_applied_to_the_golden_answers(abstaining):
    _, _, run = abstaining
    rule = json.loads((run / "eval" / "abstain.json").read_text())
    val = read_jsonl(run / "data" / "val.jsonl")
    assert rule["abstain_label"] == "oos" and rule["val_rows"] == len(val) >= 2  # gamma was dropped: all in scope
    assert "val_abstain_rate 0.5" in rule["rule"] and 0 < rule["threshold"] <= 1
    samples = read_jsonl(run / "eval" / "samples.jsonl")
    assert len(samples) == 12
    for s in samples:
        c = s["candidate_confidence"]
        assert 0 < c <= 1
        assert s["candidate_output"] == ("oos" if c < rule["threshold"] else s["candidate_generated"])
    assert rule["golden_rows_abstained"] == sum(s["candidate_confidence"] < rule["threshold"] for s in samples)
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores["abstain"] == rule
    # the base model is the baseline as it is: it never abstains by threshold
    assert all("baseline_confidence" not in s for s in samples) and "baseline_abstain" not in scores
    page = (run / "eval" / "eval.html").read_text()
    assert f"on {rule['golden_rows_abstained']} of 12 golden rows" in page and str(rule["threshold"]) in page


def test_confidences_match_a_teacher_forced_forward_pass(tiny_model_dir):
    """generate(confidences=...) in a batch with left padding gives each answer exp(mean log p) of its tokens through
    the stop token, as one unpadded forward pass over prompt + answer computes it."""
    import torch

    from tunegate.data.format import stop_token_ids
    from tunegate.evals.generate import generate
    from tunegate.models import load_inference_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_inference_model(tiny_model_dir).float()
    prompts = ["a short prompt", "a much longer prompt with many more words in it than the other one has"]
    conf: list[float] = []
    generate(model, tok, prompts, max_new_tokens=5, batch_size=2, confidences=conf)
    stop = stop_token_ids(tok)
    for prompt, got in zip(prompts, conf):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():  # greedy, one token at a time, no padding
            for _ in range(5):
                logits = model(torch.tensor([ids + new])).logits[0, -1].float()
                new.append(int(logits.argmax()))
                if new[-1] in stop:
                    break
            logp = torch.log_softmax(model(torch.tensor([ids + new])).logits[0].float(), -1)
        want = math.exp(sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(new)) / len(new))
        assert got == pytest.approx(want, rel=1e-3)


def test_the_release_signs_the_rule_and_vllm_and_export_refuse_it(abstaining):
    root, project, run = abstaining
    from tunegate.export import merge_run
    from tunegate.release import public_key_for, verify_bundle
    from tunegate.serve.vllm import plan_launch

    bundle = run / "release" / "bundle"
    release = verify_bundle(bundle, public_key_for(project))
    rule = json.loads((run / "eval" / "abstain.json").read_text())
    assert release["abstain"] == rule and json.loads((bundle / "eval" / "abstain.json").read_text()) == rule
    assert not (bundle / "merged").exists() and any("eval.abstain" in r for r in release["vllm"]["reasons"])
    assert f"under {rule['threshold']}" in (bundle / "MODEL_CARD.md").read_text()
    with pytest.raises(TunegateError, match=r"refused for vLLM: the eval gate measured this adapter with eval.abstain"):
        plan_launch(root, "base", {"a": (bundle, release)})
    with pytest.raises(TunegateError, match=r"eval.abstain .*not exported"):
        merge_run(project, run, root / "merged")
    import shutil  # deleting eval/abstain.json does not lift the refusal: the eval manifest records it

    copy = root / "runs" / "copy"
    shutil.copytree(run, copy)
    (copy / "eval" / "abstain.json").unlink()
    with pytest.raises(TunegateError, match=r"its manifest records abstain.json"):
        merge_run(project, copy, root / "merged")
    shutil.rmtree(copy)


def test_the_embedded_server_abstains_as_the_eval_did(abstaining):
    root, project, run = abstaining
    from fastapi.testclient import TestClient

    from tunegate.serve import create_app
    from tunegate.serve import db as servedb

    text = (root / "tunegate.yaml").read_text() + "serve:\n  bundles: [{path: runs/default/release/bundle, name: intents}]\n"
    (root / "tunegate.yaml").write_text(text)
    project = load_project(root / "tunegate.yaml", ["data.val_fraction=0.2"])
    app = create_app(project)
    key = servedb.add_tenant(servedb.connect(servedb.project_url(project)), "acme", ["intents"])
    rule = json.loads((run / "eval" / "abstain.json").read_text())
    samples = read_jsonl(run / "eval" / "samples.jsonl")
    # rows clearly on one side of the threshold (a batched and a single forward pass differ in the last digits; the
    # random tiny model's confidences all lie within ~2% of each other)
    clear = [s for s in samples if abs(s["candidate_confidence"] - rule["threshold"]) > 0.002 * rule["threshold"]]
    assert any(s["candidate_output"] == "oos" for s in clear) and any(s["candidate_output"] != "oos" for s in clear)

    def ask(client, prompt):
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": "intents", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                              "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with TestClient(app) as client:
        engine = app.state.engine
        assert engine.abstainers["intents"] == rule
        for s in clear:
            choice = ask(client, s["prompt"])
            assert (choice["message"]["content"] == "oos") == (s["candidate_output"] == "oos")
        prompt = clear[0]["prompt"]
        engine.abstainers["intents"] = {**rule, "threshold": 1.0}  # every answer is under it
        choice = ask(client, prompt)
        assert choice["message"]["content"] == "oos" and choice["finish_reason"] == "stop"
        engine.abstainers["intents"] = {**rule, "threshold": 1e-30}  # none is
        assert ask(client, prompt)["message"]["content"] != "oos"


def test_the_audit_probe_abstains_with_a_threshold_from_the_dev_rows(tmp_path, tiny_model_dir):
    """eval.abstain: the audit's lora_probe abstains as the eval gate will measure the candidate, its threshold the
    val_abstain_rate quantile of its confidences on the in-scope dev rows (never the golden set)."""
    from conftest import hold_out_gamma, make_tiny_project

    from tunegate.pipeline import run_stage

    root = make_tiny_project(tmp_path, tiny_model_dir)
    cfg = hold_out_gamma((root / "tunegate.yaml").read_text(), "  abstain: {val_abstain_rate: 0.5}\n")
    cfg = cfg.replace("audit:\n  enabled: false", "audit:\n  dev_rows: 10\n  candidates: [zero_shot, lora_probe]\n"
                      "  probe: {max_steps: 2, rows: 20, budget_minutes: 1}\n  answers: {changing_knowledge: 'no'}")
    (root / "tunegate.yaml").write_text(cfg + TASK)
    project = load_project(root / "tunegate.yaml")
    run = root / "runs" / "default"
    run_stage(project, run, "data")
    run_stage(project, run, "audit")
    report = json.loads((run / "audit" / "audit.json").read_text())
    probe = next(c for c in report["candidates"] if c["name"] == "lora_probe")
    assert "abstains under a confidence of" in probe["detail"] and "val_abstain_rate 0.5: that share of the 10 in-scope dev rows" in probe["detail"]
    samples = read_jsonl(run / "audit" / "samples.jsonl")
    # val_abstain_rate 0.5 on 10 dev rows: the threshold is the 6th smallest dev confidence, so some golden answers
    # are oos and some are not (the random tiny model's confidences of all rows lie close together)
    answers = [s["lora_probe"] for s in samples]
    assert "oos" in answers


def test_a_promoted_abstaining_version_abstains_under_the_project_name(abstaining):
    root, project, run = abstaining
    from fastapi.testclient import TestClient

    from tunegate.serve import create_app, production
    from tunegate.serve import db as servedb

    project = load_project(root / "tunegate.yaml", ["data.val_fraction=0.2"])
    production.promote(project, "default")
    app = create_app(project)
    key = servedb.add_tenant(servedb.connect(servedb.project_url(project)), "globex", [project.name])
    rule = json.loads((run / "eval" / "abstain.json").read_text())
    with TestClient(app) as client:
        assert rule in app.state.engine.abstainers.values()  # the production slot carries the bundle's rule
        for slot in [n for n, r in app.state.engine.abstainers.items() if r == rule]:
            app.state.engine.abstainers[slot] = {**rule, "threshold": 1.0}
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": project.name, "messages": [{"role": "user", "content": "golden question 1 on beta"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "oos"  # sampled by default, answered greedily and abstained
