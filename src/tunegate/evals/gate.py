"""Scoring two systems on the same golden rows, and the gate rules that decide PASS or FAIL.

`score_metrics` gives, per metric, the baseline's and the candidate's score with a bootstrap 95% CI and
the paired-bootstrap CI of their difference (Koehn 2004's paired test: both systems are scored on the same
resampled rows). `check_rules` turns the project's `eval.gate` rules into one verdict line per bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tunegate.catalog import ABSTAIN_METRICS, MULTILABEL_METRICS
from tunegate.evals.bootstrap import Interval, bootstrap_ci, bootstrap_statistic, paired_bootstrap
from tunegate.evals.labels import MULTILABEL_ROW
from tunegate.evals.metrics import CORPUS_METRICS, ROW_METRICS, json_schema_metric, label_ids, macro_f1_ids


def row_metric(name: str, json_schema: Path | None = None):
    if name == "json_schema":
        return json_schema_metric(json.loads(Path(json_schema).read_text()))
    return ROW_METRICS[name]


def score_metrics(
    metrics: Sequence[str],
    baseline: Sequence[str],
    candidate: Sequence[str],
    references: Sequence[str],
    n_samples: int = 10_000,
    seed: int = 0,
    json_schema: Path | None = None,
    custom: Mapping[str, Callable[[str, str], float]] | None = None,
    task=None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """Returns (summary, per_row).

    summary[metric] = {"baseline": {mean, ci_low, ci_high}, "candidate": {...}, "delta": {...}}
    per_row[metric] = {"baseline": [...], "candidate": [...]} for row metrics (corpus metrics have none).
    custom: project-defined row metrics by name (tunegate.evals.custom.metric_functions); their errors and
    non-finite values raise TunegateError naming the metric and row.
    task: the project's config.TaskConfig, for the label metrics of tunegate.evals.labels (abstention and
    multi-label). Raises TunegateError when the golden set cannot define one (no out-of-scope row).
    """
    from tunegate.evals.custom import score_rows

    corpus = _label_statistics(metrics, baseline, candidate, references, task)
    summary, per_row = {}, {}
    for name in metrics:
        if name in corpus:
            b_stat, c_stat = corpus[name]
            b = bootstrap_statistic(b_stat, len(references), n_samples, seed)
            c = bootstrap_statistic(c_stat, len(references), n_samples, seed)
            # an undefined side (a ratio with an empty denominator, NaN) reads 0.0 in each resample, as in the point
            # estimate: a baseline that never answers oos has oos_precision 0.0, and the delta still gets a CI
            d = bootstrap_statistic(lambda i: _or_zero(c_stat(i)) - _or_zero(b_stat(i)), len(references), n_samples, seed)
            d = Interval(c.mean - b.mean, d.low, d.high)
        elif name in MULTILABEL_ROW:
            fn = MULTILABEL_ROW[name]
            bs = [fn(p, r, task) for p, r in zip(baseline, references)]
            cs = [fn(p, r, task) for p, r in zip(candidate, references)]
            per_row[name] = {"baseline": bs, "candidate": cs}
            b, c, d = bootstrap_ci(bs, n_samples, seed), bootstrap_ci(cs, n_samples, seed), paired_bootstrap(bs, cs, n_samples, seed)
        elif custom and name in custom:
            bs = score_rows(name, custom[name], baseline, references)
            cs = score_rows(name, custom[name], candidate, references)
            per_row[name] = {"baseline": bs, "candidate": cs}
            b, c, d = bootstrap_ci(bs, n_samples, seed), bootstrap_ci(cs, n_samples, seed), paired_bootstrap(bs, cs, n_samples, seed)
        elif name in CORPUS_METRICS:
            b_pred, ref, n_labels = label_ids(baseline, references)
            c_pred, ref_c, n_labels_c = label_ids(candidate, references)
            # separate label indexings are fine: each system's F1 only compares its own ids with the reference's
            b = bootstrap_statistic(lambda i: macro_f1_ids(b_pred[i], ref[i], n_labels), len(ref), n_samples, seed)
            c = bootstrap_statistic(lambda i: macro_f1_ids(c_pred[i], ref_c[i], n_labels_c), len(ref), n_samples, seed)
            d = bootstrap_statistic(
                lambda i: macro_f1_ids(c_pred[i], ref_c[i], n_labels_c) - macro_f1_ids(b_pred[i], ref[i], n_labels),
                len(ref), n_samples, seed,
            )
        else:
            fn = row_metric(name, json_schema)
            bs = [fn(p, r) for p, r in zip(baseline, references)]
            cs = [fn(p, r) for p, r in zip(candidate, references)]
            per_row[name] = {"baseline": bs, "candidate": cs}
            b, c, d = bootstrap_ci(bs, n_samples, seed), bootstrap_ci(cs, n_samples, seed), paired_bootstrap(bs, cs, n_samples, seed)
        summary[name] = {"baseline": b.as_dict(), "candidate": c.as_dict(), "delta": d.as_dict()}
    return summary, per_row


def _or_zero(x: float) -> float:
    """A corpus statistic, 0.0 where it is undefined (NaN: scikit-learn's zero_division=0)."""
    return x if x == x else 0.0


def corpus_scores(metrics: Sequence[str], outputs: Sequence[str], references: Sequence[str], n_samples: int = 10_000,
                  seed: int = 0, task=None) -> dict[str, dict[str, float]]:
    """One system's corpus metrics among `metrics` (macro_f1 and the corpus label metrics of tunegate.evals.labels),
    each {mean, ci_low, ci_high} with its bootstrap 95% CI; row metrics are left to the caller."""
    out = {m: bootstrap_statistic(stat, len(references), n_samples, seed).as_dict()
           for m, (_, stat) in _label_statistics(metrics, outputs, outputs, references, task).items()}
    if "macro_f1" in metrics:
        pred, ref, n_labels = label_ids(outputs, references)
        out["macro_f1"] = bootstrap_statistic(lambda i: macro_f1_ids(pred[i], ref[i], n_labels), len(references), n_samples, seed).as_dict()
    return out


def _label_statistics(metrics, baseline, candidate, references, task) -> dict[str, tuple[Callable, Callable]]:
    """{metric: (baseline stat, candidate stat)} for the corpus label metrics asked for (tunegate.evals.labels)."""
    from tunegate import TunegateError
    from tunegate.evals.labels import abstain_statistics, multilabel_statistics

    out: dict[str, tuple[Callable, Callable]] = {}
    if any(m in ABSTAIN_METRICS for m in metrics):
        try:
            b, c = (abstain_statistics(x, references, task.abstain_label) for x in (baseline, candidate))
        except ValueError as exc:
            raise TunegateError(f"eval.metrics {[m for m in metrics if m in ABSTAIN_METRICS]}: {exc}") from None
        out.update({m: (b[m], c[m]) for m in ABSTAIN_METRICS})
    if any(m in MULTILABEL_METRICS and m not in MULTILABEL_ROW for m in metrics):
        b, c = (multilabel_statistics(x, references, task) for x in (baseline, candidate))
        out.update({m: (b[m], c[m]) for m in b})
    return {m: v for m, v in out.items() if m in metrics}


def check_rules(rules, summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per bound of every rule: {metric, rule, description, value, ci, threshold, passed}."""
    out = []
    for rule in rules:
        if rule.metric not in summary:  # measured, but no row could be scored (e.g. a judge that never gave a parseable rating)
            out.append({"metric": rule.metric, "rule": "scored", "description": f"{rule.metric}: scored on at least one row",
                        "value": None, "ci": None, "threshold": None, "passed": False, "note": "no row could be scored"})
            continue
        s = summary[rule.metric]
        cand, delta = s["candidate"], s["delta"]
        cand_ci, delta_ci = [cand["ci_low"], cand["ci_high"]], [delta["ci_low"], delta["ci_high"]]

        def add(kind, description, value, ci, threshold, passed):
            out.append({"metric": rule.metric, "rule": kind, "description": description, "value": value,
                        "ci": ci, "threshold": threshold, "passed": bool(passed)})

        m = rule.metric
        if rule.min is not None:
            add("min", f"{m}: candidate >= {rule.min}", cand["mean"], cand_ci, rule.min, cand["mean"] >= rule.min)
        if rule.max is not None:
            add("max", f"{m}: candidate <= {rule.max}", cand["mean"], cand_ci, rule.max, cand["mean"] <= rule.max)
        if rule.max_regression is not None:
            if rule.lower_is_better:
                add("max_regression", f"{m}: candidate - baseline <= +{rule.max_regression} (lower is better)",
                    delta["mean"], delta_ci, rule.max_regression, delta["mean"] <= rule.max_regression)
            else:
                add("max_regression", f"{m}: candidate - baseline >= -{rule.max_regression}",
                    delta["mean"], delta_ci, -rule.max_regression, delta["mean"] >= -rule.max_regression)
        if rule.min_delta_ci_low is not None:
            add("min_delta_ci_low", f"{m}: lower end of the 95% CI of (candidate - baseline) > {rule.min_delta_ci_low}",
                delta["ci_low"], delta_ci, rule.min_delta_ci_low, delta["ci_low"] > rule.min_delta_ci_low)
        if rule.max_delta_ci_high is not None:
            add("max_delta_ci_high", f"{m}: upper end of the 95% CI of (candidate - baseline) < {rule.max_delta_ci_high}",
                delta["ci_high"], delta_ci, rule.max_delta_ci_high, delta["ci_high"] < rule.max_delta_ci_high)
    return out


def verdict(results: list[dict[str, Any]]) -> str:
    return "PASS" if results and all(r["passed"] for r in results) else "FAIL"


def score_slices(per_row: dict[str, dict[str, list[float]]], groups: Sequence[str], n_samples: int = 10_000,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each row metric's scores within each slice of the golden rows (`eval.slice_by`, e.g. BFCL's category).

    per_row: `score_metrics`' per-row scores ({metric: {"baseline": [N], "candidate": [N]}}); groups: each row's
    slice, length N. Returns {slice: {"n": rows, metric: {"baseline", "candidate", "delta"}}}, slices in sorted
    order, each with its bootstrap 95% CIs as in `score_metrics` (corpus metrics have no per-row scores and are
    left out). Slices are reported, never gated.
    """
    out: dict[str, dict[str, Any]] = {}
    for value in sorted(set(groups)):
        rows = [i for i, g in enumerate(groups) if g == value]
        entry: dict[str, Any] = {"n": len(rows)}
        for name, scores in per_row.items():
            bs, cs = [scores["baseline"][i] for i in rows], [scores["candidate"][i] for i in rows]
            entry[name] = {"baseline": bootstrap_ci(bs, n_samples, seed).as_dict(), "candidate": bootstrap_ci(cs, n_samples, seed).as_dict(),
                           "delta": paired_bootstrap(bs, cs, n_samples, seed).as_dict()}
        out[value] = entry
    return out
