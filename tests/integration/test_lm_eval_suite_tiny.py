"""eval.suites.lm_eval: lm-evaluation-harness tasks defined in the project (a task YAML over a local data file),
scored per row for the base model and the candidate on the tiny model, with paired-bootstrap CIs and gate rules."""

import json

import pytest
from conftest import write_jsonl

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

pytest.importorskip("lm_eval")

ARITH = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": i % 3}
         for i, (a, b) in enumerate([(2, 3), (10, 5), (7, 8), (1, 1), (4, 9), (6, 6), (12, 3), (20, 2), (3, 3), (9, 1)])]

MC_TASK = """task: local_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: arith.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """task: local_sum
dataset_path: json
dataset_kwargs:
  data_files:
    test: arith.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _configure(project_dir, gate: str, tasks: str = "[local_arith, local_sum]", include: str = "tasks"):
    write_jsonl(project_dir / "tasks" / "arith.jsonl", ARITH)
    (project_dir / "tasks" / "arith.yaml").write_text(MC_TASK)
    (project_dir / "tasks" / "sum.yaml").write_text(GEN_TASK)
    y = project_dir / "tunegate.yaml"
    y.write_text(y.read_text().replace(
        "  gate: [{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}]",
        f"  suites:\n    lm_eval: {{tasks: {tasks}, include: {include}, batch_size: 4}}\n"
        f"  gate:\n    - {{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}}\n{gate}"))
    return y


def test_local_tasks_are_scored_per_row_with_cis_and_gated(tiny_project, monkeypatch):
    import lm_eval.tasks

    built = []  # lm-eval indexes every task YAML when a TaskManager is made (seconds): once for both systems
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: built.append(1) or real(*a, **k))
    y = _configure(tiny_project, "    - {metric: lm_eval.local_arith.acc, min: 0.0, min_delta_ci_low: -1.0}\n"
                                 "    - {metric: lm_eval.local_sum.exact_match.first-number, max: 1.0}")
    project = load_project(y)
    run_pipeline(project, until="eval")
    eval_dir = tiny_project / "runs" / "default" / "eval"
    metrics = json.loads((eval_dir / "scores.json").read_text())["metrics"]
    arith, summed = metrics["lm_eval.local_arith.acc"], metrics["lm_eval.local_sum.exact_match.first-number"]
    assert set(arith) == set(summed) == {"baseline", "candidate", "delta"}
    suites = json.loads((eval_dir / "suites.json").read_text())["lm_eval"]
    assert suites["n_rows"] == {"lm_eval.local_arith.acc": 10, "lm_eval.local_sum.exact_match.first-number": 10}
    # tunegate's per-row mean is lm-eval's own aggregate, for both systems
    for system in ("baseline", "candidate"):
        assert arith[system]["mean"] == pytest.approx(suites[system]["results"]["local_arith"]["acc,none"])
        assert summed[system]["mean"] == pytest.approx(suites[system]["results"]["local_sum"]["exact_match,first-number"])
    # the rows behind the CIs are in suite_samples.jsonl, one per task row, both systems' scores side by side
    rows = [json.loads(line) for line in (eval_dir / "suite_samples.jsonl").read_text().splitlines()]
    mc = [r for r in rows if r["task"] == "local_arith"]
    assert len(mc) == 10 and {r["id"] for r in mc} == {f"lm_eval:local_arith:{i}:none" for i in range(10)}
    assert sum(r["baseline_acc"] for r in mc) / 10 == pytest.approx(arith["baseline"]["mean"])
    assert all(r["baseline_output"] in (0, 1, 2) and r["target"] == str(ARITH[int(r["id"].split(":")[2])]["answer"]) for r in mc)
    assert all(r["prompt"].startswith("Question: What is ") for r in mc)
    assert len(built) == 1
    verdict = json.loads((eval_dir / "verdict.json").read_text())
    assert verdict["verdict"] == "PASS"
    assert list(dict.fromkeys(r["metric"] for r in verdict["rules"])) == [
        "exact_match", "lm_eval.local_arith.acc", "lm_eval.local_sum.exact_match.first-number"]
    # the eval page lists the suite and its metrics
    html = (eval_dir / "eval.html").read_text()
    assert "lm_eval.local_arith.acc" in html and "local_sum" in html


def test_a_rule_on_a_metric_the_task_does_not_score_fails_before_the_candidate_runs(tiny_project, capsys):
    y = _configure(tiny_project, "    - {metric: lm_eval.local_arith.f1, min: 0.0}", tasks="[local_arith]")
    with pytest.raises(TunegateError, match=r"\['lm_eval.local_arith.f1'\] not scored per row by lm-eval; these are: "
                                            r"lm_eval.local_arith.acc$"):
        run_pipeline(load_project(y), until="eval")
    assert "for the baseline" in capsys.readouterr().err
    assert not (tiny_project / "runs" / "default" / "eval" / "verdict.json").exists()


def test_an_unknown_task_is_named(tiny_project):
    y = _configure(tiny_project, "", tasks="[local_arith, no_such_task_here]")
    with pytest.raises(TunegateError, match=r"\['no_such_task_here'\] not found among lm-eval's tasks or in .*tasks"):
        run_pipeline(load_project(y), until="eval")


def test_task_files_are_in_the_eval_fingerprint(tiny_project):
    from tunegate.stages.evaluate import inputs

    project = load_project(_configure(tiny_project, ""))
    assert set(inputs(project)) == {"lm_eval:arith.jsonl", "lm_eval:arith.yaml", "lm_eval:sum.yaml"}


def test_tunegate_suite_lm_eval_scores_a_base_model_alone(tmp_path, tiny_model_dir):
    from tunegate.evals.suites import run_suite

    write_jsonl(tmp_path / "tasks" / "arith.jsonl", ARITH)
    (tmp_path / "tasks" / "arith.yaml").write_text(MC_TASK)
    details, samples = run_suite("lm_eval", tmp_path / "no-data-root", str(tiny_model_dir), limit=6, batch_size=4,
                                 tasks=["local_arith"], include=tmp_path / "tasks")
    acc = details["metrics"]["lm_eval.local_arith.acc"]
    assert set(acc) == {"baseline"} and acc["baseline"]["mean"] == pytest.approx(details["baseline"]["results"]["local_arith"]["acc,none"])
    assert len(samples) == 6 and details["n_rows"] == {"lm_eval.local_arith.acc": 6}
    with pytest.raises(TunegateError, match=r"lm_eval: .*at least 1 item.* \(--tasks\)"):
        run_suite("lm_eval", tmp_path, str(tiny_model_dir))
    with pytest.raises(TunegateError, match=r"lm_eval: .*task name\(s\) \['../x.yaml'\]: give lm-eval task or group names"):
        run_suite("lm_eval", tmp_path, str(tiny_model_dir), tasks=["../x.yaml"])
    with pytest.raises(TunegateError, match=r"arith.jsonl: not a folder of lm-eval task YAML files \(--include\)"):
        run_suite("lm_eval", tmp_path, str(tiny_model_dir), tasks=["local_arith"], include=tmp_path / "tasks" / "arith.jsonl")


def test_a_rule_whose_direction_contradicts_lm_eval_is_refused(tiny_project):
    y = _configure(tiny_project, "    - {metric: lm_eval.local_arith.acc, max_regression: 0.1, lower_is_better: true}", tasks="[local_arith]")
    with pytest.raises(TunegateError, match=r"lower_is_better: true, but lm-eval says higher is better for it; set lower_is_better: false"):
        run_pipeline(load_project(y), until="eval")
