"""Promotion is what is served: the registry's production version is served under the project's name, and a
running server follows `tunegate promote` and `tunegate rollback` without a restart.

`promote` and `rollback` (the CLI verbs) move versions in the registry (tunegate.registry); a version needs a
signed release bundle that verifies with the project's public key (tunegate.release.public_key_for), and the
registry keeps its own verified copy of it (`bundles/<project>-v<N>/`).

`Switchboard` is the server's side. Public names it serves:
  NAME       the project `name`: the registry's production version (404 with a clear message while there is none)
  NAME-vN    each version N pinned in `serve.versions`
Each registered version is loaded into the engine once, under its slot name `NAME-vN` (a PEFT adapter name in
the embedded engine, a LoRA name in vLLM), from a private copy of its stored bundle that was verified there
(tunegate.serve.bundles.copy_verified: signature, PASS, same base model), and whose adapter sha256 must be the
registry's. `engine.adapters[public name]` is a ServedAdapter naming the slot and the version label.

The switch (`sync`, run by the watcher thread every `serve.reload_interval_s`): the new version is loaded first,
then `engine.adapters[NAME]` is replaced in one assignment. A request takes a lease on the ServedAdapter it found
(`lease`) before it generates and gives it back after, so a request in flight finishes on the version it started
with, and the next request gets the new one. A slot no public name points at any more is unloaded by the watcher
once no lease holds it. A version that cannot be loaded (refused bundle, changed copy, an engine error) is logged
once and the name keeps serving what it served: a bad promotion never takes the endpoint down, and one name's
failure never stops the others. A version the engine cannot serve at all (tunegate.serve.engine.NotServable: DoRA
on vLLM, a --merged server) never fails start-up either: a name with nothing else to serve answers 404 saying why.
`promote` refuses release.sigstore: the registry and the server verify with a key only.

The response of every chat completion names what answered (tunegate.serve.api): `X-Tunegate-Adapter-Version`
(`NAME-vN`, a static bundle's name, or `base`) and `X-Tunegate-Adapter-Sha256`; the trace row keeps the label
(tunegate.serve.db, column `version`), and `tunegate data feedback` rows carry it in their meta.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from tunegate import TunegateError, registry
from tunegate.serve.bundles import ServedAdapter, copy_verified
from tunegate.serve.engine import NotServable


# vLLM starts with LoRA support up to this rank even before any version is promoted, so that versions promoted
# while it runs can be loaded (a higher rank needs a restart: case C14 in docs/cases.md).
REGISTRY_LORA_RANK = 64


# ---------------------------------------------------------------- the verbs

def verifier(project) -> Callable[[Path], dict]:
    """A release bundle folder -> its release.json, verified with the project's public key.

    Raises:
        TunegateError: no public key (serve.public_key unset and no <project>/.tunegate/keys/public.pem).
    """
    from tunegate.release import public_key_for, verify_bundle

    key = public_key_for(project)
    if key is None:
        raise TunegateError(f"{project.source_file}: serve.public_key is not set and {Path(project.root) / '.tunegate/keys/public.pem'} "
                            "does not exist; rule: only a signed bundle that verifies is promoted or served")
    return partial(verify_bundle, public_key=key)


def promote(project, run_id: str = "default") -> dict[str, Any]:
    """Make run `run_id` the production version of the project (tunegate.registry.promote with its bundle
    runs/<id>/release/bundle/ and the project's public key). Returns the version's registry row.

    Raises:
        TunegateError: release.sigstore is set (the registry and the server verify with a key only), verdict not
            PASS, no bundle, a bundle that does not verify or is not this project's release of this run.
    """
    from tunegate.pipeline import run_dir_for
    from tunegate.release import bundle_dir

    release_cfg = getattr(project, "release", None)
    if release_cfg is not None and release_cfg.sigstore:
        raise TunegateError(f"{project.source_file}: release.sigstore is true; Sigstore-signed bundles cannot be promoted "
                            "yet (the registry and the server verify with a key): sign with a key (release.key, or "
                            "neither for the project's own key) and release the run again")
    run_dir = run_dir_for(project, run_id)
    return registry.promote(project.registry, project.name, run_dir, bundle=bundle_dir(run_dir), verify=verifier(project),
                            root=Path(project.root))


def rollback(project) -> dict[str, Any]:
    """Restore the previous production version (tunegate.registry.rollback; its stored bundle must verify).

    Raises:
        TunegateError: nothing to roll back to, or the version to restore has no bundle that verifies.
    """
    return registry.rollback(project.registry, project.name, verify=verifier(project), root=project.root)


def version_label(name: str, version: int) -> str:
    """A registered version's public name, slot name and response header value: `NAME-vN`."""
    return f"{name}-v{version}"


def served_names(project) -> dict[str, dict[str, Any] | None]:
    """Public name -> the registry row it should serve now (None: nothing: no production version yet, or a pinned
    version that is not registered): NAME (production), then NAME-vN for each version in serve.versions."""
    db, name = project.registry, project.name
    rows: dict[str, dict[str, Any] | None] = {name: registry.production(db, name)}
    for v in (project.serve.versions if project.serve is not None else []):
        rows[version_label(name, v)] = registry.version(db, name, v)
    return rows


def registry_copies(project, into: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Verified private copies of the bundles the registry serves now (`served_names`), for vLLM's launch:
    slot -> (`into`/slot, release.json). Raises TunegateError: a stored bundle is refused or changed."""
    from tunegate.release import public_key_for

    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for row in served_names(project).values():
        if row is None or version_label(project.name, row["version"]) in out:
            continue
        if not row.get("bundle_dir"):
            raise TunegateError(f"{project.registry}: version {row['version']} was registered without a release bundle; "
                                "promote its run again once it has one")
        registry.check_stored(row)
        slot = version_label(project.name, row["version"])
        out[slot] = (Path(into) / slot, copy_verified(Path(row["bundle_dir"]), Path(into) / slot, public_key_for(project), project))
    return out


# ---------------------------------------------------------------- the server side

class Switchboard:
    """The registry-served names of one engine, the leases of requests in flight, and the watcher thread.

    Thread-safe: `lease` runs on request threads, `sync` and `reap` on the watcher thread (one at a time).
    """

    def __init__(self, project, engine, interval_s: float | None = None, log: Callable[[str], None] | None = None):
        serve = project.serve
        self.project, self.engine = project, engine
        self.name = project.name
        self.pinned = list(serve.versions) if serve is not None else []
        self.interval_s = interval_s if interval_s is not None else (serve.reload_interval_s if serve is not None else 1.0)
        self.log = log or (lambda msg: print(f"tunegate serve: {msg}", file=sys.stderr, flush=True))
        self.missing: dict[str, str] = {}  # public name -> why it has nothing to serve (the 404 message)
        self.switched_at: dict[str, float] = {}  # public name -> time.time() of its last switch
        self._slots: dict[str, ServedAdapter] = {}  # loaded slot -> what it serves
        self._leases: Counter[str] = Counter()
        self._lock = threading.Lock()  # _leases and engine.adapters[...] assignments
        self._sync_lock = threading.Lock()
        self._failed: dict[str, str] = {}  # "load NAME", "unload SLOT", ... -> the message logged last (once per message)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._check_names()
        self._workdir = tempfile.TemporaryDirectory(prefix="tunegate-production-")

    @property
    def names(self) -> list[str]:
        """The public names served from the registry: the project name, then each pinned version's."""
        return [self.name] + [version_label(self.name, v) for v in self.pinned]

    def clashes(self, name: str) -> bool:
        """Whether `name` is one of the registry's names for this project, NAME or NAME-vN (served or not): such a
        name is never given to a serve.bundles bundle or a runtime adapter (/admin/adapters)."""
        return re.fullmatch(rf"{re.escape(self.name)}(-v\d+)?", name) is not None

    def _check_names(self) -> None:
        taken = [n for n in self.engine.adapters if self.clashes(n)]
        if self.engine.base_name == self.name:
            taken.append(f"{self.name} (the base model's name)")
        if taken:
            raise TunegateError(f"serve.bundles: adapter name(s) {', '.join(taken)} clash with the registry's names for "
                                f"project {self.name} (NAME, NAME-vN); give the bundle another `name`")

    # ------------------------------------------------------------ requests

    @contextmanager
    def lease(self, name: str | None) -> Iterator[ServedAdapter | None]:
        """What `name` serves now (None: the base model, or a name not loaded), held until the block ends: its
        slot is not unloaded before then, whatever is promoted meanwhile."""
        with self._lock:
            served = self.engine.adapters.get(name) if name is not None else None
            slot = served.slot if served is not None else None
            if slot is not None:
                self._leases[slot] += 1
        try:
            yield served
        finally:
            if slot is not None:
                with self._lock:
                    self._leases[slot] -= 1

    # ------------------------------------------------------------ the registry

    def sync(self, strict: bool = False) -> list[str]:
        """Bring every public name to the version the registry wants: load it if it is not loaded, then switch the
        name. Returns one line per switch. A version this engine cannot serve (NotServable: DoRA on vLLM, a
        --merged server, ...) never fails: it is logged once, and a name with nothing else to serve is marked
        missing with the reason (its 404). Any other error of one name is logged once per distinct message and
        the name keeps what it served; the other names are still synced, and idle slots are reaped in any case.
        `strict` (at start-up): such other errors (a refused or changed bundle) raise instead."""
        events: list[str] = []
        with self._sync_lock:
            try:
                for name, row in served_names(self.project).items():
                    event = self._sync_name(name, row, strict)
                    if event:
                        events.append(event)
            finally:
                for e in events:
                    self.log(e)
                self.reap()
        return events

    def _sync_name(self, name: str, row: dict[str, Any] | None, strict: bool) -> str | None:
        """Switch one public name to `row`'s version (see `sync`). Returns the event line, None when nothing changed."""
        current = self.engine.adapters.get(name)
        if row is None:
            self.missing[name] = (f"model {name!r}: the registry has no production version of project {self.name}; "
                                  f"promote one (tunegate promote)") if name == self.name else (
                                  f"model {name!r}: version {name.rsplit('-v', 1)[1]} of project {self.name} is not "
                                  "in the registry (serve.versions)")
            if current is None:
                return None
            with self._lock:  # e.g. the registry file was replaced: stop serving what it no longer lists
                del self.engine.adapters[name]
            return f"{name}: no version in the registry any more; not served"
        label = version_label(self.name, row["version"])
        if current is not None and current.slot == label:
            return None
        try:
            served = self._load(label, row)
        except NotServable as exc:
            if current is None:
                self.missing[name] = (f"model {name!r}: version {row['version']} of project {self.name} cannot be served "
                                      f"by this server: {exc}")
            self._log_once(f"load {name}", f"{name}: version {row['version']} not loaded, still serving "
                                  f"{current.version if current else 'nothing'}: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - one name's failure (a locked file, an engine error) spares the others
            if strict and isinstance(exc, TunegateError):
                raise
            why = str(exc) if isinstance(exc, TunegateError) else f"{type(exc).__name__}: {exc}"
            self._log_once(f"load {name}", f"{name}: version {row['version']} not loaded, still serving "
                                  f"{current.version if current else 'nothing'}: {why}")
            return None
        with self._lock:
            self.engine.adapters[name] = replace(served, name=name)
        self._failed.pop(f"load {name}", None)
        self.missing.pop(name, None)
        self.switched_at[name] = time.time()
        return f"{name} -> {label} (run {row['run_id']}, adapter sha256 {row['adapter_sha256'][:12]})"

    def _log_once(self, key: str, message: str) -> None:
        """Log `message` unless it is the one last logged for `key` (a failure retried every sync is logged once)."""
        if self._failed.get(key) != message:
            self._failed[key] = message
            self.log(message)

    def _load(self, label: str, row: dict[str, Any]) -> ServedAdapter:
        """The slot `label` loaded in the engine (once), from a verified private copy of the stored bundle."""
        if label in self._slots:
            return self._slots[label]
        from tunegate.release import public_key_for

        if not row.get("bundle_dir"):
            raise TunegateError(f"{self.project.registry}: version {row['version']} was registered without a release bundle; "
                                "promote its run again once it has one")
        registry.check_stored(row)
        copy = Path(self._workdir.name) / label
        shutil.rmtree(copy, ignore_errors=True)
        try:
            release = copy_verified(Path(row["bundle_dir"]), copy, public_key_for(self.project), self.project)
            if release.get("adapter_sha256") != row["adapter_sha256"]:
                raise TunegateError(f"{row['bundle_dir']}: adapter_sha256 is not the registry's for version {row['version']}")
            self.engine.load_slot(label, copy, release)
        except BaseException:
            shutil.rmtree(copy, ignore_errors=True)
            raise
        served = ServedAdapter(label, Path(row["bundle_dir"]), release, slot=label, version=label)
        self._slots[label] = served
        return served

    def reap(self) -> list[str]:
        """Unload every loaded slot no public name points at and no request holds. Returns their names."""
        done = []
        with self._lock:
            used = {a.slot for a in self.engine.adapters.values() if a.slot is not None}
            idle = [s for s in self._slots if s not in used and self._leases[s] <= 0]
        for slot in idle:
            try:
                self.engine.unload_slot(slot)
            except Exception as exc:  # noqa: BLE001 - PEFT's delete_adapter raises ValueError, vLLM's client httpx errors
                why = str(exc) if isinstance(exc, TunegateError) else f"{type(exc).__name__}: {exc}"
                self._log_once(f"unload {slot}", f"{slot}: could not be unloaded (retried at the next sync): {why}")
                continue
            self._failed.pop(f"unload {slot}", None)
            del self._slots[slot]
            shutil.rmtree(Path(self._workdir.name) / slot, ignore_errors=True)
            done.append(slot)
            self.log(f"{slot}: unloaded (no request uses it)")
        return done

    @property
    def loaded(self) -> list[str]:
        """The slots loaded in the engine now."""
        return list(self._slots)

    # ------------------------------------------------------------ the watcher

    def start(self) -> None:
        """Poll the registry every `interval_s` on a daemon thread (`sync`); an error is logged, never raised."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.sync()
                    self._failed.pop("registry watcher", None)
                except Exception as exc:  # noqa: BLE001 - the watcher must outlive a locked or broken registry file
                    self._log_once("registry watcher", f"registry watcher: {type(exc).__name__}: {exc}")

        self._thread = threading.Thread(target=loop, name="tunegate-registry-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0, unload: bool = False) -> bool:
        """Stop the watcher (waits up to `timeout_s` for a sync in progress) and delete the private bundle copies;
        with `unload`, first take the registry's names off the engine and unload every slot (an app that failed
        to start gives the engine back as it was). Returns False when the watcher was still running after
        `timeout_s`: nothing is unloaded or deleted under it then (logged; the temporary folder goes when the
        process exits)."""
        self._stop.set()
        thread = self._thread  # a second stop() in another thread (server shutdown) may set it to None meanwhile
        if thread is not None:
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                self.log(f"registry watcher: still running after {timeout_s:g} s; its bundle copies in "
                         f"{self._workdir.name} are left in place")
                return False
            self._thread = None
        if unload:
            with self._lock:
                for name in self.names:
                    self.engine.adapters.pop(name, None)
            self.reap()
        self._workdir.cleanup()
        return True
