"""Files written whole or not at all: atomic file writes, the one folder publish, JSONL reading.

Stage outputs, manifests, bundles, merges and registry copies are written through here, so a process killed at
any instant leaves either the old file (or folder) or the new one, never half of one, and whatever a kill
leaves beside it is recognised and removed by the next run.

How a folder is published (`publish_dir`), and why:

- The new folder is built in a staging folder beside the final one, `.NAME.PID-TOKEN.partial`
  (`staging_dir`; a pipeline stage uses its fixed `.STAGE.partial`, `Stage.partial_dir`), then every file and
  folder in it is fsynced.
- On Linux the staged folder and `final` are swapped in one step, `renameat2(RENAME_EXCHANGE)` (Linux 3.15+,
  glibc 2.28+; ext4, xfs, btrfs, tmpfs, overlayfs). There is no instant at which `final` is missing or half
  there, and afterwards the old folder sits under the staging name and is deleted. A kill at any point
  therefore leaves at most one folder beside `final`, under a staging name: the unfinished new one, or the
  old one after the swap. Nothing is ever "restored"; the next run deletes it. (The scheme this replaces
  renamed the old folder aside to `.NAME.old-PID` and the new one in: a kill after the second rename left the
  old copy aside, and the next run restored it over a bundle the user had deleted meanwhile.)
- When `final` does not exist, it is one plain rename.
- Where the exchange is not available (not Linux, an old glibc, a file system without it such as NFS), the two
  renames remain: `final` -> `.NAME.PID-TOKEN.old` (the staged folder's PID and token), staged -> `final`,
  delete the aside. A kill between the two renames leaves `final` missing, the aside and the staged folder:
  the pair says the publish never finished, and the next run puts the aside back. An aside found without its
  staged folder is from a publish whose second rename happened: it is stale and deleted, also when `final`
  is missing (then the user deleted the new folder, and the older one must not come back).

Leftovers of interrupted publishes are removed by `clean_stale(final)`, which release, export, the model
cache, the pipeline stages and the registry call before they publish (and `publish_dir` after). A leftover
is deleted only when its owner is gone: the PID in its name is not a live process (`os.kill(pid, 0)`), or,
for a stage's fixed `.STAGE.partial`, nobody holds the `flock` the running stage keeps on it. A live
owner's folder is left alone, so two processes may publish beside each other. Limits: a process in another
PID namespace (another container, another host on a shared file system) counts as dead unless a local
process has its PID; a reused PID keeps a leftover until that process exits. Leftovers of earlier tunegate
versions: `.NAME.RANDOM.partial` and `.NAME.RANDOM.tmp` (no PID) are deleted; `.NAME.old-PID` is deleted
when `final` exists, and when `final` is missing it is named in one line and left alone: it is either the
old folder of a publish killed between its two renames or a stale copy of a folder the user deleted since,
and only the user can tell which (move it back, or delete it; the next publish of `final` deletes it, and
`release` refuses to make one until the user has decided or passed --force).

Tests kill a process at the named steps of a publish with `TUNEGATE_FAULT` (`fault_point`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

UTF8_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (Windows editors, Excel exports): read as UTF-8, never as data


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder (`.NAME.PID-TOKEN.tmp`), fsync, rename: readers see the old
    file or the new one. Temporary files that killed writers of `path` left are deleted first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path, folders=False)  # temporary files of writers of `path` killed before their rename
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    _MINE.add(_key(tmp))  # another thread's clean_stale must not take it for a dead process's
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the mode open() would
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _MINE.discard(_key(tmp))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def json_line(row: Any) -> str:
    """One JSON line, non-ASCII characters as themselves; a row holding a lone surrogate (JSON's "\\ud800" read
    from a hostile row: not encodable as UTF-8) is written with \\u escapes instead, so the file stays UTF-8."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row, ensure_ascii=True)
    return line + "\n"


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json_line(r) for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file tunegate wrote itself (blank lines skipped).

    For user data use `tunegate.data.records.read_source`, which rejects bad rows with a reason instead.

    Raises:
        json.JSONDecodeError: a line is not JSON (a file tunegate wrote is never so).
    """
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def iter_jsonl(path: str | Path, max_line_bytes: int = 64 * 2**20) -> Iterator[tuple[int, Any, json.JSONDecodeError | None]]:
    """Each non-blank line of a JSONL file as (line number from 1, parsed value, None), or as (line number, the
    start of the line's text, a JSONDecodeError saying why) when the line is not JSON, not UTF-8, nested past
    the parser or longer than `max_line_bytes`: the caller skips it, rejects it with a reason or stops. Reads
    one line at a time, in memory bounded by `max_line_bytes` (`bounded_lines`); a byte-order mark is skipped.

    Raises:
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as f:
        for lineno, raw, oversize in bounded_lines(f, max_line_bytes):
            if oversize is not None:
                head = raw.decode("utf-8", "replace")
                yield lineno, head, json.JSONDecodeError(f"line of {oversize:,} bytes is longer than {max_line_bytes:,}", head, 0)
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                head = raw[:200].decode("utf-8", "replace")
                yield lineno, head, json.JSONDecodeError(f"not UTF-8 ({exc.reason} at byte {exc.start})", head, 0)
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, line.rstrip("\r\n"), exc
            except (RecursionError, ValueError) as exc:  # nested past the parser, an integer past int()'s digits
                why = "nested deeper than the JSON reader allows" if isinstance(exc, RecursionError) else str(exc)[:200]
                yield lineno, line[:200], json.JSONDecodeError(why, line[:200], 0)


READ_CHUNK = 2**20  # bytes read at a time past the end of a line over the limit


def bounded_lines(f, limit: int, on_skip: Callable[[bytes], None] | None = None) -> Iterator[tuple[int, bytes, int | None]]:
    """The physical lines of the binary file `f` as (line number from 1, bytes, None), a UTF-8 byte-order mark
    on line 1 removed (it does not count towards `limit`); a line longer than `limit` bytes as (line number, its
    first 200 bytes, its size in bytes), read past in READ_CHUNK pieces, each given to `on_skip` (with the
    first piece), so memory stays bounded by `limit`, whatever one line's size."""
    lineno = 0
    while True:
        raw = f.readline(limit + 1 + (len(UTF8_BOM) if lineno == 0 else 0))
        if not raw:
            return
        lineno += 1
        ends = raw.endswith(b"\n")
        if lineno == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        if len(raw) <= limit or ends:
            yield lineno, raw, None
            continue
        head, size = raw[:200], len(raw)
        if on_skip is not None:
            on_skip(raw)
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(READ_CHUNK)
            size += len(raw)
            if on_skip is not None:
                on_skip(raw)
        yield lineno, head, size


def create_private(path: Path) -> None:
    """Create `path` as an empty file only its owner may read and write (0600), unless it exists: a database of
    prompts, answers or keys must not be born world-readable (SQLite would create it with the umask's mode)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass




# ---------------------------------------------------------------------------------------------- fault injection

_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when `TUNEGATE_FAULT` names this point (the kill tests only).

    `TUNEGATE_FAULT` is a comma-separated list of `POINT` or `POINT@K` (the K-th time the point is reached in
    this process; default the first). Points: `staging:created` (an empty staging folder exists),
    `publish:start` (the staged folder is complete and synced, nothing renamed yet), `publish:exchanged` (swapped:
    the old folder is under the staging name), `publish:aside` (two-rename fallback: `final` renamed aside),
    `publish:renamed` (the new folder is in place, the old one not yet deleted), `stage:published` (a stage
    folder is in place, its manifest not yet written), `registry:published` (a registry copy is in place, its
    database row not yet committed).
    """
    spec = os.environ.get("TUNEGATE_FAULT")
    if not spec:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point == name and _FAULT_COUNTS[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- folder publish

# `.NAME.PID-TOKEN.partial` (a staging folder), `.NAME.PID-TOKEN.old` (the two-rename fallback's aside),
# `.NAME.PID-TOKEN.tmp` (an atomic write's temporary file). TOKEN is tempfile's 8 random characters.
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<token>[a-z0-9_]{8})\.(?P<kind>partial|old|tmp)$")
_LEGACY_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")  # tunegate before the exchange: `.NAME.old-PID`
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(?P<kind>partial|tmp)$")  # before the PID: `.NAME.RANDOM.partial`
_MINE: set[str] = set()  # staging folders, asides, temp files this process made (its PID may be a dead process's, in a container)


def _key(path: str | Path) -> str:
    return os.path.realpath(path)  # one spelling of a path, relative or not


def staging_dir(final: Path) -> Path:
    """Make a new, empty staging folder beside `final` for `publish_dir`: `.NAME.PID-TOKEN.partial`, with the
    mode a plain mkdir gives. Leftovers of interrupted publishes of `final` are deleted first (`clean_stale`).

    The caller deletes it when it gives up before publishing (`shutil.rmtree`); a kill leaves it to the next run.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}-", suffix=".partial"))
    _MINE.add(_key(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle or model folder gets the mode mkdir would give
    fault_point("staging:created")
    return tmp


def lock_dir(path: Path) -> int:
    """Hold an exclusive `flock` on the folder `path` (a stage's fixed `.STAGE.partial`) until the returned
    descriptor is closed or the process dies: `clean_stale` leaves a locked folder alone.

    Raises:
        BlockingIOError: another live process holds it.
    """
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        pass  # a file system without flock on folders (NFS): no lock, as before
    return fd


def claim_dir(path: Path) -> int:
    """Make `path` (a stage's fixed `.STAGE.partial`) a new, empty folder held by `lock_dir`; a folder left there
    by a dead process is deleted first. Returns the descriptor holding the lock (close it when published).

    Raises:
        BlockingIOError: a live process holds the folder.
    """
    if path.exists():
        os.close(lock_dir(path))
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return lock_dir(path)


def _locked(path: Path) -> bool:
    """Whether a live process holds `lock_dir(path)`."""
    try:
        os.close(lock_dir(path))
    except BlockingIOError:
        return True
    except OSError:
        return False  # gone meanwhile, or not a folder
    return False


def _alive(pid: int, path: Path) -> bool:
    if pid == os.getpid():
        return _key(path) in _MINE  # our PID on a leftover we did not make: a dead process's, in another container
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OverflowError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _say(text: str) -> None:
    from tunegate.core.console import console

    console.print(text, style="yellow", markup=False, highlight=False)


def clean_stale(final: Path, say: Callable[[str], None] | None = None, folders: bool = True) -> list[Path]:
    """Delete what interrupted publishes and atomic writes of `final` left beside it, whose owner is gone.

    Deleted: a staging folder (`.NAME.PID-TOKEN.partial`) or temporary file (`.NAME.PID-TOKEN.tmp`) whose PID is
    not alive; a stage's fixed `.NAME.partial` that no process holds locked (`lock_dir`); the two-rename
    fallback's aside (`.NAME.PID-TOKEN.old`, PID not alive) when `final` exists or its staged folder is gone;
    earlier versions' `.NAME.RANDOM.partial` / `.tmp`, and their `.NAME.old-PID` when `final` exists. Put back:
    an aside whose staged folder is still there while `final` is missing (killed between the two renames).
    Named in one line (`say`) and left alone: an earlier version's `.NAME.old-PID` when `final` is missing (see the
    module docstring); the next publish of `final` deletes it.

    Args:
        final: the folder (or file) whose leftovers to look for; its parent folder is scanned.
        say: where the one-line notes go (default: the console, yellow).
        folders: False for a file's atomic writes (only `.tmp` files are looked at).

    Returns:
        The leftovers deleted or put back.
    """
    final = Path(final)
    try:
        entries = [e.name for e in os.scandir(final.parent)]
    except FileNotFoundError:
        return []
    prefix = f".{final.name}."
    entries = [n for n in entries if n.startswith(prefix)]
    if not entries:
        return []
    say = say or _say
    done: list[Path] = []
    kinds = ("partial", "old") if folders else ("tmp",)
    for n in sorted(entries, key=lambda n: not n.endswith(".old")):  # asides first: one may be put back
        path = final.parent / n
        m = _OWNED.match(n)
        if m and m["name"] == final.name and m["kind"] in kinds:
            if _alive(int(m["pid"]), path):
                continue
            if m["kind"] == "old" and not final.exists() and _staged_left(final, m["pid"], m["token"]):
                os.rename(path, final)  # killed between the two renames: the publish did not happen
            else:
                _remove(path)
            done.append(path)
            continue
        legacy = _LEGACY_TEMP.match(n)
        if legacy and legacy["name"] == final.name and legacy["kind"] in kinds:
            _remove(path)
            done.append(path)
            continue
        if not folders:
            continue
        if n == f".{final.name}.partial":
            if not _locked(path):
                _remove(path)
                done.append(path)
            continue
        m = _LEGACY_ASIDE.match(n)
        if m and m["name"] == final.name and not _alive(int(m["pid"]), path):
            if final.exists():
                _remove(path)
                done.append(path)
            else:
                say(f"{path}: a copy of {final.name} that an earlier tunegate set aside and did not delete, and {final} is "
                    f"missing: not restored (it may be a stale copy of a folder deleted since); move it back to {final} to "
                    f"keep it, or delete it; the next publish of {final} deletes it")
    return done


def clean_stale_all(folder: Path, say: Callable[[str], None] | None = None) -> list[Path]:
    """`clean_stale` for every name in `folder` that has a staging folder or aside beside it (for a folder of
    numbered finals, such as the registry's `adapters/`, where the name a killed process was writing is unknown)."""
    try:
        names = {m["name"] for e in os.scandir(folder) if (m := _OWNED.match(e.name)) and m["kind"] != "tmp"}
    except FileNotFoundError:
        return []
    return [p for n in sorted(names) for p in clean_stale(Path(folder) / n, say)]


def _staged_left(final: Path, pid: str, token: str) -> bool:
    """Whether the staged folder of the two-rename publish that made aside `.NAME.PID-TOKEN.old` is still there
    (then the second rename never happened): `.NAME.PID-TOKEN.partial`, or a stage's unlocked `.NAME.partial`."""
    if final.with_name(f".{final.name}.{pid}-{token}.partial").is_dir():
        return True
    fixed = final.with_name(f".{final.name}.partial")
    return fixed.is_dir() and not _locked(fixed)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root`), so that a rename that publishes it is not
    persisted before its contents (a power cut after the rename must not leave empty files in place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems do not sync folders
            raise
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2_fn: Any = None


def _renameat2() -> Any:
    """libc's renameat2, or None where there is none (not Linux, glibc before 2.28, musl)."""
    global _renameat2_fn
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except Exception:  # no such symbol (AttributeError), no C library to open (OSError, TypeError)
            _renameat2_fn = False
    return _renameat2_fn or None


def _exchange(a: Path, b: Path) -> str:
    """Swap the folders `a` and `b` in one step. Returns "exchanged", "missing" (`b` does not exist) or
    "unsupported" (no renameat2, or the file system has no exchange). Raises OSError otherwise (`a` missing,
    another file system)."""
    fn = _renameat2()
    if fn is None:
        return "unsupported"
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return "exchanged"
    err = ctypes.get_errno()
    if err == errno.ENOENT and os.path.lexists(a):
        return "missing"
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return "unsupported"  # EPERM: a seccomp filter that refuses renameat2
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def check_replaceable(final: Path, marker: str, what: str, keys: tuple[str, ...] = ()) -> None:
    """Refuse to let `publish_dir` replace `final` unless it is absent or a folder holding `marker`, the file an
    earlier `what` writes (with `keys`: a JSON object holding all of them, for a common name such as verdict.json):
    an output folder given by the user (`--out`) must never swallow a folder of other files.

    Raises:
        TunegateError: `final` exists (a dangling link too) and is a file, a link, or a folder without `marker`.
    """
    from tunegate import TunegateError

    final = Path(final)

    def earlier() -> bool:
        if not (final.is_dir() and not final.is_symlink() and (final / marker).is_file()):
            return False
        if not keys:
            return True
        try:
            data = json.loads((final / marker).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    if os.path.lexists(final) and not earlier():
        raise TunegateError(f"{final}: exists and is not an earlier {what} (no {marker} in it); rule: an output folder "
                            "replaces only an earlier output of the same kind. Choose a new folder, or delete it first")


def publish_dir(staged: Path, final: Path) -> None:
    """Replace `final` (if any) with the finished folder `staged`: readers see the old folder or the new one,
    and a kill at any instant leaves only what `clean_stale` removes (the module docstring says how and why).

    `staged` is a `staging_dir(final)` or a stage's `.STAGE.partial` beside `final`. Its contents are fsynced,
    then it is swapped with `final` (renameat2 RENAME_EXCHANGE) and the old folder, now under the staging name,
    is deleted; a plain rename when `final` does not exist; two renames where there is no exchange. Leftovers
    of earlier interrupted publishes of `final` are deleted once the new folder is in place.

    Raises:
        OSError: `staged` is missing, `staged` and `final` are not on one file system, or a rename failed
            (`final` is unchanged).
    """
    staged, final = Path(staged), Path(final)
    if not staged.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no staged folder to publish", str(staged))
    fsync_tree(staged)
    fault_point("publish:start")
    for _ in range(10):  # `final` may appear or vanish under a concurrent publish: look again
        how = _exchange(staged, final)
        if how == "exchanged":
            fault_point("publish:exchanged")
            _fsync_dir(final.parent)
            shutil.rmtree(staged, ignore_errors=True)  # the old folder
            break
        if how == "unsupported" and _two_renames(staged, final):
            break
        try:  # `final` is missing: a plain rename
            os.rename(staged, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # someone published `final` meanwhile: swap with theirs
            raise
        fault_point("publish:renamed")
        _fsync_dir(final.parent)
        break
    else:
        raise OSError(errno.EBUSY, "could not publish: the folder kept changing under a concurrent publish", str(final))
    _MINE.discard(_key(staged))
    clean_stale(final)


def remove_dir(final: Path) -> bool:
    """Delete the folder `final` whole: one rename aside to `.NAME.PID-TOKEN.old`, then the aside is deleted.
    Readers see the folder or nothing, and a kill midway leaves only the aside, which `clean_stale` deletes (no
    staged folder beside it: it is never put back). Returns False when there was no `final`."""
    final = Path(final)
    aside = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
    _MINE.add(_key(aside))
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        _MINE.discard(_key(aside))
        return False
    fault_point("remove:aside")
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    _MINE.discard(_key(aside))
    return True


def _two_renames(staged: Path, final: Path) -> bool:
    """The fallback without an exchange: `final` aside to `.NAME.PID-TOKEN.old`, `staged` in, the aside deleted.
    Returns False when there is no `final` (the caller renames `staged` in)."""
    m = _OWNED.match(staged.name)
    token = m["token"] if m and m["kind"] == "partial" else secrets.token_hex(4)
    aside = final.with_name(f".{final.name}.{os.getpid()}-{token}.old")
    _MINE.add(_key(aside))
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return False
    fault_point("publish:aside")
    try:
        os.rename(staged, final)
    except BaseException:
        os.rename(aside, final)
        raise
    fault_point("publish:renamed")
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    _MINE.discard(_key(aside))
    return True
