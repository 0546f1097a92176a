"""Promotion registry: adapter versions with their eval scores and status, in the project's SQLite database.

Statuses: `candidate` (registered, not serving), `production` (at most one per project), `retired`.
The production version is what `tunegate serve` serves under the project's name (tunegate.serve.production
watches this database and switches while it runs).

`promote` moves a version to production only when its eval verdict is PASS, the adapter on disk still has the
sha256 recorded by the train stage, and the run's signed release bundle verifies (the caller passes `verify`,
tunegate.release.verify_bundle with the project's public key: this library module does not import the release
verb) and is this project's release of that very run: release.json's `project`, `run_id` and `adapter_sha256`,
and its `manifests/eval.json` byte for byte the run's eval manifest; the previous production version is retired. A registered version
is copied next to the database: the adapter to `adapters/<project>-v<N>/` (what the eval stage compares
against) and the verified bundle to `bundles/<project>-v<N>/` (what is served; both folders must resolve
inside the project, `copy_folder`), so a later run in the same run
folder cannot change what was promoted. Their sha256 (the adapter's, and the bundle's files.json's, which pins
every file of the bundle) are checked again before a version is promoted or restored. Each copy is made in a
staging folder and published whole (core.io.publish_dir) before its row is committed: a kill leaves either no
row and at most copies that the next registration deletes or replaces, or the row and its whole copies. A
registry made before bundles were stored gains the columns `bundle_dir` and `bundle_sha256` on first use (NULL
for its old rows: such a version is served only once promoted again with its bundle). `rollback` retires the
current production version and restores the one that was in production before it. Every transition is kept
in `transitions`, so the history can be read back.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tunegate import TunegateError
from tunegate.core.io import clean_stale_all, create_private, fault_point, publish_dir, staging_dir
from tunegate.core.manifest import read_manifest
from tunegate.core.paths import inside

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
    bundle_dir TEXT,
    bundle_sha256 TEXT,
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
# Columns added after the first release of the schema: (name, SQL type); `connect` adds those an old file lacks.
ADDED_COLUMNS = (("bundle_dir", "TEXT"), ("bundle_sha256", "TEXT"))
COPY_FOLDERS = ("adapters", "bundles")  # beside the database: the adapter copy and the bundle copy of each version
Verify = Callable[[Path], dict]  # a release bundle folder -> its release.json; TunegateError when it does not verify


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
            have = {r["name"] for r in con.execute("PRAGMA table_info(versions)")}
            for name, kind in ADDED_COLUMNS:
                if name not in have:  # a registry from before the column existed; old rows read NULL
                    con.execute(f"ALTER TABLE versions ADD COLUMN {name} {kind}")
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
    """Raise TunegateError unless the registered version's stored adapter weights (and, when it has one, its stored
    bundle's files.json and adapter weights) still have the sha256 recorded when it was registered (only the
    evaluated adapter is ever served or compared against)."""
    from tunegate.core.manifest import sha256_file

    weights = Path(entry["adapter_dir"]) / "adapter_model.safetensors"
    if not weights.is_file() or sha256_file(weights) != entry["adapter_sha256"]:
        raise TunegateError(f"{weights}: missing or changed since version {entry['version']} was registered; rule: only the evaluated adapter is served")
    if entry.get("bundle_dir"):
        bundle = Path(entry["bundle_dir"])
        files, weights = bundle / "files.json", bundle / "adapter" / "adapter_model.safetensors"
        if not files.is_file() or sha256_file(files) != entry["bundle_sha256"]:
            raise TunegateError(f"{files}: missing or changed since version {entry['version']} was registered; rule: only the evaluated adapter is served")
        if not weights.is_file() or sha256_file(weights) != entry["adapter_sha256"]:
            raise TunegateError(f"{weights}: missing or changed since version {entry['version']} was registered; rule: only the evaluated adapter is served")


def _verified_release(bundle: Path, verify: Verify, digest: str, run_dir: Path, project: str) -> dict[str, Any]:
    """`verify(bundle)`, and the bundle must be this project's release of this very run: its release.json holds the
    adapter of sha256 `digest`, names `project` and run `run_dir.name`, and its manifests/eval.json is the run's
    eval/manifest.json byte for byte (the evaluation that gated it). Raises TunegateError naming the field."""
    from tunegate.core.manifest import manifest_hash, sha256_file

    if not (Path(bundle) / "release.json").is_file():
        raise TunegateError(f"{bundle}: no signed release bundle; rule: only a released (signed, verified) version can be "
                            "promoted; run the release stage (`tunegate release`) first")
    release = verify(Path(bundle))
    if release.get("adapter_sha256") != digest:
        raise TunegateError(f"{bundle}/release.json: adapter_sha256 {release.get('adapter_sha256')} is not the one "
                            f"{run_dir}/train recorded ({digest}); rule: the bundle must hold the evaluated adapter")
    rule = "rule: the bundle must be this project's release of the evaluated run"
    if release.get("project") != project:
        raise TunegateError(f"{bundle}/release.json: project {release.get('project')!r} is not {project!r}; {rule}")
    if release.get("run_id") != run_dir.name:
        raise TunegateError(f"{bundle}/release.json: run_id {release.get('run_id')!r} is not {run_dir.name!r} ({run_dir}); {rule}")
    evidence = Path(bundle) / "manifests" / "eval.json"
    if not evidence.is_file() or sha256_file(evidence) != manifest_hash(run_dir / "eval"):
        raise TunegateError(f"{evidence}: missing or not {run_dir}/eval/manifest.json byte for byte; rule: the bundle must "
                            "carry the evaluation that gated this run (release the run again after a new eval)")
    return release


def copy_folder(db_path: Path, folder: str, root: Path | None = None) -> Path:
    """`<folder of db_path>/<folder>` (`adapters` or `bundles`, COPY_FOLDERS), once it resolves inside `root` (the
    project folder; default the database's folder), before anything is written there. Raises TunegateError: it
    leads outside (a link)."""
    path = Path(db_path).parent / folder
    inside(root if root is not None else Path(db_path).parent, path, f"registry {folder}/ folder")
    return path


def _store_bundle(bundle: Path, stored: Path, verify: Verify, digest: str, run_dir: Path, project: str) -> str:
    """Copy `bundle` to `stored` through a staging folder, verify the copy (signature, files, adapter sha256) and
    publish it. Returns the sha256 of the copy's files.json. Raises TunegateError: the copy does not verify."""
    import shutil

    from tunegate.core.manifest import sha256_file

    staged = staging_dir(stored)
    try:
        shutil.copytree(bundle, staged, dirs_exist_ok=True, symlinks=True)
        try:
            _verified_release(staged, verify, digest, run_dir, project)
        except TunegateError as exc:
            raise TunegateError(str(exc).replace(str(staged), str(bundle)) + " (changed while it was copied into the registry)") from None
        files_sha = sha256_file(staged / "files.json")
        publish_dir(staged, stored)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return files_sha


def register(db_path: Path, project: str, run_dir: Path, *, bundle: Path, verify: Verify,
             root: Path | None = None) -> dict[str, Any]:
    """Record a finished run's adapter and its signed release bundle as a candidate and copy both into the
    registry (idempotent). `verify(folder)` verifies a release bundle and returns its release.json
    (tunegate.release.verify_bundle with the project's public key).

    Order, so that a kill at any point is harmless: the bundle is verified, the row is inserted (uncommitted,
    holding SQLite's write lock), the adapter is copied into a staging folder beside `adapters/<project>-v<N>/`,
    checked against the train manifest's sha256 and published (fsync, rename), the bundle likewise to
    `bundles/<project>-v<N>/` (the copy verified again), then the row is committed. A kill before the commit
    rolls the row back; the next registration reuses N and replaces the copies, and deletes copies whose number
    the database has since given to another project, and dead staging folders. A row registered before bundles
    were stored gets its bundle copy now.

    `root`: the project folder `adapters/` and `bundles/` must resolve inside (`copy_folder`; default the
    database's folder), checked before anything is written.

    Raises TunegateError without a finished eval, when the adapter changed since training (or while copied), when
    the bundle is missing, does not verify, or is not this project's release of this run (`_verified_release`),
    or when a copy folder leads outside the project.
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
    _verified_release(bundle, verify, digest, run_dir, project)  # refused before anything is written
    adapters, bundles = (copy_folder(db_path, f, root) for f in COPY_FOLDERS)
    with connect(db_path) as con:
        row = con.execute(
            "SELECT * FROM versions WHERE project=? AND run_id=? AND adapter_sha256=?", (project, run_dir.name, digest)
        ).fetchone()
        if row is not None and not row["bundle_dir"]:  # registered before bundles were stored: store it now
            stored_bundle = bundles / f"{project}-v{row['version']}"
            files_sha = _store_bundle(bundle, stored_bundle, verify, digest, run_dir, project)
            con.execute("UPDATE versions SET bundle_dir=?, bundle_sha256=? WHERE version=?",
                        (str(stored_bundle), files_sha, row["version"]))
            row = con.execute("SELECT * FROM versions WHERE version=?", (row["version"],)).fetchone()
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
            for folder in (adapters, bundles):
                _clean_adapters(con, folder, project, cur.lastrowid)
            stored = adapters / f"{project}-v{cur.lastrowid}"
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
            stored_bundle = bundles / f"{project}-v{cur.lastrowid}"
            files_sha = _store_bundle(bundle, stored_bundle, verify, digest, run_dir, project)
            fault_point("registry:published")
            con.execute("UPDATE versions SET adapter_dir=?, bundle_dir=?, bundle_sha256=? WHERE version=?",
                        (str(stored), str(stored_bundle), files_sha, cur.lastrowid))
            row = con.execute("SELECT * FROM versions WHERE version=?", (cur.lastrowid,)).fetchone()
        return dict(row)


def _clean_adapters(con: sqlite3.Connection, adapters: Path, project: str, new_version: int) -> None:
    """Delete what killed registrations left in `adapters/` (or `bundles/`): staging folders of dead processes, and copies
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


def promote(db_path: Path, project: str, run_dir: Path, *, bundle: Path, verify: Verify,
            root: Path | None = None) -> dict[str, Any]:
    """Register the run and its release bundle `bundle` if needed (see `register`, also for `root`) and make it
    production.

    Returns:
        The version's row (version, run_id, status, adapter_dir, adapter_sha256, bundle_dir, bundle_sha256, ...).

    Raises:
        TunegateError: the verdict is not PASS, the bundle is missing, does not verify (`verify`) or is not this
            project's release of this run, a copy folder leads outside `root`, or a stored copy changed since it
            was registered.
    """
    ev = read_manifest(run_dir / "eval")
    if ev is not None and ev.verdict != "PASS":
        raise TunegateError(
            f"{run_dir}/eval/verdict.json: verdict {ev.verdict}; rule: only a version whose eval gate passed can be promoted"
        )
    entry = register(db_path, project, run_dir, bundle=bundle, verify=verify, root=root)
    check_stored(entry)
    verify(Path(entry["bundle_dir"]))  # the stored copy, as the server will load it
    with connect(db_path) as con:
        current = con.execute("SELECT version FROM versions WHERE project=? AND status='production'", (project,)).fetchone()
        if current and current["version"] == entry["version"]:
            return entry
        if current:
            _move(con, project, current["version"], "retired", f"replaced by version {entry['version']}")
        _move(con, project, entry["version"], "production", "promoted")
        return dict(con.execute("SELECT * FROM versions WHERE version=?", (entry["version"],)).fetchone())


def rollback(db_path: Path, project: str, verify: Verify | None = None, root: Path | None = None) -> dict[str, Any]:
    """Retire the production version and restore the version that was in production before it.

    With `verify` (a release bundle folder -> release.json, as for `promote`) the restored version must have a
    stored bundle that verifies: it is what the server switches to. `root`: the project folder the copy folders
    must resolve inside (`copy_folder`), as for `promote`.

    Raises TunegateError when there is no production version or nothing to roll back to, or the version to restore
    has no stored bundle (with `verify`), or a stored copy changed, or a copy folder leads outside `root`.
    """
    if not Path(db_path).is_file():
        raise TunegateError(f"{db_path}: no registry yet; project {project} has no production version to roll back")
    for folder in COPY_FOLDERS:
        copy_folder(db_path, folder, root)  # a `bundles/` link leading outside: refused, as promote refuses it
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
        restored = dict(con.execute("SELECT * FROM versions WHERE version=?", (previous["version"],)).fetchone())
        check_stored(restored)
        if verify is not None:
            if not restored["bundle_dir"]:
                raise TunegateError(f"{db_path}: version {restored['version']} was registered without a release bundle and "
                                    "cannot be served; promote its run again once it has one (`tunegate release`)")
            verify(Path(restored["bundle_dir"]))
        _move(con, project, current["version"], "retired", f"rolled back to version {previous['version']}")
        _move(con, project, previous["version"], "production", f"restored by rollback from version {current['version']}")
        return dict(con.execute("SELECT * FROM versions WHERE version=?", (previous["version"],)).fetchone())


def version(db_path: Path, project: str, number: int) -> dict[str, Any] | None:
    """The row of registered version `number` of `project`; None when there is none (reading creates nothing)."""
    if not Path(db_path).is_file():
        return None
    with connect(db_path) as con:
        row = con.execute("SELECT * FROM versions WHERE project=? AND version=?", (project, number)).fetchone()
        return dict(row) if row else None


def versions(db_path: Path, project: str) -> list[dict[str, Any]]:
    if not Path(db_path).is_file():
        return []  # reading creates nothing
    with connect(db_path) as con:
        return [dict(r) for r in con.execute("SELECT * FROM versions WHERE project=? ORDER BY version", (project,))]
