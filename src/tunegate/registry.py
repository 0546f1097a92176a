"""Promotion registry: adapter versions with their eval scores and status, in the project's SQLite database.

Statuses: `candidate` (registered, not serving), `production` (at most one per project), `retired`.
`promote` moves a version to production only when its eval verdict is PASS and the adapter on disk still
has the sha256 recorded by the train stage; the previous production version is retired. A registered
adapter is copied next to the database (`adapters/<project>-v<N>/`), so a later run in the same run folder
cannot change what was promoted; its sha256 is checked again before it is promoted or restored. The copy is made
in a staging folder and published whole (core.io.publish_dir) before its row is committed: a kill leaves either
no row and at most a copy that the next registration deletes or replaces, or the row and its whole copy. `rollback`
retires the current production version and restores the one that was in production before it. Every
transition is kept in `transitions`, so the history can be read back.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tunegate import TunegateError
from tunegate.core.io import clean_stale_all, create_private, fault_point, publish_dir, staging_dir
from tunegate.core.manifest import read_manifest

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    run_id TEXT NOT NULL,
    adapter_dir TEXT NOT NULL,
    adapter_sha256 TEXT NOT NULL,
    eval_manifest_sha256 TEXT NOT NULL,
    verdict TEXT NOT NULL,
    scores TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('candidate', 'production', 'retired')),
    created_at TEXT NOT NULL,
    UNIQUE (project, run_id, adapter_sha256)
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    version INTEGER NOT NULL REFERENCES versions(version),
    from_status TEXT,
    to_status TEXT NOT NULL,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextmanager
def connect(db_path: Path) -> Iterator[sqlite3.Connection]:
    """One transaction: committed on success, rolled back on any error."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    create_private(db_path)  # 0600: who may promote what is nobody else's business
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        try:
            con.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise TunegateError(f"{db_path}: not a tunegate registry ({exc}); `registry` names an SQLite file "
                                "tunegate creates: point it at a new path or move that file away") from None
        with con:
            yield con
    finally:
        con.close()


def _adapter_digest(run_dir: Path) -> str:
    train = read_manifest(run_dir / "train")
    if train is None:
        raise TunegateError(f"{run_dir}/train: no finished train stage to register")
    digest = train.outputs.get("adapter/adapter_model.safetensors")
    if digest is None:
        if "model/model.safetensors" in train.outputs:
            raise TunegateError(f"{run_dir}/train: a full fine-tune (train.adapter: full) is a whole model, not an adapter; "
                                "the registry versions adapters on one base model. Publish it from train/model/ by hand")
        raise TunegateError(f"{run_dir}/train/manifest.json: no adapter weights recorded")
    return digest


def check_stored(entry: dict[str, Any]) -> None:
    """Raise TunegateError unless the registered version's stored adapter weights still have the sha256 recorded
    when it was registered (only the evaluated adapter is ever served or compared against)."""
    from tunegate.core.manifest import sha256_file

    weights = Path(entry["adapter_dir"]) / "adapter_model.safetensors"
    if not weights.is_file() or sha256_file(weights) != entry["adapter_sha256"]:
        raise TunegateError(f"{weights}: missing or changed since version {entry['version']} was registered; rule: only the evaluated adapter is served")


def register(db_path: Path, project: str, run_dir: Path) -> dict[str, Any]:
    """Record a finished run's adapter as a candidate and copy it into the registry (idempotent).

    Order, so that a kill at any point is harmless: the row is inserted (uncommitted, holding SQLite's write lock),
    the adapter is copied into a staging folder beside `adapters/<project>-v<N>/`, checked against the train
    manifest's sha256 and published (fsync, rename), then the row is committed. A kill before the commit rolls
    the row back; the next registration reuses N and replaces the copy, and deletes copies whose number the
    database has since given to another project, and dead staging folders.

    Raises TunegateError without a finished eval, or when the adapter changed since training (or while copied).
    """
    import shutil

    from tunegate.core.manifest import manifest_hash, sha256_file, verify_outputs

    ev = read_manifest(run_dir / "eval")
    if ev is None:
        raise TunegateError(f"{run_dir}/eval: no finished eval stage; run `tunegate eval` first")
    train = read_manifest(run_dir / "train")
    broken = verify_outputs(run_dir / "train", train) if train else ["manifest.json (missing)"]
    if broken:
        raise TunegateError(f"{run_dir}/train: files changed since training: {', '.join(broken)}; rule: only the evaluated adapter can be registered")
    digest = _adapter_digest(run_dir)
    with connect(db_path) as con:
        row = con.execute(
            "SELECT * FROM versions WHERE project=? AND run_id=? AND adapter_sha256=?", (project, run_dir.name, digest)
        ).fetchone()
        if row is None:
            cur = con.execute(
                "INSERT INTO versions (project, run_id, adapter_dir, adapter_sha256, eval_manifest_sha256, verdict, scores, status, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'candidate', ?)",
                (project, run_dir.name, str(run_dir / "train" / "adapter"), digest, manifest_hash(run_dir / "eval"),
                 ev.verdict or "NONE", json.dumps(ev.metrics), _now()),
            )
            con.execute(
                "INSERT INTO transitions (project, version, from_status, to_status, reason, at) VALUES (?, ?, NULL, 'candidate', 'registered', ?)",
                (project, cur.lastrowid, _now()),
            )
            adapters = db_path.parent / "adapters"
            stored = adapters / f"{project}-v{cur.lastrowid}"
            _clean_adapters(con, adapters, project, cur.lastrowid)
            staged = staging_dir(stored)
            try:
                shutil.copytree(run_dir / "train" / "adapter", staged, dirs_exist_ok=True)
                if sha256_file(staged / "adapter_model.safetensors") != digest:
                    raise TunegateError(f"{run_dir}/train/adapter/adapter_model.safetensors: changed while it was copied "
                                        "into the registry; rule: only the evaluated adapter can be registered")
                publish_dir(staged, stored)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            fault_point("registry:published")
            con.execute("UPDATE versions SET adapter_dir=? WHERE version=?", (str(stored), cur.lastrowid))
            row = con.execute("SELECT * FROM versions WHERE version=?", (cur.lastrowid,)).fetchone()
        return dict(row)


def _clean_adapters(con: sqlite3.Connection, adapters: Path, project: str, new_version: int) -> None:
    """Delete what killed registrations left in `adapters/`: staging folders of dead processes, and copies
    `<project>-v<N>/` renamed in whose row was never committed and whose number N the database has since given to
    another project. Called holding the write lock (after an INSERT), so no other registration is in flight.
    A copy whose N belongs to this project, or to no row yet, is left: it is that row's, or N's next owner
    replaces it."""
    import re
    import shutil

    clean_stale_all(adapters)
    if not adapters.is_dir():
        return
    pattern = re.compile(rf"^{re.escape(project)}-v(\d+)$")
    for entry in adapters.iterdir():
        m = pattern.match(entry.name)
        if not m or int(m[1]) == new_version or not entry.is_dir():
            continue
        row = con.execute("SELECT project FROM versions WHERE version=?", (int(m[1]),)).fetchone()
        if row is not None and row["project"] != project:
            shutil.rmtree(entry, ignore_errors=True)


def _move(con: sqlite3.Connection, project: str, version: int, to: str, reason: str) -> None:
    old = con.execute("SELECT status FROM versions WHERE version=?", (version,)).fetchone()["status"]
    con.execute("UPDATE versions SET status=? WHERE version=?", (to, version))
    con.execute(
        "INSERT INTO transitions (project, version, from_status, to_status, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
        (project, version, old, to, reason, _now()),
    )


def production(db_path: Path, project: str) -> dict[str, Any] | None:
    if not Path(db_path).is_file():
        return None
    with connect(db_path) as con:
        row = con.execute("SELECT * FROM versions WHERE project=? AND status='production'", (project,)).fetchone()
        return dict(row) if row else None


def promote(db_path: Path, project: str, run_dir: Path) -> dict[str, Any]:
    """Register the run if needed and make it production. Raises TunegateError unless its verdict is PASS."""
    ev = read_manifest(run_dir / "eval")
    if ev is not None and ev.verdict != "PASS":
        raise TunegateError(
            f"{run_dir}/eval/verdict.json: verdict {ev.verdict}; rule: only a version whose eval gate passed can be promoted"
        )
    entry = register(db_path, project, run_dir)
    check_stored(entry)
    with connect(db_path) as con:
        current = con.execute("SELECT version FROM versions WHERE project=? AND status='production'", (project,)).fetchone()
        if current and current["version"] == entry["version"]:
            return entry
        if current:
            _move(con, project, current["version"], "retired", f"replaced by version {entry['version']}")
        _move(con, project, entry["version"], "production", "promoted")
        return dict(con.execute("SELECT * FROM versions WHERE version=?", (entry["version"],)).fetchone())


def rollback(db_path: Path, project: str) -> dict[str, Any]:
    """Retire the production version and restore the version that was in production before it.

    Raises TunegateError when there is no production version or nothing to roll back to.
    """
    if not Path(db_path).is_file():
        raise TunegateError(f"{db_path}: no registry yet; project {project} has no production version to roll back")
    with connect(db_path) as con:
        current = con.execute("SELECT version FROM versions WHERE project=? AND status='production'", (project,)).fetchone()
        if current is None:
            raise TunegateError(f"{db_path}: project {project} has no production version to roll back")
        # The last version in production before the current one, skipping versions that a rollback retired:
        # a second rollback goes further back instead of toggling between two versions.
        previous = con.execute(
            "SELECT t.version FROM transitions t JOIN versions v ON v.version = t.version"
            " WHERE t.project=? AND t.to_status='production' AND t.version != ? AND v.status='retired'"
            " AND (SELECT r.reason FROM transitions r WHERE r.version = t.version AND r.to_status = 'retired'"
            "      ORDER BY r.id DESC LIMIT 1) NOT LIKE 'rolled back%'"
            " ORDER BY t.id DESC LIMIT 1",
            (project, current["version"]),
        ).fetchone()
        if previous is None:
            raise TunegateError(f"{db_path}: version {current['version']} is the first production version; nothing to roll back to")
        check_stored(dict(con.execute("SELECT * FROM versions WHERE version=?", (previous["version"],)).fetchone()))
        _move(con, project, current["version"], "retired", f"rolled back to version {previous['version']}")
        _move(con, project, previous["version"], "production", f"restored by rollback from version {current['version']}")
        return dict(con.execute("SELECT * FROM versions WHERE version=?", (previous["version"],)).fetchone())


def versions(db_path: Path, project: str) -> list[dict[str, Any]]:
    if not Path(db_path).is_file():
        return []  # reading creates nothing
    with connect(db_path) as con:
        return [dict(r) for r in con.execute("SELECT * FROM versions WHERE project=? ORDER BY version", (project,))]
