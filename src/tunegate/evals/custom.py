"""Project-defined eval metrics (`eval.custom_metrics`): a row metric written as a function in a file of the project.

    eval:
      metrics: [exact_match, label_jaccard]
      custom_metrics: {label_jaccard: "metrics.py:jaccard"}   # jaccard(prediction, reference) -> float

The function gets one golden row's answer and reference (strings) and returns a score in [0, 1], higher is better,
as the built-in row metrics do (the audit ranks candidates by it, and the GGUF parity tolerance and drift's bounds
are absolute); its per-row scores get the same bootstrap CIs and gate rules (tunegate.evals.gate.score_metrics).
The file is loaded by path from inside the project (tunegate.project_code) and its sha256 enters the eval and audit
stages' fingerprints (`metric_files`), so editing it reruns them; drift and the GGUF export refuse to score with a
file that changed since the eval stage ran (`check_unchanged`).
"""

from __future__ import annotations

import math
import numbers
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
        TunegateError: the function raised, or returned something that is not a number in [0, 1] (naming the
            metric, the row index and the value).
    """
    out = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        try:
            value = fn(p, r)
        except Exception as e:  # noqa: BLE001  the project's own code: any error, one message
            raise TunegateError(f"{_key(name)}: row {i}: the metric raised {type(e).__name__}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not 0 <= value <= 1:
            raise TunegateError(f"{_key(name)}: row {i}: returned {value!r}; rule: a metric returns a number in [0, 1] per row")
        out.append(float(value))
    return out


def check_unchanged(project, eval_manifest) -> None:
    """The custom metric files are the ones the eval stage scored with (their sha256 in its manifest's inputs):
    scores made now are comparable with its scores. Raises TunegateError naming the file that changed."""
    from tunegate.core.manifest import sha256_file

    for key, path in metric_files(project).items():
        recorded = eval_manifest.inputs.get(str(path)) if eval_manifest is not None else None
        if recorded != sha256_file(path):
            raise TunegateError(f"{path}: {_key(key.split('.', 1)[1])} changed since the eval stage scored with it; rule: "
                                "answers are compared under the metric code the eval used. Rerun `tunegate eval`")
