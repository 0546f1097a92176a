"""The eval stage's own page: the verdict, every gate rule, the scores with 95% CIs, and the rows that changed.

`write_eval_report(eval_dir, project_name)` reads what the eval stage wrote there (scores.json, verdict.json,
samples.jsonl and, when present, suites.json) and writes eval.png and eval.html (plot embedded, readable offline)
next to them. The page needs no model and no project file: any finished or in-progress eval folder renders. Like
every page it opens with the run's header (report.header); answers are shown whole (or cut with a visible "…").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunegate.core.io import atomic_write_text, read_jsonl

MAX_DIFFS = 25  # rows shown per direction (candidate better / candidate worse)


def _lower_is_better(rules: list[dict[str, Any]], metric: str) -> bool:
    """Whether the gate treats `metric` as lower-is-better (then a lower candidate score is the better one)."""
    for r in rules:
        if r.get("metric") == metric and (r.get("lower_is_better") or "lower is better" in str(r.get("description", ""))):
            return True
    return False


def sample_diffs(samples: list[dict[str, Any]], metric: str, lower_is_better: bool = False) -> dict[str, Any]:
    """Rows whose baseline and candidate scores on `metric` differ, split by direction, biggest change first.

    Returns {"available", "better", "worse", "n_better", "n_worse", "n_same", "n_rows"}; `available` is False
    when no row carries per-row scores for the metric (a corpus metric such as macro_f1).
    """
    b_key, c_key = f"baseline_{metric}", f"candidate_{metric}"
    better, worse, same, scored = [], [], 0, 0
    for s in samples:
        b, c = s.get(b_key), s.get(c_key)
        if b is None or c is None:
            continue
        scored += 1
        if b == c:
            same += 1
            continue
        gain = (b - c) if lower_is_better else (c - b)
        row = {**s, "baseline_score": b, "candidate_score": c, "change": c - b}
        (better if gain > 0 else worse).append((-abs(gain), row))
    # stable sort: biggest change first, input order among equal changes
    better = [r for _, r in sorted(better, key=lambda t: t[0])]
    worse = [r for _, r in sorted(worse, key=lambda t: t[0])]
    return {"available": scored > 0, "better": better[:MAX_DIFFS], "worse": worse[:MAX_DIFFS], "n_better": len(better),
            "n_worse": len(worse), "n_same": same, "n_rows": len(samples), "n_scored": scored}


def _suite(body: dict[str, Any]) -> dict[str, Any]:
    """A suite's metrics, and its top-level plain details (row counts, token budget, wall time, sources) as text."""

    def plain(v: Any) -> bool:
        return isinstance(v, (str, int, float, bool)) or v is None

    info = {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in body.items()
            if k != "metrics" and (plain(v) or (isinstance(v, list) and all(plain(x) for x in v)))}
    metrics = body.get("metrics")
    return {"metrics": metrics if isinstance(metrics, dict) else {}, "info": info, "breakdown": _breakdown(body)}


# Per-system breakdown tables a suite records: key -> (row label, value field, column title)
_BREAKDOWNS = {"by_source": ("source / kind", "refusal_rate", "refusal rate (string match)"),
               "by_instruction": ("instruction", "accuracy", "strict accuracy")}


def _breakdown(body: dict[str, Any]) -> dict[str, Any] | None:
    """One table of the baseline's and the candidate's value per row label (safety: per source and kind;
    IFEval: per instruction), or None when the suite recorded no breakdown."""
    systems = [s for s in ("baseline", "candidate") if isinstance(body.get(s), dict)]
    for key, (label, field, title) in _BREAKDOWNS.items():
        tables = {s: body[s].get(key) for s in systems if isinstance(body[s].get(key), dict)}
        if tables:
            names = sorted({n for t in tables.values() for n in t})
            rows = [{"name": n, "n": next((t[n].get("n") for t in tables.values() if n in t), None),
                     **{s: tables[s].get(n, {}).get(field) for s in tables}} for n in names]
            return {"label": label, "title": title, "systems": list(tables), "rows": rows}
    return None


def write_eval_report(eval_dir: Path, project_name: str | None = None) -> Path:
    """Write eval.png and eval.html into `eval_dir` (an eval stage folder, or the stage's `.eval.partial/`);
    returns the path of eval.html. project_name: shown in the page header (report.header), which covers the run
    `eval_dir` sits in.

    Raises:
        FileNotFoundError: scores.json or verdict.json is missing.
    """
    from tunegate.report.header import run_header
    from tunegate.report.render import environment, png_data_uri
    from tunegate.report.run_report import plot_scores

    eval_dir = Path(eval_dir)
    scores = json.loads((eval_dir / "scores.json").read_text(encoding="utf-8"))
    verdict = json.loads((eval_dir / "verdict.json").read_text(encoding="utf-8"))
    samples_path = eval_dir / "samples.jsonl"
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    suites_path = eval_dir / "suites.json"
    suites = json.loads(suites_path.read_text(encoding="utf-8")) if suites_path.is_file() else {}

    rules = verdict.get("rules", [])
    metrics = scores.get("metrics") or {}
    headline = scores.get("headline") or (next(iter(metrics)) if metrics else None)
    diffs = sample_diffs(samples, headline, _lower_is_better(rules, headline)) if headline else None

    png = eval_dir / "eval.png"
    if metrics:
        plot_scores(scores, png)
    env = environment()
    html = env.get_template("eval.html.j2").render(
        title=eval_dir.resolve().parent.name,
        verdict=verdict.get("verdict", "FAIL"),
        rules=rules,
        scores=scores,
        metrics=metrics,
        headline=headline,
        diffs=diffs,
        suites={name: _suite(body) for name, body in suites.items() if isinstance(body, dict)},
        png=png_data_uri(png) if metrics else None,
        max_diffs=MAX_DIFFS,
        header=run_header(project_name or "tunegate", eval_dir.resolve().parent, eval_dir),
    )
    out = eval_dir / "eval.html"
    atomic_write_text(out, html)
    return out
