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
    has oos_recall and oos_precision 0.0), as scikit-learn's zero_division=0.

Multi-label (answers are label sets; order never matters):
    set_match              1.0 when the answer's label set equals the reference's (row metric)
    jaccard                |A & R| / |A | R| per row, 1.0 when both are empty (row metric; sample-based Jaccard)
    label_micro_precision  sum over labels of TP / (TP + FP)
    label_micro_recall     sum over labels of TP / (TP + FN)
    label_micro_f1         2 TP / (2 TP + FP + FN), summed over labels
    label_macro_f1         unweighted mean of per-label F1 over the labels of the references and answers
These are the standard multi-label measures (Tsoumakas & Katakis 2007; scikit-learn's `average="micro"` /
`"macro"` / `"samples"`), as NLU++ reports them (Casanueva et al. 2022).

Labels are compared after `tunegate.evals.metrics.normalize_answer` (case, spaces, edge punctuation).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from tunegate.evals.metrics import normalize_answer


# ---- reading answers as labels ------------------------------------------------------------------------------

def label_set(answer: str, task) -> frozenset[str]:
    """A multi-label answer as its set of normalised labels: 'Card, how' -> {'card', 'how'}; the task's
    `none_label` (or an empty answer) -> the empty set. Splits on `task.separator` stripped of spaces."""
    sep = task.separator.strip()
    parts = {normalize_answer(p) for p in answer.split(sep)}
    parts.discard("")
    return frozenset() if parts <= {normalize_answer(task.none_label)} else frozenset(parts)


def canonical_labels(labels: Iterable[str], task) -> str:
    """A label set written the one way training and references use: sorted, each once, joined by
    `task.separator`; the empty set is `task.none_label`. Labels keep their spelling (trimmed)."""
    unique = sorted({str(label).strip() for label in labels} - {""})
    return task.separator.join(unique) if unique else task.none_label


def canonical_answer(value: Any, task) -> str:
    """A source's multi-label answer (a JSON list of labels, a written set, or null / missing = the empty set)
    in canonical form. Raises ValueError for anything else (a number, an object, a list holding a non-string)."""
    if value is None:
        return task.none_label
    if isinstance(value, str):
        sep = task.separator.strip()
        parts = [p.strip() for p in value.split(sep)]
        parts = [p for p in parts if p and normalize_answer(p) != normalize_answer(task.none_label)]
        return canonical_labels(parts, task)
    if isinstance(value, (list, tuple)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ValueError(f"a label list holds {type(bad[0]).__name__} {bad[0]!r}; labels are strings")
        sep = task.separator.strip()
        split = [v for v in value if sep in v]
        if split:
            raise ValueError(f"label {split[0]!r} holds the separator {sep!r} (task.separator)")
        return canonical_labels(value, task)
    raise ValueError(f"a multi-label answer is a list of labels or a string, got {type(value).__name__}")


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
    section it is that kind ("task section"); without one the kind is inferred from the answers (generation,
    or classification when `closed_label_set` finds one), with a hint of what `task.kind` would add."""
    if task is not None and task.kind in ("classification", "multilabel"):
        if task.labels:
            n = len(task.labels)
        elif task.kind == "multilabel":
            n = len(set().union(*(label_set(a, task) for a in train_answers)))
        else:
            n = len(set(train_answers))
        return {"kind": task.kind, "source": "task section", "labels": n, "hint": None}
    if task is not None:
        return {"kind": task.kind, "source": "task section", "labels": None, "hint": None}
    labels = closed_label_set(train_answers, golden_answers)
    if labels is None:
        return {"kind": "generation", "source": "inferred from the answers", "labels": None, "hint": None}
    return {"kind": "classification", "source": "inferred from the answers", "labels": len(labels),
            "hint": f"the answers are a closed set of {len(labels)} labels: `task: {{kind: classification}}` in the project file "
                    "adds per-label metrics, and `abstain_label` out-of-scope metrics and abstention"}


# ---- classification with an abstain label -------------------------------------------------------------------

def _ratio(num, den) -> float:
    den = int(den.sum())
    return float(num.sum()) / den if den else 0.0


def abstain_statistics(predictions: Sequence[str], references: Sequence[str], abstain: str) -> dict[str, Callable]:
    """{metric: stat(idx) -> float} for in_scope_accuracy, oos_recall and oos_precision on the rows idx (an int
    array of shape (K,), as `tunegate.evals.bootstrap.bootstrap_statistic` draws them).

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
    return {
        "in_scope_accuracy": lambda i: _ratio(correct[i] & ~ref_oos[i], ~ref_oos[i]),
        "oos_recall": lambda i: _ratio(pred_oos[i] & ref_oos[i], ref_oos[i]),
        "oos_precision": lambda i: _ratio(pred_oos[i] & ref_oos[i], pred_oos[i]),
    }


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


def _micro(P, R) -> dict[str, float]:
    tp, fp, fn = (int(x.sum()) for x in _counts(P, R))
    return {"label_micro_precision": tp / (tp + fp) if tp + fp else 0.0,
            "label_micro_recall": tp / (tp + fn) if tp + fn else 0.0,
            "label_micro_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0}


def _macro_f1(P, R) -> float:

    tp, fp, fn = _counts(P, R)
    denom = 2 * tp + fp + fn
    present = denom > 0  # a label neither answered nor referenced in these rows is not counted
    return float((2 * tp[present] / denom[present]).mean()) if present.any() else 1.0


def multilabel_statistics(predictions: Sequence[str], references: Sequence[str], task) -> dict[str, Callable]:
    """{metric: stat(idx) -> float} for the corpus multi-label metrics on the rows idx (int array of shape (K,))."""
    P, R, _ = label_matrices(predictions, references, task)
    out: dict[str, Callable] = {name: (lambda i, name=name: _micro(P[i], R[i])[name])
                                for name in ("label_micro_precision", "label_micro_recall", "label_micro_f1")}
    out["label_macro_f1"] = lambda i: _macro_f1(P[i], R[i])
    return out


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
