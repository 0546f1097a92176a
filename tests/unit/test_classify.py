"""train.method classify without a model: its settings and refusals, the label set, the abstain rule."""

import numpy as np
import pytest

from tunegate import TunegateError
from tunegate.config import TaskConfig, load_project
from tunegate.evals.abstain import tune_threshold
from tunegate.recipes.classify import label_set, predict_labels
from tunegate.recipes.defaults import check_passthrough, lora_kwargs, trl_config_class

from conftest import chat


def _project(tmp_path, tiny_project_factory, *overrides):
    root = tiny_project_factory(tmp_path)
    text = (root / "tunegate.yaml").read_text().replace("train:\n", "train:\n  method: classify\n")
    (root / "tunegate.yaml").write_text(text + "\ntask: {kind: classification, abstain_label: oos}\n")
    return load_project(root / "tunegate.yaml", list(overrides))


def test_classify_trains_a_seq_cls_adapter_with_transformers_trainer(tmp_path, tiny_project_factory):
    project = _project(tmp_path, tiny_project_factory)
    assert lora_kwargs(project)["task_type"] == "SEQ_CLS"
    assert trl_config_class(project).__name__ == "TrainingArguments"
    assert check_passthrough(project) == []
    # the default gate bounds the kind's headline; abstain metrics come with the abstain label
    assert project.eval.metrics[:2] == ["exact_match", "macro_f1"] and "oos_recall" in project.eval.metrics


@pytest.mark.parametrize("overrides, words", [
    (["task.kind=generation", "task.abstain_label=null"], ["train.method classify needs task.kind classification"]),
    (["train.adapter=full", "train.lora={}"], ["method classify with adapter full", "train.adapter"]),
    (["train.adapter=qlora"], ["method classify with adapter qlora"]),
    (["train.added_tokens=[<x>]"], ["train.added_tokens"]),
    (["train.method=sft", "train.classify={abstain_threshold: 0.5}"], ["`classify` is set but method is sft"]),
    (["task.abstain_label=null", "eval.metrics=[exact_match]", "train.classify={abstain_threshold: 0.5}"],
     ["train.classify.abstain_threshold is set but task.abstain_label is not"]),
    (["train.classify={abstain_threshold: 1.5}"], ["abstain_threshold"]),
    (["release.gguf={types: [f16]}"], ["release.gguf with train.method classify"]),
    (["eval.suites={ifeval: true, data_root: .}"], ["eval.suites with train.method classify"]),
])
def test_classify_refuses_what_it_cannot_do_naming_the_setting(tmp_path, tiny_project_factory, overrides, words):
    with pytest.raises(TunegateError) as err:
        _project(tmp_path, tiny_project_factory, *overrides)
    for w in words:
        assert w in str(err.value)


def test_a_task_type_other_than_seq_cls_is_refused(tmp_path, tiny_project_factory):
    project = _project(tmp_path, tiny_project_factory, "train.lora={r: 4, task_type: CAUSAL_LM}")
    assert any("train.lora.task_type" in p and "SEQ_CLS" in p for p in check_passthrough(project))


def test_label_set_is_task_labels_or_the_sorted_training_answers():
    rows = [chat("a", "beta"), chat("b", "alpha"), chat("c", "beta")]
    assert label_set(TaskConfig(kind="classification"), rows) == ["alpha", "beta"]
    assert label_set(TaskConfig(kind="classification", labels=["beta", "alpha", "gamma"]), rows) == ["beta", "alpha", "gamma"]
    # an abstain label no training row holds is answered by threshold, not trained as a class
    assert label_set(TaskConfig(kind="classification", labels=["alpha", "beta", "oos"], abstain_label="oos"), rows) == ["alpha", "beta"]
    # ... but one the training rows hold is one more class
    assert label_set(TaskConfig(kind="classification", abstain_label="oos"), rows + [chat("d", "oos")]) == ["alpha", "beta", "oos"]
    with pytest.raises(TunegateError, match="not in task.labels"):
        label_set(TaskConfig(kind="classification", labels=["alpha", "gamma"]), rows)
    with pytest.raises(TunegateError, match="at least 2 labels"):
        label_set(TaskConfig(kind="classification"), [chat("a", "alpha")])


def test_abstention_by_threshold_answers_the_abstain_label_under_it():
    head = {"labels": ["alpha", "beta"], "abstain_label": "oos", "abstain_threshold": 0.65}
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]], dtype=np.float32)
    labels, top = predict_labels(probs, head)
    assert labels == ["alpha", "oos", "beta"] and top == pytest.approx([0.9, 0.6, 0.7])
    assert predict_labels(probs, {**head, "abstain_label": None})[0] == ["alpha", "beta", "beta"]
    # the tuned threshold: the rate-quantile of in-scope rows' largest probabilities
    top = [0.9, 0.5, 0.8, 0.6, 0.99, 0.7, 0.95, 0.85, 0.75, 0.65]
    assert tune_threshold(top, 0.2) == 0.65
    assert sum(p < tune_threshold(top, 0.2) for p in top) == 2  # two of ten in-scope rows abstain
    assert tune_threshold(top, 0.05) == 0.0  # under one row: never abstain


def test_the_preflight_counts_rows_per_label_and_refuses_a_single_label(tmp_path, tiny_project_factory):
    from tunegate.preflight import MIN_ROWS_PER_LABEL, classify_findings

    project = _project(tmp_path, tiny_project_factory)
    rows = [chat(f"q{i}", "alpha") for i in range(MIN_ROWS_PER_LABEL)] + [chat("q", "beta")]
    findings, per_label = classify_findings(project, rows)
    assert per_label == {"alpha": MIN_ROWS_PER_LABEL, "beta": 1}
    assert [(f.name, f.level) for f in findings] == [("classify_few_rows", "warning")] and "beta 1" in findings[0].message
    findings, _ = classify_findings(project, rows[:1])
    assert [(f.name, f.level) for f in findings] == [("classify_labels", "error")] and "at least 2 labels" in findings[0].message
    assert classify_findings(_project(tmp_path / "sft", tiny_project_factory, "train.method=sft"), rows) == ([], None)
