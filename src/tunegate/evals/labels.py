"""Label answers: closed-label classification with an abstain (out-of-scope) label, and multi-label answers.

A project's `task` section (config.TaskConfig) says what its answers are. This module reads answers as labels
and scores them; `tunegate.evals.gate.score_metrics` calls it for the metrics below, so they get the same
bootstrap CIs, paired deltas and gate rules as every golden-set metric.

Classification with `abstain_label` (the CLINC150 protocol, Larson et al. 2019, "An Evaluation Dataset for
Intent Classification and Out-of-Scope Prediction"):
    in_scope_accuracy  accuracy on the rows whose reference is an in-scope label (abstaining on one is wrong)
    oos_recall         of the rows whose reference is the abstain label, the fraction answered with it
    oos_precision      of the rows answered with the abstain label, the fraction whose reference is it
    (overall accuracy is `exact_match`). A ratio with an empty denominator is 0.0 (a system that never abstains
    has oos_recall and oos_precision 0.0), as scikit-learn's zero_division=0; bootstrap resamples where it is
    undefined are left out of its CI.

Multi-label (answers are label sets; order never matters):
    set_match              1.0 when the answer's label set equals the reference's (row metric)
    jaccard                |A & R| / |A | R| per row, 1.0 when both are empty (row metric; sample-based Jaccard)
    label_micro_precision  sum over labels of TP / (TP + FP)
    label_micro_recall     sum over labels of TP / (TP + FN)
    label_micro_f1         2 TP / (2 TP + FP + FN), summed over labels
    label_macro_f1         unweighted mean of per-label F1 over the labels of the references and answers (an
                           answer's label that no reference has counts, with F1 0: scikit-learn's labels=None)
These are the standard multi-label measures (Tsoumakas & Katakis 2007; scikit-learn's `average="micro"` /
`"macro"` / `"samples"`), as NLU++ reports them (Casanueva et al. 2022).

Labels are compared after `tunegate.evals.metrics.normalize_answer` (case, spaces, edge punctuation).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from tunegate.evals.metrics import normalize_answer


# ---- reading answers as labels ------------------------------------------------------------------------------

MAX_LABELS_PER_ANSWER = 100  # a source answer with more labels than this is refused (a list, not a label set)


class LabelError(ValueError):
    """A source answer that cannot be read as labels; `rule` names the row rule it breaks (wrong_type, label_syntax)."""

    def __init__(self, rule: str, detail: str):
        super().__init__(detail)
        self.rule = rule


def written_list(text: str) -> list[Any] | None:
    """A list written as text in a cell ('["card", "how"]' as JSON, "['card', 'how']" as Python or pandas write
    it): the list, else None (not bracketed). Raises LabelError (label_syntax) for a bracketed text that is neither."""
    import ast
    import json

    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(stripped)
        except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError):
            continue
        if isinstance(value, list):
            return value
    raise LabelError("label_syntax", f"{stripped[:60]!r} is bracketed like a list but is neither JSON nor a Python list")


def label_set(answer: str, task) -> frozenset[str]:
    """A multi-label answer as its set of normalised labels: 'Card, how' -> {'card', 'how'}. The task's
    `none_label` is no label ('card, none' -> {'card'}; 'none' or an empty answer -> the empty set). Splits on
    `task.separator` stripped of spaces."""
    parts = {normalize_answer(p) for p in answer.split(task.separator.strip())}
    return frozenset(parts - {"", normalize_answer(task.none_label)})


def canonical_labels(labels: Iterable[str], task) -> str:
    """A label set written the one way training and references use: each label once (labels equal after
    `normalize_answer` are one label, written as first given, trimmed), sorted by that normalised form, joined
    by `task.separator`; without labels (or only the none label) it is `task.none_label`."""
    none = normalize_answer(task.none_label)
    first: dict[str, str] = {}
    for label in labels:
        key = normalize_answer(str(label))
        if key and key != none:
            first.setdefault(key, str(label).strip())
    return task.separator.join(first[k] for k in sorted(first)) if first else task.none_label


def canonical_answer(value: Any, task) -> str:
    """A source's multi-label answer in canonical form (`canonical_labels`): a JSON list of labels, a list written
    as text ('["card", "how"]', `written_list`), a written set ('card, how'), or null / missing = the empty set.

    Raises LabelError: rule wrong_type for a number, an object or a list holding a non-string; rule label_syntax
    for a label holding the separator, the none label beside other labels, more than MAX_LABELS_PER_ANSWER
    labels, or bracketed text that is no list."""
    sep = task.separator.strip()
    if value is None:
        return task.none_label
    if isinstance(value, str):
        parsed = written_list(value)  # a bracketed cell is parsed once
        value = value if parsed is None else parsed
    if isinstance(value, str):
        labels = [p for p in value.split(sep)]
    elif isinstance(value, (list, tuple)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise LabelError("wrong_type", f"a label list holds {type(bad[0]).__name__} {bad[0]!r}; labels are strings")
        split = [v for v in value if sep in v]
        if split:
            raise LabelError("label_syntax", f"label {split[0]!r} holds the separator {sep!r} (task.separator)")
        labels = list(value)
    else:
        raise LabelError("wrong_type", f"a multi-label answer is a list of labels or a string, got {type(value).__name__}")
    if len(labels) > MAX_LABELS_PER_ANSWER:
        raise LabelError("label_syntax", f"{len(labels)} labels in one answer; at most {MAX_LABELS_PER_ANSWER}")
    none = normalize_answer(task.none_label)
    keys = {normalize_answer(label) for label in labels} - {""}
    if none in keys and len(keys) > 1:
        raise LabelError("label_syntax", f"the none label {task.none_label!r} beside other labels ({sorted(keys - {none})[:3]}): "
                         "an answer is either no label or labels")
    return canonical_labels(labels, task)


def label_collisions(labels: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of distinct labels the metrics would read as one: equal after `normalize_answer` (which strips edge
    punctuation: 'C' and 'C++', '-1' and '+1') but not after case and spaces alone (those are spellings of one
    label, 'Card' and 'card')."""
    by_key: dict[str, str] = {}
    out = []
    for label in sorted(set(labels)):
        spelling = " ".join(label.split()).casefold()
        key = normalize_answer(label)
        if key in by_key and " ".join(by_key[key].split()).casefold() != spelling:
            out.append((by_key[key], label))
        by_key.setdefault(key, label)
    return out


def closed_label_set(train_answers: Sequence[str], golden_answers: Sequence[str]) -> list[str] | None:
    """The labels when answers look like closed-set classification without a `task` section saying so: few
    distinct short answers (at most max(2, min(200, N/5)), none over 6 words) that cover 90% of the golden
    answers; else None (free generation)."""
    labels = sorted(set(train_answers))
    if len(labels) > max(2, min(200, len(train_answers) // 5)) or any(len(x.split()) > 6 for x in labels):
        return None
    covered = sum(g in set(labels) for g in golden_answers) / max(len(golden_answers), 1)
    return labels if covered >= 0.9 else None


def task_summary(task, train_answers: Sequence[str], golden_answers: Sequence[str]) -> dict[str, Any]:
    """What the data stage prints and records about the task: {kind, source, labels, hint}. With a `task`
    section it is that kind ("task section"), labels counting the abstain label as the audit's label list does;
    without one the kind is inferred from the answers (generation, or classification when `closed_label_set`
    finds one), with a hint of what `task.kind` would add."""
    if task is not None and task.kind in ("classification", "multilabel"):
        if task.labels:
            labels = {normalize_answer(label) for label in task.labels}
        elif task.kind == "multilabel":
            labels = set().union(*(label_set(a, task) for a in train_answers))
        else:
            labels = {normalize_answer(a) for a in train_answers}
        if task.abstain_label:  # counted as an answer the model may give, trained on or not
            labels.add(normalize_answer(task.abstain_label))
        return {"kind": task.kind, "source": "task section", "labels": len(labels), "hint": None}
    if task is not None:
        return {"kind": task.kind, "source": "task section", "labels": None, "hint": None}
    labels = closed_label_set(train_answers, golden_answers)
    if labels is None:
        return {"kind": "generation", "source": "inferred from the answers", "labels": None, "hint": None}
    return {"kind": "classification", "source": "inferred from the answers", "labels": len(labels),
            "hint": f"the answers are a closed set of {len(labels)} labels: `task: {{kind: classification}}` in the project file "
                    "adds per-label metrics, and `abstain_label` out-of-scope metrics and abstention"}


# ---- classification with an abstain label -------------------------------------------------------------------

def _ratio(num: float, den: float) -> float:
    """num / den; NaN when den is 0: `tunegate.evals.bootstrap.bootstrap_statistic` leaves such resamples out of
    the CI and reads an undefined point estimate as 0.0 (scikit-learn's zero_division=0)."""
    return num / den if den else float("nan")


def _resample_weights(idx, n: int):
    """How many times each of the n rows is in the resample idx (an int array of shape (K,)): shape (n,)."""
    import numpy as np

    return np.bincount(idx, minlength=n).astype(np.float64)


def abstain_statistics(predictions: Sequence[str], references: Sequence[str], abstain: str) -> dict[str, Callable]:
    """{metric: stat(idx) -> float} for in_scope_accuracy, oos_recall and oos_precision on the rows idx (an int
    array of shape (K,), as `tunegate.evals.bootstrap.bootstrap_statistic` draws them); NaN where the ratio's
    denominator is empty in those rows.

    Raises ValueError when no reference is the abstain label (out-of-scope recall is undefined without
    out-of-scope rows) or when every reference is (in-scope accuracy is)."""
    import numpy as np

    label = normalize_answer(abstain)
    pred = np.array([normalize_answer(p) for p in predictions], dtype=object)
    ref = np.array([normalize_answer(r) for r in references], dtype=object)
    ref_oos, pred_oos = ref == label, pred == label
    correct = pred == ref
    if not ref_oos.any():
        raise ValueError(f"no golden row's reference is the abstain label {abstain!r} (task.abstain_label): "
                         "out-of-scope recall needs out-of-scope rows in the golden set")
    if ref_oos.all():
        raise ValueError(f"every golden row's reference is the abstain label {abstain!r}: in-scope accuracy needs in-scope rows")
    n = len(ref)
    in_right, in_rows = (correct & ~ref_oos).astype(float), (~ref_oos).astype(float)
    oos_found, oos_rows, oos_said = (pred_oos & ref_oos).astype(float), ref_oos.astype(float), pred_oos.astype(float)

    def stat(num, den):
        def f(idx):
            w = _resample_weights(idx, n)
            return _ratio(w @ num, w @ den)
        return f

    return {"in_scope_accuracy": stat(in_right, in_rows), "oos_recall": stat(oos_found, oos_rows),
            "oos_precision": stat(oos_found, oos_said)}


# ---- multi-label --------------------------------------------------------------------------------------------

def set_match(prediction: str, reference: str, task) -> float:
    """1.0 when the label sets are equal (order and repeats never matter), else 0.0."""
    return float(label_set(prediction, task) == label_set(reference, task))


def jaccard(prediction: str, reference: str, task) -> float:
    """|P & R| / |P | R| of the two label sets; 1.0 when both are empty."""
    p, r = label_set(prediction, task), label_set(reference, task)
    return len(p & r) / len(p | r) if p | r else 1.0


MULTILABEL_ROW = {"set_match": set_match, "jaccard": jaccard}
OUTSIDE_LABELS = "(answers that are no reference label)"  # per_label_table's last row


def answer_labels(answer: str, task) -> frozenset[str]:
    """An answer's labels: its label set (multilabel), else the one normalised label (classification)."""
    return label_set(answer, task) if task.kind == "multilabel" else frozenset({normalize_answer(answer)})


def label_matrices(predictions: Sequence[str], references: Sequence[str], task):
    """(P, R, labels): boolean arrays of shape (N, L), row n holding answer n's / reference n's labels
    (`answer_labels`), over the sorted labels L of every answer and reference."""
    import numpy as np

    pred = [answer_labels(p, task) for p in predictions]
    ref = [answer_labels(r, task) for r in references]
    labels = sorted(set().union(*pred, *ref))
    col = {label: j for j, label in enumerate(labels)}
    P = np.zeros((len(pred), len(labels)), dtype=bool)
    R = np.zeros((len(ref), len(labels)), dtype=bool)
    for n, (p, r) in enumerate(zip(pred, ref)):
        P[n, [col[x] for x in p]] = True
        R[n, [col[x] for x in r]] = True
    return P, R, labels


def _counts(P, R):
    tp = (P & R).sum(axis=0)
    return tp, (P & ~R).sum(axis=0), (~P & R).sum(axis=0)


def multilabel_statistics(predictions: Sequence[str], references: Sequence[str], task) -> dict[str, Callable]:
    """{metric: stat(idx) -> float} for the corpus multi-label metrics on the rows idx (int array of shape (K,)).

    Micro averages pool every label's TP, FP and FN; macro-F1 averages the F1 of the labels answered or referenced
    in those rows (scikit-learn's `average="macro"` with labels=None: an answer's label outside the references
    counts as a label with F1 0). NaN where undefined (no label at all in those rows). A resample costs one
    (N,) x (N, L) product per count, not a copy of the (N, L) matrices."""
    import numpy as np

    P, R, _ = label_matrices(predictions, references, task)
    n = len(references)
    TP, FP, FN = ((P & R).astype(np.float64), (P & ~R).astype(np.float64), (~P & R).astype(np.float64))
    tp_row, fp_row, fn_row = TP.sum(axis=1), FP.sum(axis=1), FN.sum(axis=1)

    def micro(name: str) -> Callable:
        def f(idx):
            w = _resample_weights(idx, n)
            tp, fp, fn = w @ tp_row, w @ fp_row, w @ fn_row
            return {"label_micro_precision": _ratio(tp, tp + fp), "label_micro_recall": _ratio(tp, tp + fn),
                    "label_micro_f1": _ratio(2 * tp, 2 * tp + fp + fn)}[name]
        return f

    def macro_f1(idx):
        w = _resample_weights(idx, n)
        tp, fp, fn = w @ TP, w @ FP, w @ FN
        denom = 2 * tp + fp + fn
        present = denom > 0
        return float((2 * tp[present] / denom[present]).mean()) if present.any() else float("nan")

    return {**{m: micro(m) for m in ("label_micro_precision", "label_micro_recall", "label_micro_f1")}, "label_macro_f1": macro_f1}


def per_label_table(systems: dict[str, Sequence[str]], references: Sequence[str], task) -> list[dict[str, Any]]:
    """One row per reference label, most frequent first: {label, support, <system>: {precision, recall, f1,
    predicted}} for each system in `systems` (name -> answers, each aligned with `references`); then one row,
    OUTSIDE_LABELS, counting the answers that are no reference label (a base model's free text). F1 is 0.0
    where a label was never answered right."""
    names = list(systems)
    mats = {name: label_matrices(outs, references, task) for name, outs in systems.items()}
    labels = sorted(set().union(*(set(m[2]) for m in mats.values())))
    rows = {label: {"label": label, "support": 0} for label in labels}
    for name in names:
        P, R, cols = mats[name]
        tp, fp, fn = _counts(P, R)
        for j, label in enumerate(cols):
            t, p, f = int(tp[j]), int(fp[j]), int(fn[j])
            rows[label]["support"] = t + f
            rows[label][name] = {"precision": t / (t + p) if t + p else 0.0, "recall": t / (t + f) if t + f else 0.0,
                                 "f1": 2 * t / (2 * t + p + f) if t + p + f else 0.0, "predicted": t + p}
    out = sorted((r for r in rows.values() if r["support"]), key=lambda r: (-r["support"], r["label"]))
    for row in out:  # a reference label a system never answered nor met: all zeros for it
        for name in names:
            row.setdefault(name, {"precision": 0.0, "recall": 0.0, "f1": 0.0, "predicted": 0})
    outside = [r for r in rows.values() if not r["support"]]  # answers that are no reference label: one row
    if outside:
        out.append({"label": OUTSIDE_LABELS, "support": 0, **{name: {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                    "predicted": sum(r.get(name, {}).get("predicted", 0) for r in outside)} for name in names}})
    return out
