"""Files written whole or not at all: atomic file writes, the one folder publish, JSONL reading.

Stage outputs, manifests, bundles and merges are written through here, so a process killed at any instant leaves
either the old file (or folder) or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

UTF8_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (Windows editors, Excel exports): read as UTF-8, never as data
# A folder being replaced is first renamed aside to `.NAME.old-PID`, then the new one is renamed in.
ASIDE_PREFIX = ".{name}.old-"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def bounded_lines(f, limit: int) -> Iterator[tuple[int, bytes, int | None]]:
    """The physical lines of the binary file `f` as (line number from 1, bytes, None), a UTF-8 byte-order mark
    on line 1 removed; a line longer than `limit` bytes as (line number, its first 200 bytes, its size in bytes),
    read past in READ_CHUNK pieces, so memory stays bounded by `limit`, whatever one line's size."""
    lineno = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        whole = len(raw) <= limit or raw.endswith(b"\n")  # before the mark is cut: it counts towards the read
        if lineno == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        if whole:
            yield lineno, raw, None
            continue
        head, size = raw[:200], len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(READ_CHUNK)
            size += len(raw)
        yield lineno, head, size


def create_private(path: Path) -> None:
    """Create `path` as an empty file only its owner may read and write (0600), unless it exists: a database of
    prompts, answers or keys must not be born world-readable (SQLite would create it with the umask's mode)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def restore_set_aside(final: Path) -> Path | None:
    """Put back a folder that `publish_dir` set aside when the process died between its two renames.

    Then `final` is missing and `.NAME.old-PID` beside it holds the old folder, whole. Returns the folder
    restored from, or None when there was nothing to restore (`final` exists, or nothing was set aside).
    """
    if final.exists():
        return None
    aside = sorted(final.parent.glob(ASIDE_PREFIX.format(name=final.name) + "*"), key=lambda p: p.stat().st_mtime)
    if not aside:
        return None
    os.replace(aside[-1], final)
    return aside[-1]


def publish_dir(staged: Path, final: Path) -> None:
    """Replace `final` (if any) with the finished folder `staged`, by rename: readers see the old folder or
    the new one.

    The old folder is renamed aside to `.NAME.old-PID`, `staged` is renamed to `final`, then the old one is
    deleted; if the second rename fails the old folder is put back. A process killed between the two renames
    leaves `final` missing and the old folder aside, whole: `restore_set_aside(final)` puts it back. Copies
    set aside by earlier interrupted publishes are deleted once the new folder is in place.

    Raises:
        OSError: `staged` and `final` are not on one file system, or a rename failed (`final` is unchanged).
    """
    old = final.with_name(f"{ASIDE_PREFIX.format(name=final.name)}{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    for stale in final.parent.glob(ASIDE_PREFIX.format(name=final.name) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
