"""The one console every stage and verb prints to (stderr, so stdout stays for machine-readable output), the
progress bars long loops show on it, and the run's log file.

- `console`: a rich Console on stderr. While `log_to(path)` is active, everything printed on it is also appended
  to that file as plain text (no colours, no escape codes, no progress redraws): `runs/<id>/log.txt`.
- `progress(desc, total)`: a bar with M/N, elapsed time and ETA. Bars opened while another is shown join the same
  display (rich allows one live display at a time), so a stage's bar and the generation bars inside it nest.
  On a terminal the bar redraws in place and disappears when its block ends; elsewhere (CI, a pipe, a file) rich
  draws nothing live, and the one line printed at the end of a long block ("eval: 120/120 in 41.2 s") is all
  there is.
- `log_only(text)`: a line for the log file alone (the trainer's per-step logs, which the bar folds into one line).

Imports only the standard library and rich (core room).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.control import Control

LOG_WIDTH = 120  # columns of the plain-text log file
DONE_LINE_S = 2.0  # a progress block that took longer prints one line when it ends
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class TeeConsole(Console):
    """A Console that also writes what it prints to a plain-text log console while one is attached."""

    log_console: Console | None = None

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 (rich's name)
        super().print(*objects, **kwargs)
        log = self.log_console
        if log is not None and not (objects and all(isinstance(o, Control) for o in objects)):  # not a live redraw
            log.print(*objects, **kwargs)


console = TeeConsole(stderr=True)


def log_only(text: str) -> None:
    """Append one plain line to the log file of `log_to` (nothing on screen); no-op when no log is open."""
    if console.log_console is not None:
        console.log_console.print(_ANSI.sub("", text), markup=False, highlight=False, soft_wrap=True)


@contextmanager
def log_to(path: Path, header: str | None = None) -> Iterator[Path]:
    """Append everything printed on `console` inside the block to `path` (plain text, created with its folder).

    Opens with a header line: `==== <UTC time> tunegate <argv> ====` (or `header`). An exception leaving the block
    is written as `error: <message>` before it propagates. Re-entrant: an inner block for a log already open
    writes no second header. A `path` that is a symbolic link is not followed (O_NOFOLLOW): TunegateError, rather
    than appending to wherever the link leads.
    """
    path = Path(path)
    if console.log_console is not None:  # already logging (a stage inside `tunegate run`)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        if path.is_symlink():
            from tunegate import TunegateError

            raise TunegateError(f"{path}: a symbolic link (to {os.readlink(path)}); rule: the run's log is written only "
                                "inside the project, never through a link: remove it") from None
        raise
    with open(fd, "a", encoding="utf-8") as f:
        log = Console(file=f, width=LOG_WIDTH, color_system=None, force_terminal=False, highlight=False,
                      emoji=False, legacy_windows=False)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        log.print(header or f"==== {now} tunegate {' '.join(sys.argv[1:])} ====", markup=False, soft_wrap=True)
        console.log_console = log
        try:
            yield path
        except BaseException as exc:
            log.print(f"error: {exc or type(exc).__name__}", markup=False, highlight=False, soft_wrap=True)
            raise
        finally:
            console.log_console = None


_display: Any = None  # the rich Progress shown now (one live display at a time), shared by nested bars
_open_bars = 0


def _columns() -> tuple:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))


@contextmanager
def _bar(desc: str, total: int | None) -> Iterator[tuple[Any, Any]]:
    """(the shared Progress, a new task on it); the task is removed when the block ends, the display stopped when
    the last open bar ends."""
    global _display, _open_bars
    from rich.progress import Progress

    if _display is None:  # off a terminal rich would still end each block with a blank line: no display at all
        live = console.is_terminal and not console.is_dumb_terminal
        _display = Progress(*_columns(), console=console, transient=True, disable=not live)
        _display.start()
    display = _display
    _open_bars += 1
    task = display.add_task(desc, total=total, info="")
    try:
        yield display, task
    finally:
        display.remove_task(task)
        _open_bars -= 1
        if _open_bars == 0:
            display.stop()
            _display = None


@contextmanager
def progress(desc: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress bar over `total` items: `with progress("eval", n) as advance: advance(k)`.

    `advance(n=1, info=None)` moves the bar by n items; `info` (a short string: "loss 1.23") is shown after the ETA.
    When the block took longer than DONE_LINE_S seconds, one line says so at the end: "eval: 120/120 in 41.2 s".
    """
    t0 = time.perf_counter()
    done = [0]
    with _bar(desc, total) as (display, task):

        def advance(n: int = 1, info: str | None = None) -> None:
            done[0] += n
            display.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance
    wall = time.perf_counter() - t0
    if wall >= DONE_LINE_S:
        console.print(f"{desc}: {done[0]}/{total} in {wall:.1f} s", markup=False, highlight=False)


class StepBar:
    """A bar driven by absolute positions (a trainer's global step), with a free-text info field.

    `start(total, completed)` shows it, `update(step, info)` moves it, `close()` removes it (safe to call twice).
    """

    def __init__(self, desc: str):
        self.desc = desc
        self._ctx = None
        self._display = None
        self._task = None
        self.t0 = 0.0

    def start(self, total: int, completed: int = 0) -> None:
        self.close()
        self._ctx = _bar(self.desc, total)
        self._display, self._task = self._ctx.__enter__()
        self._display.update(self._task, completed=completed)
        self.t0 = time.perf_counter()

    def update(self, step: int, info: str | None = None) -> None:
        if self._display is not None:
            self._display.update(self._task, completed=step, **({"info": info} if info is not None else {}))

    def close(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._display = self._ctx, None, None
            ctx.__exit__(None, None, None)


def fmt_seconds(s: float) -> str:
    """`42.1 s`, `3 min 05 s`, `1 h 02 min`: wall times in the stage lines and the summary."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
