"""`tunegate runs`: the runs of a project side by side, and two runs compared row by row.

`list_runs(project)` reads every run folder under `runs_dir` (its stage manifests, eval/scores.json): id, date,
each stage's status (done / stale / missing / skipped, stale measured against the project file as it is now,
`pipeline.stale_reason`), method, the settings that differ between runs, the headline metric (the first gate
rule's) with its 95% CI, the verdict and the wall time. `write_index` writes `runs/index.html` from it, and
every run's `run.js` is refreshed with the same statuses, so the header of each page agrees with the index.

`compare_runs(project, a, b)` compares run B with run A: the config diff (dotted keys, from the stage manifests'
configs), each metric's difference B - A with a **paired** bootstrap CI over the golden rows both runs scored
(`eval/samples.jsonl`, rows matched by id and prompt; `tunegate.evals.bootstrap.paired_bootstrap`), and the rows
whose candidate answer or score changed. `write_compare` writes `runs/compare-A.vs.B.html`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.catalog import ABSTAIN_METRICS, CORPUS_METRICS, MULTILABEL_METRICS, MULTILABEL_ROW_METRICS, SAMPLE_FIELDS
from tunegate.core.io import atomic_write_text, read_jsonl
from tunegate.core.manifest import read_manifest
from tunegate.core.paths import IDENTIFIER, inside
from tunegate.pipeline import STAGES, existing_run_dir, stale_reason
from tunegate.report.header import STAGE_PAGES, project_header, run_summary, write_run_js

MAX_CHANGED_ROWS = 200  # rows listed on the comparison page (all are counted)
# Corpus metrics that `runs --compare` recomputes from the two runs' answers, for a paired CI of their delta
PAIRED_CORPUS = frozenset((*CORPUS_METRICS, *ABSTAIN_METRICS, *(set(MULTILABEL_METRICS) - set(MULTILABEL_ROW_METRICS))))
MAX_DIFF_KEYS = 8  # differing settings shown per run in the list


def run_dirs(project) -> list[Path]:
    """The run folders under `project.runs_dir` (identifier names holding at least one stage folder), by name. A
    symbolic link that leads outside the project is left out (listing a run writes its run.js: core.paths.inside)."""
    root = Path(project.runs_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and IDENTIFIER.fullmatch(p.name) and _inside(project, p)
                  and any((p / s).is_dir() for s in STAGE_PAGES))


def _inside(project, path: Path) -> bool:
    try:
        inside(project.root, path, f"runs/{path.name}")
    except TunegateError:
        return False
    return True


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts) as {dotted key: value}: {"train": {"lora": {"r": 4}}} -> {"train.lora.r": 4};
    a list of dicts gets its index as a key part (`data.sources.0.path`), another list stays one value."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def run_config(project, run_dir: Path) -> dict[str, Any]:
    """The flattened config the run's stages were built with (every manifest's `config`, in stage order; paths
    inside the project shown relative to it)."""
    merged: dict[str, Any] = {}
    for name in STAGE_PAGES:
        m = read_manifest(run_dir / name)
        if m is not None:
            merged.update(flatten(m.config))
    prefix = str(Path(project.root)) + "/"
    return {k: v.removeprefix(prefix) if isinstance(v, str) else v for k, v in sorted(merged.items())}


def _states(project, run_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(stage -> why it is stale, stage -> why it is skipped) against the project file as loaded now."""
    stale, skipped = {}, {}
    for spec in STAGES:
        if read_manifest(run_dir / spec.name) is not None:
            why = stale_reason(project, run_dir, spec)
            if why:
                stale[spec.name] = why
        else:
            why = spec.skip(project)
            if why:
                skipped[spec.name] = why
    return stale, skipped


def _headline(run_dir: Path) -> dict[str, Any]:
    """The first gate rule's metric of the eval stage, the candidate's mean and 95% CI, and the verdict."""
    m = read_manifest(run_dir / "eval")
    if m is None:
        return {"metric": None, "value": None, "verdict": None}
    gate = (m.config.get("eval") or {}).get("gate") or []
    scores_path = run_dir / "eval" / "scores.json"
    scores = json.loads(scores_path.read_text(encoding="utf-8")) if scores_path.is_file() else {}
    metric = gate[0]["metric"] if gate else scores.get("headline")
    value = ((scores.get("metrics") or {}).get(metric) or {}).get("candidate")
    return {"metric": metric, "value": value, "verdict": m.verdict}


def run_row(project, run_dir: Path) -> dict[str, Any]:
    """One run as `tunegate runs` lists it: `header.run_summary` (id, date, stage states, total_s, overrides)
    plus config (flattened), method, metric, value ({mean, ci_low, ci_high} of the candidate, or None), verdict.
    Refreshes the run's run.js with the same stage states."""
    stale, skipped = _states(project, run_dir)
    row = run_summary(run_dir, stale=stale, skipped=skipped)
    write_run_js(run_dir, stale=stale, skipped=skipped)
    cfg = run_config(project, run_dir)
    method = cfg.get("train.method")
    row.update(config=cfg, method=f"{method} ({cfg['train.adapter']})" if method and cfg.get("train.adapter") else method,
               **_headline(run_dir))
    audit = read_manifest(run_dir / "audit")
    if row["verdict"] is None and audit is not None and audit.verdict == "NO_TRAIN":
        row["verdict"] = "NO_TRAIN"
    return row


def differing_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The config keys with more than one value among the runs that have them (a run that stopped before a stage
    lacks that stage's keys: that is its status, not a setting)."""
    keys = sorted({k for r in rows for k in r["config"]})
    return [k for k in keys if len({json.dumps(r["config"][k], sort_keys=True, default=str) for r in rows if k in r["config"]}) > 1]


def list_runs(project) -> list[dict[str, Any]]:
    """Every run of the project (`run_row`), oldest first, each with `differs`: {key: value} of the settings
    that differ between the runs (at most MAX_DIFF_KEYS)."""
    rows = sorted((run_row(project, d) for d in run_dirs(project)), key=lambda r: (r["date"], r["run_id"]))
    keys = differing_keys(rows) if len(rows) > 1 else []
    for r in rows:
        r["differs"] = {k: r["config"].get(k) for k in keys[:MAX_DIFF_KEYS]}
        r["n_differs"] = len(keys)
    return rows


def fmt_value(v: Any) -> str:
    """A config value as one short line: JSON for lists and dicts, `-` for unset."""
    if v is None:
        return "-"
    return json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)


def fmt_ci(v: dict[str, Any] | None, sign: bool = False) -> str:
    """`0.750 [0.500, 0.917]` from {mean, ci_low, ci_high}; `-` for None."""
    if not v:
        return "-"
    f = "{:+.3f}" if sign else "{:.3f}"
    return f"{f.format(v['mean'])} [{f.format(v['ci_low'])}, {f.format(v['ci_high'])}]"


def write_index(project, rows: list[dict[str, Any]]) -> Path:
    """Write `runs_dir/index.html`: one table row per run with links to each run's pages that exist."""
    from tunegate.report.render import environment

    runs_dir = Path(project.runs_dir)
    out = runs_dir / "index.html"
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    header = project_header(project.name, runs_dir, runs_dir, [], f"{len(rows)} run(s), listed {now}")
    html = environment().get_template("runs_index.html.j2").render(
        header=header, rows=rows, fmt_value=fmt_value, fmt_ci=fmt_ci, project=project.name,
        keys=list(rows[0]["differs"]) if rows else [], n_keys=rows[0]["n_differs"] if rows else 0)
    atomic_write_text(out, html)
    return out


# ---- comparing two runs -------------------------------------------------------------------------------------


def _samples(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / "eval" / "samples.jsonl"
    if not path.is_file():
        raise TunegateError(f"{path}: not found; rule: runs are compared on the golden rows their eval stages scored "
                            f"(run `tunegate run --run-id {run_dir.name}` first)")
    return {s["id"]: s for s in read_jsonl(path)}


def _scores(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval" / "scores.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def compare_runs(project, a: str, b: str, n_samples: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run `b` against run `a`.

    Returns {a, b (run_row dicts), config ([{key, a, b}] for every key whose value differs), metrics ([{metric,
    n, a, b, delta, lower_is_better}]: per-row metrics get a, b means over the shared rows and delta = mean(b - a) with a paired
    bootstrap 95% CI ({mean, ci_low, ci_high}); corpus metrics without per-row scores get each run's scores.json
    value and delta None; macro_f1 and the label corpus metrics are recomputed over the shared rows with a paired CI), n_shared, only_a, only_b (golden row ids scored by one run only, or whose prompt
    differs), changed ([{id, prompt, reference, a_output, b_output, a_scores, b_scores}]: rows whose candidate
    answer or a score differs; at most MAX_CHANGED_ROWS), n_changed}.

    n_samples: bootstrap resamples (default: run b's eval.bootstrap_samples, else 10,000). Raises TunegateError
    for an unknown run id (naming the runs there are) or a run without eval/samples.jsonl.
    """
    from tunegate.catalog import LOWER_IS_BETTER
    from tunegate.evals.bootstrap import paired_bootstrap

    da, db = existing_run_dir(project, a, "--compare"), existing_run_dir(project, b, "--compare")
    sa, sb = _samples(da), _samples(db)
    shared = [i for i in sa if i in sb and sa[i].get("prompt") == sb[i].get("prompt")]
    scores_a, scores_b = _scores(da), _scores(db)
    n_samples = n_samples or scores_b.get("bootstrap_samples") or 10_000

    def per_row(s: dict[str, Any]) -> set[str]:
        return {k[len("candidate_"):] for k, v in s.items() if k.startswith("candidate_") and k[len("candidate_"):] not in SAMPLE_FIELDS
                and isinstance(v, (int, float)) and not isinstance(v, bool)}

    row_metrics = sorted(set.intersection(*[per_row(sa[i]) & per_row(sb[i]) for i in shared])) if shared else []
    metrics = []
    for m in row_metrics:
        xa = [float(sa[i][f"candidate_{m}"]) for i in shared]
        xb = [float(sb[i][f"candidate_{m}"]) for i in shared]
        metrics.append({"metric": m, "n": len(shared), "a": sum(xa) / len(xa), "b": sum(xb) / len(xb),
                        "delta": paired_bootstrap(xa, xb, n_samples=n_samples, seed=seed).as_dict(), "lower_is_better": m in LOWER_IS_BETTER})
    corpus = [m for m in (scores_a.get("metrics") or {}) if m in (scores_b.get("metrics") or {}) and m not in row_metrics]
    paired = _paired_corpus(_eval_task(db, project), [m for m in corpus if m in PAIRED_CORPUS],
                            [sa[i] for i in shared], [sb[i] for i in shared], n_samples, seed)
    for m in corpus:
        if m in paired:  # recomputed over the shared rows, with the paired delta of the two runs' answers
            metrics.append({"metric": m, "n": len(shared), "a": paired[m]["baseline"]["mean"], "b": paired[m]["candidate"]["mean"],
                            "delta": paired[m]["delta"], "lower_is_better": m in LOWER_IS_BETTER})
            continue
        metrics.append({"metric": m, "n": None, "a": scores_a["metrics"][m]["candidate"]["mean"],
                        "b": scores_b["metrics"][m]["candidate"]["mean"], "delta": None, "lower_is_better": m in LOWER_IS_BETTER})

    changed = []
    for i in shared:
        ra, rb = sa[i], sb[i]
        a_scores = {m: ra.get(f"candidate_{m}") for m in sorted(per_row(ra) | per_row(rb))}
        b_scores = {m: rb.get(f"candidate_{m}") for m in a_scores}
        if ra.get("candidate_output") != rb.get("candidate_output") or a_scores != b_scores:
            changed.append({"id": i, "prompt": rb.get("prompt"), "reference": rb.get("reference"), "a_output": ra.get("candidate_output"),
                            "b_output": rb.get("candidate_output"), "a_scores": a_scores, "b_scores": b_scores})

    row_a, row_b = run_row(project, da), run_row(project, db)
    keys = sorted(set(row_a["config"]) | set(row_b["config"]))
    config = [{"key": k, "a": row_a["config"].get(k), "b": row_b["config"].get(k)} for k in keys
              if k not in row_a["config"] or k not in row_b["config"] or row_a["config"][k] != row_b["config"][k]]
    return {"a": row_a, "b": row_b, "config": config, "metrics": metrics, "n_shared": len(shared), "n_samples": n_samples,
            "only_a": sorted(set(sa) - set(shared)), "only_b": sorted(set(sb) - set(shared)),
            "changed": changed[:MAX_CHANGED_ROWS], "n_changed": len(changed)}


def _eval_task(run_dir: Path, project):
    """The task section run `run_dir`'s eval scored with (its eval manifest's config view), else the project's."""
    from tunegate.config import TaskConfig

    m = read_manifest(run_dir / "eval")
    task = (m.config or {}).get("task") if m is not None else None
    if not task:
        return project.task
    # the dump holds every field; the ones at their default were not set (a multilabel spelling on a classification
    # task is refused only when set)
    fields = TaskConfig.model_fields
    return TaskConfig.model_validate({k: v for k, v in task.items() if k not in fields or v != fields[k].default})


def _paired_corpus(task, metrics: list[str], rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]],
                   n_samples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Corpus metrics (macro_f1, the label metrics) of two runs' answers on the same golden rows, as the eval gate
    scores them (tunegate.evals.gate.score_metrics: run A in the baseline's place), so their delta gets a paired
    bootstrap CI. A metric the rows cannot define (e.g. no out-of-scope row among the shared ones) is left out: it
    keeps each run's own value and no delta."""
    from tunegate.evals.gate import score_metrics

    if not metrics or not rows_a or any("candidate_output" not in r or "reference" not in r for r in rows_a + rows_b):
        return {}
    out_a, out_b = [r["candidate_output"] for r in rows_a], [r["candidate_output"] for r in rows_b]
    refs = [r["reference"] for r in rows_b]
    paired = {}
    for m in metrics:
        try:
            summary, _ = score_metrics([m], out_a, out_b, refs, n_samples=n_samples, seed=seed, task=task)
        except TunegateError:
            continue
        paired.update(summary)
    return paired


def write_compare(project, result: dict[str, Any]) -> Path:
    """Write `runs_dir/compare-A.vs.B.html` for a `compare_runs` result; returns its path."""
    from tunegate.report.render import environment

    runs_dir = Path(project.runs_dir)
    a, b = result["a"]["run_id"], result["b"]["run_id"]
    out = runs_dir / f"compare-{a}.vs.{b}.html"  # "." is in no run id: `a-b` vs `c` and `a` vs `b-c` differ
    header = project_header(project.name, runs_dir, runs_dir, [result["a"], result["b"]], f"run {b} compared with run {a}")
    html = environment().get_template("runs_compare.html.j2").render(header=header, r=result, fmt_value=fmt_value, fmt_ci=fmt_ci,
                                                                     max_rows=MAX_CHANGED_ROWS)
    atomic_write_text(out, html)
    return out


def print_runs(rows: list[dict[str, Any]], console) -> None:
    """The `tunegate runs` table on a rich console."""
    from rich.table import Table

    if not rows:
        console.print("no runs yet: `tunegate run` writes runs/<run-id>/")
        return
    table = Table("run", "date (UTC)", "stages", "method")
    table.add_column("settings that differ", overflow="fold")
    for name in ("headline (95% CI)", "verdict", "wall s"):
        table.add_column(name)
    for r in rows:
        table.add_row(r["run_id"], r["date"][:16].replace("T", " "), stage_summary(r["stages"]), r["method"] or "-",
                      "\n".join(f"{k}={fmt_value(v)}" for k, v in r["differs"].items()) or "-",
                      f"{r['metric']} {fmt_ci(r['value'])}" if r["metric"] else "-", r["verdict"] or "-", f"{r['total_s']:.1f}")
    console.print(table)


def stage_summary(stages: list[dict[str, Any]]) -> str:
    """The stages that are not done, by status (`stale: audit, eval; missing: release`), or `all done`."""
    by: dict[str, list[str]] = {}
    for s in stages:
        if s["status"] != "done":
            by.setdefault(s["status"], []).append(s["name"])
    colour = {"stale": "yellow", "running": "blue"}
    return "; ".join(f"[{colour.get(k, 'dim')}]{k}: {', '.join(v)}[/]" for k, v in by.items()) or "[green]all done[/]"


def print_compare(result: dict[str, Any], console) -> None:
    """The comparison on a rich console: config diff, metric deltas, and the changed rows' ids."""
    from rich.table import Table

    a, b = result["a"]["run_id"], result["b"]["run_id"]
    cfg = Table("setting", f"run {a}", f"run {b}", title="config diff")
    for c in result["config"]:
        cfg.add_row(c["key"], fmt_value(c["a"]), fmt_value(c["b"]))
    console.print(cfg if result["config"] else "config: the same")
    met = Table("metric", "rows", f"run {a}", f"run {b}", f"{b} - {a} (paired 95% CI)",
                title=f"candidate scores on the {result['n_shared']} golden rows both runs scored")
    for m in result["metrics"]:
        met.add_row(m["metric"], str(m["n"] or "-"), f"{m['a']:.3f}", f"{m['b']:.3f}",
                    fmt_ci(m["delta"], sign=True) if m["delta"] else "no per-row scores: no paired CI")
    console.print(met)
    console.print(f"{result['n_changed']} row(s) changed answer or score"
                  + (f": {', '.join(c['id'] for c in result['changed'][:20])}" if result["changed"] else ""))
