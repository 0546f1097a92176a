"""Project-defined eval metrics (`eval.custom_metrics`): a row metric written as a function in a file of the project.

    eval:
      metrics: [exact_match, label_jaccard]
      custom_metrics: {label_jaccard: "metrics.py:jaccard"}   # jaccard(prediction, reference) -> float

The function gets one golden row's answer and reference (strings) and returns a finite number; its per-row scores
get the same bootstrap CIs and gate rules as the built-in row metrics (tunegate.evals.gate.score_metrics). The file
is loaded by path from inside the project (tunegate.project_code) and its sha256 enters the eval and audit stages'
fingerprints (`metric_files`), so editing it reruns them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from tunegate import TunegateError

RowMetric = Callable[[str, str], float]


def _key(name: str) -> str:
    return f"eval.custom_metrics.{name}"


def metric_files(project) -> dict[str, Path]:
    """{"custom_metric.<name>": file} for every custom metric `eval.metrics` lists (stage inputs: sha256 fingerprinted)."""
    from tunegate.project_code import project_file

    ecfg = project.eval
    return {f"custom_metric.{name}": project_file(spec, project.root, _key(name), "metric")
            for name, spec in ecfg.custom_metrics.items() if name in ecfg.metrics}


def metric_functions(project) -> dict[str, RowMetric]:
    """The custom metrics `eval.metrics` lists, loaded: name -> function(prediction, reference) -> float.

    Raises:
        TunegateError: naming `eval.custom_metrics.<name>` and the file, as tunegate.project_code.load_project_function.
    """
    from tunegate.project_code import load_project_function

    ecfg = project.eval
    return {name: load_project_function(spec, project.root, _key(name), ("", ""), "(prediction, reference)", "metric")[0]
            for name, spec in ecfg.custom_metrics.items() if name in ecfg.metrics}


def score_rows(name: str, fn: RowMetric, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """fn on every (prediction, reference) pair, as floats.

    Raises:
        TunegateError: the function raised, or returned something that is not a finite number (naming the metric,
            the row index and the value).
    """
    out = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        try:
            value = fn(p, r)
        except Exception as e:  # noqa: BLE001  the project's own code: any error, one message
            raise TunegateError(f"{_key(name)}: row {i}: the metric raised {type(e).__name__}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TunegateError(f"{_key(name)}: row {i}: returned {value!r}; rule: a metric returns a finite number per row")
        out.append(float(value))
    return out
