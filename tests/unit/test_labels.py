"""Label answers (tunegate.evals.labels): the task section, reading answers as labels, abstention and multi-label
metrics (checked against scikit-learn), the kNN classifiers, and the per-label table."""

import json

import numpy as np
import pytest

from tunegate.config import Project, SourceConfig, TaskConfig
from tunegate.core.stage import config_sections
from tunegate.data.records import read_source
from tunegate.evals.gate import check_rules, corpus_scores, score_metrics
from tunegate.evals.labels import OUTSIDE_LABELS, canonical_answer, label_set, per_label_table
from tunegate.retrieval import knn_classify, knn_multilabel

MULTI = TaskConfig(kind="multilabel")
OOS = TaskConfig(kind="classification", abstain_label="oos")


def project(**extra):
    return Project.model_validate({"name": "p", "data": {"sources": [{"path": "a.jsonl"}], "golden": {"path": "g.jsonl"}}, **extra})


def test_each_task_kind_brings_its_metrics_and_headline_gate():
    assert project().eval.metrics == ["exact_match"] and project().task is None
    multi = project(task={"kind": "multilabel"})
    assert multi.eval.metrics == ["set_match", "label_micro_f1", "label_macro_f1", "jaccard"]
    assert [(r.metric, r.min_delta_ci_low) for r in multi.eval.gate] == [("set_match", 0.0)]
    oos = project(task={"kind": "classification", "abstain_label": "oos"}, eval={"gate": [{"metric": "oos_recall", "min": 0.5}]})
    assert oos.eval.metrics == ["exact_match", "macro_f1", "in_scope_accuracy", "oos_recall", "oos_precision"]
    assert [r.metric for r in oos.eval.gate] == ["oos_recall"]  # the project's own gate is kept
    # without a gate: measurably better than the baseline on the headline and on finding out-of-scope rows
    default = project(task={"kind": "classification", "abstain_label": "oos"}).eval.gate
    assert [(r.metric, r.min_delta_ci_low) for r in default] == [("exact_match", 0.0), ("oos_recall", 0.0)]
    tools = project(task={"kind": "tool_call"}).eval
    assert tools.metrics == ["tool_call"] and [r.metric for r in tools.gate] == ["tool_call"]
    given = project(task={"kind": "multilabel"}, eval={"metrics": ["jaccard"]}).eval
    assert given.metrics == ["jaccard"] and [r.metric for r in given.gate] == ["jaccard"]  # given metrics kept, gated on the first
    # without a task section nothing changes: the default rule stays on exact_match whatever metrics[0] is
    plain = project(eval={"metrics": ["token_f1", "exact_match"]}).eval
    assert [(r.metric, r.min_delta_ci_low) for r in plain.gate] == [("exact_match", 0.0)]
    with pytest.raises(ValueError, match=r"gate rule\(s\) on \['exact_match'\]"):
        project(eval={"metrics": ["token_f1"]})


@pytest.mark.parametrize("extra, message", [
    ({"eval": {"metrics": ["exact_match", "oos_recall"]}}, "need task.kind classification with task.abstain_label"),
    ({"task": {"kind": "classification"}, "eval": {"metrics": ["exact_match", "oos_recall"]}}, "task.abstain_label"),
    ({"task": {"kind": "classification"}, "eval": {"metrics": ["exact_match", "set_match"]}}, "need task.kind multilabel"),
    ({"task": {"kind": "multilabel", "abstain_label": "oos"}}, "abstain_label is for task.kind classification"),
    ({"task": {"kind": "generation", "labels": ["a"]}}, "task.labels is for task.kind classification or multilabel"),
    ({"task": {"kind": "multilabel", "separator": " "}}, "separator must hold a visible character"),
    ({"task": {"kind": "multilabel", "labels": ["a, b"]}}, "holds the separator"),
    ({"task": {"kind": "classification", "labels": ["a", "a"]}}, "each label once"),
    ({"task": {"kind": "multilabel", "none_label": " "}}, "none_label"),
    ({"task": {"kind": "classification", "labels": ["C", "C++", "C#"]}}, "'C' and 'C\\+\\+' are one label"),
    ({"task": {"kind": "multilabel", "labels": ["card", "None"]}}, "holds the none label"),
    ({"task": {"kind": "classification", "abstain_label": " "}}, "a visible label"),
    ({"task": {"kind": "classification", "abstain_label": ""}}, "a visible label"),
    ({"task": {"kind": "classification", "separator": "|"}}, "task.separator is for task.kind multilabel"),
    ({"task": {"kind": "multilabel", "none_label": "no, thing"}}, "none_label"),
    ({"task": {"kind": "sentiment"}}, "kind"),
])
def test_task_settings_that_cannot_hold_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        project(**extra)


@pytest.mark.parametrize("source, message", [
    ({"label_map": {"a": ""}}, "a visible word"),
    ({"label_map": {"a": " oos "}}, "a visible word"),
    ({"label_map": {"Card": "x", "card.": "y"}}, "must differ after normalisation"),
    ({"label_map": {"a": "b"}, "drop_labels": ["B"]}, "both dropped and mapped"),
    ({"label_map": {"a": "b, c"}}, "holds the separator"),
    ({"label_map": {"a": "None"}}, "none label"),
])
def test_label_operations_that_would_break_a_row_are_refused(source, message):
    with pytest.raises(ValueError, match=message):
        Project.model_validate({"name": "p", "task": {"kind": "multilabel"},
                                "data": {"sources": [{"path": "a.jsonl", **source}], "golden": {"path": "g.jsonl"}}})


def test_a_rule_across_sections_names_the_file_without_echoing_the_project(tmp_path):
    from tunegate import TunegateError
    from tunegate.config import load_project

    (tmp_path / "tunegate.yaml").write_text("name: p\ndata: {sources: [{path: a.jsonl}], golden: {path: g.jsonl}}\n"
                                            "eval: {metrics: [exact_match, set_match]}\n")
    with pytest.raises(TunegateError) as err:
        load_project(tmp_path / "tunegate.yaml")
    assert str(err.value) == f"{tmp_path / 'tunegate.yaml'}: eval.metrics ['set_match'] need task.kind multilabel"


def test_labels_the_metrics_would_merge_are_refused_in_the_data(tmp_path):
    from tunegate import TunegateError
    from tunegate.stages.data import _check_labels

    p = project(task={"kind": "classification"})
    rows = [{"id": str(i), "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": lab}]}
            for i, lab in enumerate(["C", "C++", "Card", "card"])]
    with pytest.raises(TunegateError, match="labels 'C' and 'C\\+\\+' are one label to the metrics"):
        _check_labels(p, rows, rows[:1], [])
    _check_labels(p, rows[2:], rows[2:], [])  # 'Card' and 'card': one label spelled two ways, not a collision


def test_label_operations_need_a_label_task_and_a_golden_set_keeps_its_rows():
    with pytest.raises(ValueError, match="need task.kind classification or multilabel"):
        Project.model_validate({"name": "p", "data": {"sources": [{"path": "a.jsonl", "drop_labels": ["x"]}], "golden": {"path": "g.jsonl"}}})
    with pytest.raises(ValueError, match="relabel rows with label_map"):
        Project.model_validate({"name": "p", "task": {"kind": "classification"},
                                "data": {"sources": [{"path": "a.jsonl"}], "golden": {"path": "g.jsonl", "drop_labels": ["x"]}}})


def test_projects_without_a_task_keep_their_stage_fingerprints():
    from tunegate.stages import data as data_stage

    p = project()
    assert "task" not in config_sections("base_model", "task", "eval")(p) and "task" not in data_stage.config(p)
    # the data stage reads rows by kind, labels and spelling only: metrics and the abstain label rerun no data stage
    a = project(task={"kind": "classification"})
    b = project(task={"kind": "classification", "abstain_label": "oos"})
    assert data_stage.config(a) == data_stage.config(b) and data_stage.config(a)["task"]["kind"] == "classification"
    assert data_stage.config(project(task={"kind": "generation"})) == data_stage.config(p)
    assert "drop_labels" not in p.section("data")["sources"][0] and "label_map" not in p.section("data")["sources"][0]
    with_task = project(task={"kind": "multilabel"})
    assert config_sections("base_model", "task", "eval")(with_task)["task"]["kind"] == "multilabel"


def test_multilabel_answers_are_read_order_free_in_one_canonical_form():
    assert canonical_answer(["how", "card", "how"], MULTI) == "card, how"
    assert canonical_answer("how,card", MULTI) == canonical_answer("card ,  how", MULTI) == "card, how"
    assert canonical_answer(None, MULTI) == canonical_answer([], MULTI) == canonical_answer("none", MULTI) == "none"
    assert label_set("Card, HOW.", MULTI) == {"card", "how"} and label_set("none", MULTI) == frozenset()
    # a source answer holding the none label beside labels contradicts itself; scored, the none label is no label
    for contradiction in (["none", "card"], "card, none"):
        with pytest.raises(ValueError, match="the none label 'none' beside other labels"):
            canonical_answer(contradiction, MULTI)
    assert label_set("card, none", MULTI) == {"card"}
    # a list written as text in a cell (JSON, or Python / pandas) is read as the list
    assert canonical_answer('["lost_stolen", "card"]', MULTI) == canonical_answer("['lost_stolen', 'card']", MULTI) == "card, lost_stolen"
    with pytest.raises(ValueError, match="bracketed like a list"):
        canonical_answer("[card; how]", MULTI)
    assert canonical_answer(["Card", "card", "card.", "arrival"], MULTI) == "arrival, Card"
    with pytest.raises(ValueError, match="at most 100"):
        canonical_answer([f"l{i}" for i in range(101)], MULTI)
    for bad, message in (([1, "a"], "holds int"), (["a, b"], "holds the separator"), ({"a": 1}, "got dict")):
        with pytest.raises(ValueError, match=message):
            canonical_answer(bad, MULTI)


def _source(tmp_path, rows, task, **kw):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    src = SourceConfig(path=path, format="csv", prompt_column="text", completion_column="intents", **kw)
    src._task = task
    return read_source(src)


def test_sources_read_label_lists_drop_and_map_labels_and_reject_bad_answers_by_rule(tmp_path):
    rows = [{"text": "lost my card", "intents": ["lost_stolen", "card"]}, {"text": "hello"},
            {"text": "where is my card", "intents": ["card", "arrival"]}, {"text": "x", "intents": [3]},
            {"text": "y", "intents": {"a": 1}}]
    kept, rejected = _source(tmp_path, rows, MULTI, drop_labels=["LOST_STOLEN"], label_map={"arrival": "delivery"})
    assert [r["messages"][-1]["content"] for r in kept] == ["none", "card, delivery"]
    assert [(r.line, r.rule) for r in rejected] == [(1, "dropped_label"), (4, "wrong_type"), (5, "wrong_type")]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["lost", "card"]}]}) + "\n")
    for task, want in ((MULTI, ("card, lost", None)), (OOS, (None, "wrong_type"))):
        src = SourceConfig(path=chat, format="chat")
        src._task = task
        kept, rejected = read_source(src)
        assert ([r["messages"][-1]["content"] for r in kept] or [None])[0] == want[0]  # a list answer: labels, never "lostcard"
        assert ([r.rule for r in rejected] or [None])[0] == want[1]
    oos_rows = [{"text": "a", "intents": " card_arrival "}, {"text": "b", "intents": "Exchange_Rate"}, {"text": "c", "intents": "fee"}]
    kept, rejected = _source(tmp_path, oos_rows, OOS, drop_labels=["fee"], label_map={"exchange_rate": "oos"})
    assert [r["messages"][-1]["content"] for r in kept] == ["card_arrival", "oos"] and [r.rule for r in rejected] == ["dropped_label"]


def test_a_closed_label_set_rejects_answers_outside_it(tmp_path):
    closed = TaskConfig(kind="classification", labels=["card_arrival", "fee"], abstain_label="oos")
    rows = [{"text": "a", "intents": "Card_Arrival"}, {"text": "b", "intents": "oos"}, {"text": "c", "intents": "card_arival"}]
    kept, rejected = _source(tmp_path, rows, closed)
    assert [r["messages"][-1]["content"] for r in kept] == ["card_arrival", "oos"]  # written as task.labels spells it
    assert [(r.line, r.rule) for r in rejected] == [(3, "unknown_label")] and "'card_arival'" in rejected[0].detail


def test_abstention_metrics_follow_their_clinc_definitions():
    refs = ["a", "b", "oos", "oos", "a", "b"]
    pred = ["a", "oos", "oos", "b", "a", "a"]
    summary, per_row = score_metrics(["exact_match", "in_scope_accuracy", "oos_recall", "oos_precision"], refs, pred, refs,
                                     500, 0, task=OOS)
    cand = {m: s["candidate"]["mean"] for m, s in summary.items()}
    assert cand == {"exact_match": 3 / 6, "in_scope_accuracy": 2 / 4, "oos_recall": 1 / 2, "oos_precision": 1 / 2}
    assert summary["oos_recall"]["baseline"]["mean"] == 1.0 and summary["oos_recall"]["delta"]["mean"] == -0.5
    assert "oos_recall" not in per_row  # a ratio over a subset: a corpus statistic with a bootstrap CI
    never = corpus_scores(["oos_recall", "oos_precision"], ["a"] * 6, refs, 500, 0, OOS)
    assert never["oos_recall"]["mean"] == 0.0 and never["oos_precision"]["mean"] == 0.0  # never abstains: 0, not an error
    rules = check_rules(project(task={"kind": "classification", "abstain_label": "oos"},
                                eval={"gate": [{"metric": "oos_recall", "min": 0.6}]}).eval.gate, summary)
    assert [(r["value"], r["passed"]) for r in rules] == [(0.5, False)]
    from tunegate import TunegateError

    with pytest.raises(TunegateError, match="no golden row's reference is the abstain label 'oos'"):
        score_metrics(["oos_recall"], ["a"], ["a"], ["a"], 100, 0, task=OOS)


def test_multilabel_metrics_equal_scikit_learns():
    from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score
    from sklearn.preprocessing import MultiLabelBinarizer

    rng = np.random.default_rng(0)
    labels = ["card", "how", "lost", "fee", "arrival"]
    refs = [", ".join(rng.choice(labels, size=rng.integers(0, 4), replace=False)) or "none" for _ in range(60)]
    pred = [", ".join(rng.choice(labels, size=rng.integers(0, 4), replace=False)) or "none" for _ in range(60)]
    summary, per_row = score_metrics(["set_match", "jaccard", "label_micro_f1", "label_macro_f1", "label_micro_precision",
                                      "label_micro_recall"], refs, pred, refs, 200, 0, task=MULTI)
    mlb = MultiLabelBinarizer(classes=sorted(labels))
    R, P = mlb.fit_transform([label_set(r, MULTI) for r in refs]), mlb.transform([label_set(p, MULTI) for p in pred])
    got = {m: s["candidate"]["mean"] for m, s in summary.items()}
    assert got["label_micro_f1"] == pytest.approx(f1_score(R, P, average="micro"))
    assert got["label_micro_precision"] == pytest.approx(precision_score(R, P, average="micro"))
    assert got["label_micro_recall"] == pytest.approx(recall_score(R, P, average="micro"))
    present = (R.sum(0) + P.sum(0)) > 0
    assert got["label_macro_f1"] == pytest.approx(f1_score(R[:, present], P[:, present], average="macro", zero_division=0))
    assert got["jaccard"] == pytest.approx(jaccard_score(R, P, average="samples", zero_division=1))
    assert got["set_match"] == pytest.approx(np.mean([set(label_set(a, MULTI)) == set(label_set(b, MULTI)) for a, b in zip(pred, refs)]))
    assert len(per_row["set_match"]["candidate"]) == 60 and {m: s["baseline"]["mean"] for m, s in summary.items()} == dict.fromkeys(got, 1.0)
    assert score_metrics(["set_match"], refs, ["how, card"], ["card, how"], 100, 0, task=MULTI)[0]["set_match"]["candidate"]["mean"] == 1.0
    assert score_metrics(["set_match"], ["x"], ["card, none"], ["card"], 100, 0, task=MULTI)[0]["set_match"]["candidate"]["mean"] == 1.0


def test_a_ratio_undefined_in_a_resample_is_left_out_of_its_ci_not_counted_as_zero():
    refs = ["a"] * 497 + ["oos"] * 3
    pred = ["a"] * 494 + ["oos"] * 3 + ["oos"] * 3  # 3 false and 3 true abstentions
    s = corpus_scores(["oos_precision", "oos_recall"], pred, refs, 2000, 0, OOS)
    assert s["oos_precision"]["mean"] == 0.5 and s["oos_recall"]["mean"] == 1.0
    # about 5% of resamples hold no oos row at all: with them counted as 0 the lower end would be 0.0
    assert s["oos_recall"]["ci_low"] == 1.0 and s["oos_recall"]["ci_high"] == 1.0


def test_the_delta_of_a_ratio_undefined_for_the_baseline_has_a_ci():
    """A baseline that never answers oos has oos_precision 0.0 (undefined in every resample): the delta reads that side
    as 0.0 in each resample too, so its CI is the candidate's, not a point at 0."""
    refs = ["a"] * 40 + ["oos"] * 10
    pred = ["a"] * 36 + ["oos"] * 4 + ["oos"] * 6 + ["a"] * 4
    summary, _ = score_metrics(["oos_precision"], ["a"] * 50, pred, refs, 1000, 0, task=OOS)
    d, c = summary["oos_precision"]["delta"], summary["oos_precision"]["candidate"]
    assert d["mean"] == c["mean"] == 0.6
    assert d["ci_low"] < 0.6 < d["ci_high"] and d["ci_low"] > 0.2


def test_knn_classifier_abstains_under_its_threshold_and_multilabel_votes_by_share():
    labels = [["a", "b", "a"], ["b", "b", "a"]]
    sims = np.array([[0.9, 0.8, 0.7], [0.4, 0.3, 0.3]])
    assert knn_classify(labels, sims, 3) == ["a", "b"]
    assert knn_classify(labels, sims, 3, threshold=0.5, abstain="oos") == ["a", "oos"]
    sets = [[frozenset({"card", "how"}), frozenset({"card"}), frozenset({"fee"})]]
    share = np.array([[0.5, 0.3, 0.2]])
    assert knn_multilabel(sets, share, 3, 0.5) == [frozenset({"card", "how"})]  # card 0.8, how 0.5, fee 0.2
    assert knn_multilabel(sets, share, 3, 0.6) == [frozenset({"card"})]
    assert knn_multilabel(sets, share, 1, 0.9) == [frozenset({"card", "how"})]


def test_per_label_table_counts_each_reference_label_and_pools_answers_outside_them():
    refs = ["card, how", "none", "card"]
    table = per_label_table({"baseline": ["blah", "none", "card, xyz"], "candidate": ["card, how", "none", "card"]}, refs, MULTI)
    assert [(r["label"], r["support"]) for r in table] == [("card", 2), ("how", 1), (OUTSIDE_LABELS, 0)]
    assert table[0]["candidate"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "predicted": 2}
    assert table[0]["baseline"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "predicted": 1}
    assert table[-1]["baseline"]["predicted"] == 2 and table[-1]["candidate"]["predicted"] == 0  # "blah" and "xyz"
    single = per_label_table({"candidate": ["a", "oos"]}, ["a", "b"], OOS)
    assert [(r["label"], r["candidate"]["recall"]) for r in single] == [("a", 1.0), ("b", 0.0), (OUTSIDE_LABELS, 0.0)]


def test_the_task_kind_is_inferred_and_a_hint_given_when_the_project_names_none():
    from tunegate.evals.labels import task_summary

    labels = ["card_arrival", "lost_card", "fee"]
    train = [labels[i % 3] for i in range(30)]
    inferred = task_summary(None, train, ["fee", "lost_card"])
    assert inferred["kind"] == "classification" and inferred["labels"] == 3 and "task: {kind: classification}" in inferred["hint"]
    free = task_summary(None, [f"a long free answer number {i} with many words" for i in range(30)], ["x"])
    assert free == {"kind": "generation", "source": "inferred from the answers", "labels": None, "hint": None}
    assert task_summary(None, train, ["something else entirely"] * 3)["kind"] == "generation"  # golden not covered
    given = task_summary(MULTI, ["card, how", "none", "fee"], [])
    assert given == {"kind": "multilabel", "source": "task section", "labels": 3, "hint": None}


def test_new_settings_leave_the_fingerprints_of_existing_projects_alone():
    """The quickstart's audit, train, eval and report config views (what their fingerprints hash) as they were at
    f2b21fa, before task kinds, the classification head and tool calling: a new optional setting must stay out of
    the dump while unset, or every project reruns its audit and training after an upgrade. A deliberate change
    of a view updates these values, and says so in its commit."""
    import hashlib
    from pathlib import Path

    from tunegate.config import load_project
    from tunegate.pipeline import STAGES

    p = load_project(Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "tunegate.yaml")
    got = {s.name: hashlib.sha256(json.dumps(s.config(p), sort_keys=True, default=str).encode()).hexdigest()[:16]
           for s in STAGES if s.name in ("audit", "train", "eval", "report")}
    assert got == {"audit": "06ad447b7f8fdbc7", "train": "b32c20e3144c1f9f", "eval": "030a8ff47b0435b5", "report": "f18c40fa70312923"}


def test_where_label_tasks_meet_the_classification_head_and_tool_rows():
    from tunegate import TunegateError
    from tunegate.data.records import RowError, _label_answer
    from tunegate.recipes.classify import label_set as head_labels
    from tunegate.stages import train as train_stage
    from tunegate.stages.data import _check_golden_defines_metrics

    def rows(*answers):
        return [{"id": str(i), "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]}
                for i, a in enumerate(answers)]

    # the head reads labels as the data stage and the metrics do: one class per label, the abstain label by its key
    assert head_labels(TaskConfig(kind="classification"), rows("Card", "card", "fee")) == ["Card", "fee"]
    trained_oos = TaskConfig(kind="classification", labels=["card", "fee"], abstain_label="oos")
    assert head_labels(trained_oos, rows("card", "fee", "OOS")) == ["card", "fee", "oos"]  # trained: one more class
    assert head_labels(trained_oos, rows("card", "fee")) == ["card", "fee"]  # not trained: answered by threshold
    # the task is part of a classify run's train fingerprint, and of no other method's
    sft = project(task={"kind": "classification", "abstain_label": "oos"})
    head = project(task={"kind": "classification", "abstain_label": "oos"}, train={"method": "classify"})
    assert "task" not in train_stage.config(sft) and train_stage.config(head)["task"]["abstain_label"] == "oos"
    # tool rows hold calls, not labels
    with pytest.raises(ValueError, match="format bfcl holds tool calls, not labels"):
        Project.model_validate({"name": "p", "task": {"kind": "multilabel"},
                                "data": {"sources": [{"path": "a", "format": "bfcl"}], "golden": {"path": "g.jsonl"}}})
    src = SourceConfig(path="a.jsonl")
    with pytest.raises(RowError, match="a tool-call row has no label answer"):
        _label_answer({"id": "1", "tools": [{"type": "function"}], "messages": rows("")[0]["messages"]}, src, MULTI)
    # metric tool_call needs a ground truth in every golden reference: refused before anything is frozen or trained
    with pytest.raises(TunegateError, match="golden row 1: metric tool_call needs a ground truth"):
        _check_golden_defines_metrics(project(task={"kind": "tool_call"}), rows('[{"f": {"a": [1]}}]', "plain text"))
    _check_golden_defines_metrics(project(task={"kind": "tool_call"}), rows('[{"f": {"a": [1]}}]', "[]"))
