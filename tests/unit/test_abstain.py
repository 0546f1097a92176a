"""tunegate.evals.abstain without a model: the confidence of generated answers from step logits, the tuned threshold,
and the project-file rules of eval.abstain."""

import math

import pytest

from tunegate.evals.abstain import answer_confidences, apply, tune_threshold

from conftest import chat, project_yaml, write_jsonl


def test_confidence_is_the_geometric_mean_probability_through_the_first_stop_token():
    import torch

    # vocabulary of 3; token 2 is the stop token. Row 0: p(1)=0.5, then p(2)=0.8, then padding (not counted).
    # Row 1: no stop token: p(0) = 0.25, 0.25, 0.5: all three count.
    def step(rows):
        return torch.log(torch.tensor(rows, dtype=torch.float32))

    logits = [step([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25]]),
              step([[0.1, 0.1, 0.8], [0.25, 0.5, 0.25]]),
              step([[0.9, 0.05, 0.05], [0.5, 0.25, 0.25]])]
    new = torch.tensor([[1, 2, 2], [0, 0, 0]])
    got = answer_confidences(logits, new, [2])
    assert got[0] == pytest.approx(math.sqrt(0.5 * 0.8))  # the pad after the stop token is left out
    assert got[1] == pytest.approx((0.25 * 0.25 * 0.5) ** (1 / 3))
    assert answer_confidences([], torch.zeros((2, 0), dtype=torch.long), [2]) == [1.0, 1.0]


def test_threshold_quantile_and_apply():
    conf = [0.9, 0.2, 0.5, 0.7]
    assert tune_threshold(conf, 0.5) == 0.7  # two of four rows fall under it
    assert apply(["a", "b", "c", "d"], conf, {"threshold": 0.7, "abstain_label": "oos"}) == ["a", "oos", "oos", "d"]


TASK = "task: {kind: classification, abstain_label: oos}\n"


@pytest.mark.parametrize("train, extra, message", [
    ("  method: sft", "", "eval.abstain is set but task.abstain_label is not"),
    ("  method: sft", TASK, None),
    ("  method: sft", TASK + "release: {gguf: {}}\n", "eval.abstain with release.gguf"),
    ("  method: classify", TASK, "eval.abstain with train.method classify"),
    ("  adapter: full", TASK, "eval.abstain with train.adapter full"),
])
def test_eval_abstain_rules_in_the_project_file(tmp_path, train, extra, message):
    from tunegate.config import load_project

    write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", "a", f"t{i}") for i in range(4)])
    write_jsonl(tmp_path / "golden.jsonl", [chat(f"g{i}", "a", f"g{i}") for i in range(4)])
    body = project_yaml("p", "smollm2-135m-instruct", train=train,
                        eval_="  max_new_tokens: 4\n  abstain: {val_abstain_rate: 0.2}") + extra
    (tmp_path / "tunegate.yaml").write_text(body)
    if message is None:
        assert load_project(tmp_path / "tunegate.yaml").eval.abstain.val_abstain_rate == 0.2
        with pytest.raises(Exception, match="data.val_fraction is 0"):
            load_project(tmp_path / "tunegate.yaml", ["data.val_fraction=0"])
        with pytest.raises(Exception, match="eval.abstain with eval.server"):
            load_project(tmp_path / "tunegate.yaml", ["eval.server.base_url=http://127.0.0.1:9/v1", "eval.server.base_model=b"])
        return
    with pytest.raises(Exception, match=message):
        load_project(tmp_path / "tunegate.yaml")


def test_projects_without_eval_abstain_keep_their_stage_config_views():
    """eval.abstain is left out of the dump when unset: the eval and audit stages of every other project keep the
    fingerprints they had before it existed."""
    from tunegate.config import EvalConfig

    assert "abstain" not in EvalConfig().model_dump(mode="json")
    assert EvalConfig(abstain={"val_abstain_rate": 0.1}).model_dump(mode="json")["abstain"] == {"threshold": None, "val_abstain_rate": 0.1}


def test_vllm_refuses_an_abstaining_bundle_in_every_form(tmp_path):
    """release.json `abstain`: never servable as a LoRA (the registry's preload filter), nor merged."""
    from tunegate.serve.vllm import ABSTAIN_REFUSAL, bundle_refusal, servable_as_lora

    release = {"abstain": {"threshold": 0.5, "abstain_label": "oos"}, "vllm": {"servable_as_lora": True, "reasons": []}}
    assert bundle_refusal(release) == ABSTAIN_REFUSAL and not servable_as_lora(tmp_path, release)
    assert bundle_refusal({"abstain": None}) is None


def test_tuned_rule_takes_in_scope_rows_capped_by_id_hash_or_a_fixed_threshold():
    from types import SimpleNamespace

    from tunegate import TunegateError
    from tunegate.evals.abstain import tuned_rule

    rows = [chat(f"q{i}", "oos" if i % 5 == 0 else "a", f"r{i}") for i in range(50)]  # 10 out of scope
    seen = []

    def conf(rs):
        seen.extend(rs)
        return [0.1 * (i % 10) for i in range(len(rs))]

    rule = tuned_rule(SimpleNamespace(threshold=None, val_abstain_rate=0.5), "oos", rows, conf, "dev rows", max_rows=30)
    assert rule["val_rows"] == 30 and len(seen) == 30 and all(r["messages"][-1]["content"] == "a" for r in seen)
    assert rule["threshold"] == 0.5 and "of the 30 in-scope dev rows" in rule["rule"]
    fixed = tuned_rule(SimpleNamespace(threshold=0.3, val_abstain_rate=0.5), "oos", rows, conf, "dev rows")
    assert fixed["threshold"] == 0.3 and "val_rows" not in fixed
    with pytest.raises(TunegateError, match="no in-scope dev rows"):
        tuned_rule(SimpleNamespace(threshold=None, val_abstain_rate=0.5), "oos", rows[::5], conf, "dev rows")
