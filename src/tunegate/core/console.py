"""The one console every stage and verb prints to (stderr, so stdout stays for machine-readable output), and the
progress bar long loops show on it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console

console = Console(stderr=True)


@contextmanager
def progress(desc: str, total: int) -> Iterator[Callable[..., None]]:
    """A transient progress bar over `total` items on the console: `with progress("eval", n) as advance: advance(k)`.

    `advance(n=1)` moves the bar by n items; the bar disappears when the block ends.
    """
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda n=1: bar.advance(task, n)
