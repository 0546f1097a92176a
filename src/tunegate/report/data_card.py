"""The data card: what went in, what came out at each step, why rows were removed, how long rows are.

`data_card_markdown(project, stats, timings)` is data_card.md. `write_data_card_html(stage_dir, project, stats,
rejected, lengths)` is called by the data stage after stats.json and data_card.md; it writes token_lengths.png
and data_card.html (plot embedded, readable offline, opening with the run's header: report.header) next to them. Everything shown comes from stats.json and
rejected.jsonl, so the page and the markdown card cannot disagree. Rejected rows are shown by file, line, id,
rule and detail only: never their text (a row rejected for PII must not reappear here).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tunegate.core.io import atomic_write_text

MAX_EXAMPLES = 10  # rejected rows listed per rule, and duplicate examples


def plot_token_lengths(lengths: list[int], max_length: int, path: Path) -> None:
    """Histogram of tokens per kept row (after the chat template and the over-length policy), max_length marked."""
    from tunegate.report.render import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=110)
    top = max(max(lengths, default=1), max_length)
    bins = min(60, top + 1)  # at least one token per bin
    ax.hist(lengths, bins=bins, range=(0, top + 1), color="#2f80ed")
    ax.axvline(max_length, color="#c0392b", lw=1, ls="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per row (chat template applied)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _length_summary(lengths: list[int], max_length: int) -> dict[str, Any]:
    s = sorted(lengths)
    return {"n": len(s), "min": s[0], "median": statistics.median(s), "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
            "max": s[-1], "at_max_length": sum(1 for x in s if x >= max_length)}


def card_context(project, stats: dict[str, Any], rejected: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """What the template shows. `rejected`: rejected.jsonl rows (file, line, id, rule, detail); `lengths`: tokens
    per kept row."""
    cfg = project.data
    by_file_rule: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rejected:
        by_file_rule[r["file"]][r["rule"]] += 1
        if len(examples[r["rule"]]) < MAX_EXAMPLES:
            examples[r["rule"]].append({k: r.get(k) for k in ("file", "line", "id", "detail")})
    licence_of = {s.name: s.license for s in cfg.sources}
    sources = [
        {"name": Path(path).name, "path": path, "license": licence_of.get(path), **counts,
         "rejected_by_rule": dict(sorted(by_file_rule[path].items()))}
        for path, counts in stats["per_source"].items()
    ]
    rules = [{"rule": rule, "rows": n, "examples": examples[rule]} for rule, n in sorted(stats["rejected_by_rule"].items(), key=lambda t: -t[1])]
    return {
        "name": project.name,
        "base_model": project.base_model,
        "stats": stats,
        "steps": stats.get("steps", []),
        "sources": sources,
        "rules": rules,
        "max_length": cfg.max_length,
        "overlength": cfg.overlength,
        "system_role": cfg.system_role,
        "lengths": _length_summary(lengths, cfg.max_length) if lengths else None,
        "dedup": cfg.dedup.model_dump() if cfg.dedup is not None else None,
        "duplicates": stats["duplicates_removed"],
        "duplicate_examples": examples.get("duplicate", []),
        "duplicate_texts": stats.get("duplicate_examples", []),
        "pii": stats.get("pii"),
        "pii_types": sorted(set(stats["pii"]["entities"]) | set(stats["pii"]["found_by_type"])) if stats.get("pii") else [],
        "unlicensed": [s["name"] for s in sources if not s["license"]],
        "max_examples": MAX_EXAMPLES,
    }


def write_data_card_html(stage_dir: Path, project, stats: dict[str, Any], rejected: list[dict[str, Any]], lengths: list[int],
                         timings: dict[str, Any] | None = None) -> Path:
    """Write token_lengths.png and data_card.html into `stage_dir`; returns the page's path.

    project: the `config.Project` the data stage ran with (its data section names max_length, the over-length
    policy, dedup settings and each source's licence).
    """
    from tunegate.report.header import run_header
    from tunegate.report.render import environment, png_data_uri

    stage_dir = Path(stage_dir)
    png = stage_dir / "token_lengths.png"
    plot_token_lengths(lengths, project.data.max_length, png)
    env = environment()
    ctx = card_context(project, stats, rejected, lengths)
    ctx["seconds"] = {t["step"]: t["seconds"] for t in (timings or {}).get("steps", [])}
    ctx["timings"] = timings
    ctx["header"] = run_header(project.name, stage_dir.resolve().parent, stage_dir)
    html = env.get_template("data_card.html.j2").render(png=png_data_uri(png), **ctx)
    out = stage_dir / "data_card.html"
    atomic_write_text(out, html)
    return out


def data_card_markdown(project, stats: dict[str, Any], timings: dict[str, Any] | None = None) -> str:
    """data_card.md: the same counts as the page, as markdown. `stats`: stats.json; `timings`: timings.json (the
    seconds column of the step table), or None."""
    sec = {t["step"]: t["seconds"] for t in (timings or {}).get("steps", [])}
    lines = [
        f"# Data card: {project.name}",
        "",
        f"- rows read: {stats['rows_read']}; kept: {stats['rows_kept']}; rejected: {stats['rows_rejected']}"
        + (f" ({stats['rows_invalid']} invalid, {stats['rows_removed']} removed by the quality gates, "
           f"{stats['rows_selected_out']} not selected)" if "rows_invalid" in stats else ""),
        f"- train / val / golden: {stats['train_rows']} / {stats['val_rows']} / {stats['golden_rows']}",
        f"- golden set sha256: `{stats['golden_sha256']}`",
        f"- tokens per row: mean {stats['tokens_per_row_mean']}, max {stats['tokens_per_row_max']}; "
        f"truncated rows: {stats['truncated_rows']} (policy `{project.data.overlength}`, max_length {project.data.max_length})",
        f"- licences: {', '.join(stats['licenses']) or 'not stated'}",
        *([f"- task: {t['kind']} ({t['source']}" + (f", {t['labels']} labels" if t.get("labels") else "") + ")"
           + (f"; hint: {t['hint']}" if t.get("hint") else "")] if (t := stats.get("task")) else []),
        (f"- duplicates removed: {stats['duplicates_removed']['exact']} exact, {stats['duplicates_removed']['near']} near"
         + (f", {stats['duplicates_removed']['semantic']} semantic" if "semantic" in stats["duplicates_removed"] else "")
         if project.data.dedup is not None else "- duplicates: not checked (`data.dedup` is not set)"),
        "- token lengths (after the over-length policy): ![token-length histogram](token_lengths.png); the same card as a page: data_card.html",
        "",
        "## Rows in and out per step",
        "",
        (f"Wall time on engine `{timings['engine']}`, {timings['num_proc']} process(es); "
         f"total {timings['total_seconds']} s (timings.json)." if timings else ""),
        "",
        "| step | in | out | removed by rule | seconds |",
        "|---|---:|---:|---|---:|",
        *[f"| {s['step']} | {s['rows_in']} | {s['rows_out']} | "
          f"{', '.join(f'{k} {v}' for k, v in s['removed_by_rule'].items()) or '-'} | {sec.get(s['step'], '-')} |" for s in stats["steps"]],
        "",
        *_duplicate_examples(stats.get("duplicate_examples", [])),
        "## Rejected rows by rule",
        "",
        "| rule | rows |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(stats["rejected_by_rule"].items())],
        "",
        *_pii_card(stats["pii"]),
        "## Per source",
        "",
        "| source | read | kept | train | val | rejected |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {Path(k).name} | {v['rows_read']} | {v['kept']} | {v['train']} | {v['val']} | {v['rejected']} |"
          for k, v in stats["per_source"].items()],
        "",
    ]
    return "\n".join(lines)


def _duplicate_examples(examples: list[dict[str, Any]]) -> list[str]:
    """The card's duplicate-examples table: both texts of each removed row and the row kept in its place."""
    if not examples:
        return []
    return [
        "## Duplicate examples",
        "",
        "| kind | removed row | kept row | similarity | removed text | kept text |",
        "|---|---|---|---:|---|---|",
        *[f"| {e['kind']} | {e['id']} | {e['duplicate_of']} | {e['similarity']} | {_md_cell(e['text'])} | {_md_cell(e['kept_text'])} |"
          for e in examples],
        "",
    ]


def _md_cell(text: str) -> str:
    """Text fit for one markdown table cell: pipes escaped, newlines flattened."""
    return text.replace("|", "\\|").replace("\n", " ")


def _pii_card(report: dict[str, Any] | None) -> list[str]:
    """The card's PII section from stats.json's `pii` report (None: not scanned)."""
    if report is None:
        return ["## PII", "", "Not scanned (`data.pii` is not set).", ""]
    types = sorted(set(report["entities"]) | set(report["found_by_type"]))
    return [
        "## PII",
        "",
        (f"- mode `{report['mode']}`; regions {', '.join(report['regions'])}; phone match `{report['phone_match']}`; "
         f"score threshold {report['score_threshold']} (re-scan {report['rescan_score_threshold']})"),
        (f"- rows with PII: {report['rows_with_pii']} of {report['rows_scanned']}; rejected: {report['rows_dropped_pii']} "
         f"(`pii`), {report['rows_dropped_rescan']} still holding PII on re-scan (`pii_rescan`), "
         f"{report.get('rows_dropped_unscannable', 0)} too long to scan (`pii_unscannable`)"),
        f"- golden rows with PII (frozen, not redacted): {report['golden_rows_with_pii']}",
        *([f"- pseudonym key id: `{report['key_id']}`"] if report.get("key_id") else []),
        "",
        "| entity type | found | found again on re-scan |",
        "|---|---:|---:|",
        *[f"| {t} | {report['found_by_type'].get(t, 0)} | {report['rescan_by_type'].get(t, 0)} |" for t in types],
        "",
    ]
