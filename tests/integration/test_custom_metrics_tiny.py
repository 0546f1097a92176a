"""Project-defined eval metrics (issue 21, item 6): `eval.custom_metrics` names a function in a file of the project;
it is scored per golden row with the same bootstrap CIs and gate rules as the built-ins, and its file's sha256 is
an eval input (editing it reruns the eval)."""

import json

import numpy as np
import pytest
from conftest import project_yaml

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.pipeline import run_pipeline, stale_reason

METRIC = '''
import numpy as np


def answer_length(prediction, reference):
    """The answer's length in characters over 100, capped at 1 (numpy scalars are numbers too)."""
    return np.float32(min(len(prediction), 100) / 100)
'''


def _project(root, tiny_model_dir, metric_file="metrics.py:answer_length", gate="{metric: answer_length, max: 1.0}"):
    from conftest import chat, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", [chat(f"message {i}", ["alpha", "beta"][i % 2], f"t{i}") for i in range(24)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden {i}", ["alpha", "beta"][i % 2], f"g{i}") for i in range(8)])
    (root / "metrics.py").write_text(METRIC)
    text = project_yaml("tiny", tiny_model_dir, train="  trl: {max_steps: 1, per_device_train_batch_size: 4, save_steps: 1, logging_steps: 1, warmup_steps: 0}",
                        eval_=f"  max_new_tokens: 4\n  batch_size: 8\n  bootstrap_samples: 200\n  metrics: [exact_match, answer_length]\n"
                              f"  custom_metrics: {{answer_length: '{metric_file}'}}")
    text = text.replace("  gate: [{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}]",
                        f"  gate: [{{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}}, {gate}]")
    (root / "tunegate.yaml").write_text(text)
    return root


def test_a_project_metric_is_scored_gated_and_fingerprinted(tmp_path, tiny_model_dir):
    root = _project(tmp_path, tiny_model_dir)
    project = load_project(root / "tunegate.yaml")
    manifests = run_pipeline(project, until="eval")
    run_dir = project.run_dir("default")
    samples = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())["metrics"]["answer_length"]
    per_row = [float(np.float32(min(len(s["candidate_output"]), 100) / 100)) for s in samples]
    expected = sum(per_row) / len(samples)
    assert scores["candidate"]["mean"] == pytest.approx(expected) and [s["candidate_answer_length"] for s in samples] == per_row
    assert scores["candidate"]["ci_low"] <= expected <= scores["candidate"]["ci_high"]
    rules = json.loads((run_dir / "eval" / "verdict.json").read_text())["rules"]
    assert (rules[-1]["metric"], rules[-1]["rule"], rules[-1]["passed"]) == ("answer_length", "max", True)
    assert manifests["eval"].verdict == "PASS"
    assert any(k.endswith("metrics.py") for k in manifests["eval"].inputs)

    assert stale_reason(project, run_dir, "eval") is None
    (root / "metrics.py").write_text(METRIC.replace("/ 100)", "/ 200)"))
    assert stale_reason(load_project(root / "tunegate.yaml"), run_dir, "eval") is not None  # its code decides scores


def test_a_project_metric_must_live_in_the_project_and_return_numbers(tmp_path, tiny_model_dir):
    with pytest.raises(TunegateError, match="eval.custom_metrics.answer_length: .*outside the project folder"):
        load_project(_project(tmp_path / "a", tiny_model_dir, metric_file="../elsewhere.py:f") / "tunegate.yaml")
    root = _project(tmp_path / "b", tiny_model_dir)
    for body, message in (("return float('nan')", r"row 0: returned nan; rule: a metric returns a number in \[0, 1\]"),
                          ("return 3.0", r"row 0: returned 3.0; rule"),
                          ("return {}['x']", r"row 0: the metric raised KeyError: 'x'")):
        (root / "metrics.py").write_text(f"def answer_length(prediction, reference):\n    {body}\n")
        with pytest.raises(TunegateError, match=f"eval.custom_metrics.answer_length: {message}"):
            run_pipeline(load_project(root / "tunegate.yaml"), until="eval")
    # a function that cannot take (prediction, reference) is refused before anything is generated
    (root / "metrics.py").write_text("def answer_length(prediction):\n    return 1.0\n")
    with pytest.raises(TunegateError, match=r"metrics.py: answer_length must take \(prediction, reference\)"):
        run_pipeline(load_project(root / "tunegate.yaml"), until="eval")
