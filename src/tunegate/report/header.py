"""The one page header every HTML page of a run carries, and `runs/<id>/run.js`, which keeps it current.

A page is written by its stage and hashed into that stage's manifest, so it can't be rewritten when later stages
finish. Its header is therefore rendered with what is known when it is written (`run_header`: the stages whose
manifests exist, the one being written, total time, overrides), and loads `../run.js`, which the pipeline
rewrites after every stage (`write_run_js`, not an output of any stage) and which fills in the live status of
every stage, its link, the total time and the overrides. A link is only ever shown to a file that exists.

The partial is `templates/_header.html.j2` (macro `page_header(h)`); `h` is the dict `run_header` or
`project_header` returns.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from tunegate.core.io import atomic_write_text
from tunegate.core.manifest import manifest_hash, read_manifest

# Each stage's page, relative to the run folder (train has no page: its summary; release: the bundle's record).
STAGE_PAGES: dict[str, str] = {
    "data": "data/data_card.html",
    "audit": "audit/audit.html",
    "train": "train/train_summary.json",
    "eval": "eval/eval.html",
    "report": "report/report.html",
    "release": "release/bundle/release.json",
}
RUN_JS = "run.js"


def stage_states(run_dir: Path, running: str | None = None, stale: dict[str, str] | None = None,
                 skipped: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One dict per stage of STAGE_PAGES, in order: name, status, page (relative to `run_dir`, only when that file
    exists), wall_s, started_at, verdict, why.

    status: `done` (manifest present), `stale` (manifest present, but built on another upstream manifest than the
    one on disk, or named in `stale` with its reason: what `tunegate runs` finds against the project file),
    `running` (`running` names it and it has no manifest yet), `skipped` (no manifest, named in `skipped` with
    why the project skips it) or `missing`.
    """
    out = []
    for name, page in STAGE_PAGES.items():
        m = read_manifest(run_dir / name) if name != running else None  # a rerun's old manifest is being replaced
        row: dict[str, Any] = {"name": name, "status": "missing", "page": None, "wall_s": None, "started_at": None,
                               "verdict": None, "why": None}
        if m is not None:
            row.update(status="done", wall_s=m.wall_s, started_at=m.started_at, verdict=m.verdict)
            older = [up for up, digest in m.upstream.items()
                     if (run_dir / up / "manifest.json").is_file() and manifest_hash(run_dir / up) != digest]
            if older:
                row.update(status="stale", why=f"built on an older {', '.join(older)} stage")
            if stale and name in stale:
                row.update(status="stale", why=stale[name])
        elif name == running:
            row["status"] = "running"
        elif skipped and name in skipped:
            row.update(status="skipped", why=skipped[name])
        if (run_dir / page).is_file():
            row["page"] = page
        out.append(row)
    return out


def run_summary(run_dir: Path, running: str | None = None, stale: dict[str, str] | None = None,
                skipped: dict[str, str] | None = None) -> dict[str, Any]:
    """What the header shows of one run: run_id, date (first stage's start, UTC ISO; now when none finished),
    stages (`stage_states`), total_s (sum of the finished stages' wall seconds), overrides (every manifest's)."""
    run_dir = Path(run_dir)
    stages = stage_states(run_dir, running, stale, skipped)
    started = sorted(s["started_at"] for s in stages if s["started_at"])
    overrides: list[str] = []
    for s in stages:
        m = read_manifest(run_dir / s["name"]) if s["status"] in ("done", "stale") else None
        overrides += [o for o in (m.overrides if m else []) if o not in overrides]
    return {
        "run_id": run_dir.name,
        "date": started[0] if started else dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stages": stages,
        "total_s": round(sum(s["wall_s"] or 0 for s in stages), 1),
        "overrides": overrides,
    }


def _rel(target: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(target, page_dir)).as_posix()


def run_header(project_name: str, run_dir: Path, page_dir: Path, running: str | None = None) -> dict[str, Any]:
    """The header of a page written into `page_dir` about the run in `run_dir` (a stage folder, or its
    `.<stage>.partial/` while the stage runs: links are made relative to the folder the page ends up in).

    running: the stage writing the page (shown as running until run.js says otherwise); by default the stage
    whose `.<stage>.partial/` is `page_dir`.
    """
    run_dir, page_dir = Path(run_dir).resolve(), Path(page_dir).resolve()
    if page_dir.parent == run_dir and page_dir.name.startswith(".") and page_dir.name.endswith(".partial"):
        page_dir = run_dir / page_dir.name[1:-len(".partial")]  # `.eval.partial` is published as `eval`
        running = running or page_dir.name
    run = run_summary(run_dir, running)
    base = _rel(run_dir, page_dir)
    index = run_dir.parent / "index.html"
    return {"project": project_name, "runs": [run], "base": base, "run_js": f"{base}/{RUN_JS}",
            "index": _rel(index, page_dir) if index.is_file() else None, "note": None}


def project_header(project_name: str, runs_dir: Path, page_dir: Path, runs: list[dict[str, Any]], note: str) -> dict[str, Any]:
    """The header of a page about several runs (runs/index.html, a comparison): `runs` are `run_summary` dicts,
    each shown with its stage links (relative to `page_dir`); no run.js (the page is written with fresh states)."""
    base = _rel(Path(runs_dir), Path(page_dir))
    return {"project": project_name, "runs": runs, "base": base, "run_js": None,
            "index": _rel(Path(runs_dir) / "index.html", page_dir), "note": note}


# Fills in the header(s) of this run on the page: each stage's status and link, the total time, the overrides.
# Uses textContent only (no markup from the data).
_JS = """
(function () {
  var R = window.TUNEGATE_RUN;
  document.querySelectorAll('[data-tg-run]').forEach(function (run) {
    if (run.getAttribute('data-tg-run') !== R.run_id) return;
    var base = run.getAttribute('data-tg-base') || '.';
    R.stages.forEach(function (s) {
      var el = run.querySelector('[data-tg-stage="' + s.name + '"]');
      if (!el) return;
      el.className = 'tg-stage tg-' + s.status;
      el.title = s.why || (s.started_at ? 'started ' + s.started_at : '');
      el.textContent = '';
      var name = document.createElement(s.page ? 'a' : 'span');
      if (s.page) name.href = base + '/' + s.page;
      name.textContent = s.name;
      el.appendChild(name);
      el.appendChild(document.createTextNode(' ' + s.status + (s.verdict ? ' ' + s.verdict : '')));
    });
    var set = function (key, text) { var e = run.querySelector('[data-tg="' + key + '"]'); if (e) e.textContent = text; };
    set('date', R.date);
    set('total', R.total_s + ' s');
    set('overrides', R.overrides.length ? R.overrides.join('; ') : 'none');
  });
})();
"""


def write_run_js(run_dir: Path, stale: dict[str, str] | None = None, skipped: dict[str, str] | None = None) -> Path:
    """Write `run_dir/run.js` (atomically): `window.TUNEGATE_RUN = <run_summary>` and the code that puts it into
    every header of that run on the page. Called by the pipeline after each stage and by `tunegate runs` (which
    passes `stale` and `skipped`: stage -> why, measured against the project file). Returns its path."""
    run_dir = Path(run_dir)
    data = json.dumps(run_summary(run_dir, stale=stale, skipped=skipped), sort_keys=True)
    path = run_dir / RUN_JS
    atomic_write_text(path, f"window.TUNEGATE_RUN = {data};\n{_JS.lstrip()}")
    return path
