"""tunegate.evals.harness: which of lm-eval's logged per-row values count as per-row scores, for tasks, groups,
tags and lm-eval's older result shape (no model: hand-made results in lm-eval's shapes)."""

import pytest

from tunegate import TunegateError
from tunegate.evals.harness import higher_is_better, leaves, per_row_scores


def _samples(task, metric, values, filt="none"):
    return [{"doc_id": i, "filter": filt, "metrics": [metric], metric: v} for i, v in enumerate(values)]


def test_a_plain_task_listed_with_no_subtasks_is_its_own_leaf():
    # lm-eval before 0.4.13 lists every task in group_subtasks, a plain task with []
    out = {"group_subtasks": {"arith": []}, "samples": {"arith": _samples("arith", "acc", [1, 0, 1, 1])},
           "results": {"arith": {"acc,none": 0.75}}}
    scores, corpus = per_row_scores(out, ["arith"])
    assert scores == {"lm_eval.arith.acc": {("arith", 0): 1.0, ("arith", 1): 0.0, ("arith", 2): 1.0, ("arith", 3): 1.0}}
    assert corpus == {}


def test_groups_pool_their_subtasks_and_tags_their_member_tasks():
    out = {"group_subtasks": {"g": ["a", "b"]},
           "samples": {"a": _samples("a", "acc", [1, 0]), "b": _samples("b", "acc", [1])},
           "results": {"a": {"acc,none": 0.5}, "b": {"acc,none": 1.0}}}
    assert leaves("g", out["group_subtasks"]) == ["a", "b"]
    scores, _ = per_row_scores(out, ["g"])
    assert scores["lm_eval.g.acc"] == {("a", 0): 1.0, ("a", 1): 0.0, ("b", 0): 1.0}  # same doc_id 0 in two leaves: two rows
    # a tag is expanded by lm-eval with no group logged for it: its members come from the task index
    scores, _ = per_row_scores({**out, "group_subtasks": {}}, ["t"], tags={"t": ["a", "b"]})
    assert len(scores["lm_eval.t.acc"]) == 3
    with pytest.raises(TunegateError, match=r"'t' logged no rows \(tasks looked for: t\)"):
        per_row_scores({**out, "group_subtasks": {}}, ["t"])


def test_a_per_row_number_that_is_not_averaged_is_not_a_per_row_score():
    # loglikelihood tasks log each row's log-likelihood as `perplexity` and aggregate it as exp(-mean)
    samples = [{"doc_id": i, "filter": "none", "metrics": ["perplexity", "acc"], "perplexity": ll, "acc": a}
               for i, (ll, a) in enumerate([(-2.0, 1), (-4.0, 0)])]
    out = {"samples": {"lambada": samples}, "results": {"lambada": {"perplexity,none": 20.09, "acc,none": 0.5}},
           "higher_is_better": {"lambada": {"perplexity": False, "acc": True}}}
    scores, corpus = per_row_scores(out, ["lambada"])
    assert list(scores) == ["lm_eval.lambada.acc"] and corpus == {"lambada": ["lm_eval.lambada.perplexity"]}
    assert higher_is_better(out, ["lambada"]) == {"lm_eval.lambada.perplexity": False, "lm_eval.lambada.acc": True}


def test_filters_name_their_own_metrics():
    out = {"samples": {"gsm": _samples("gsm", "exact_match", [0, 1], "strict-match") + _samples("gsm", "exact_match", [1, 1], "flexible-extract")},
           "results": {"gsm": {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 1.0}}}
    scores, _ = per_row_scores(out, ["gsm"])
    assert sorted(scores) == ["lm_eval.gsm.exact_match.flexible-extract", "lm_eval.gsm.exact_match.strict-match"]
