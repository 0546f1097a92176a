"""Run a data step over batches: in this process, on every local core, or on a Ray cluster.

A step is a batch function `fn(items: list) -> list` (same length, same order, no state shared between
batches), built by a picklable zero-argument factory `make_fn()` (e.g. `functools.partial` of a module-level
function and a plain config dict). Each worker calls the factory once and reuses the function, so a step that
loads a model (Presidio's spaCy NER, a tokenizer) loads it once per worker, not per batch.

Engines (`data.engine`):
- `local` with `num_proc` 1: the batches run here, one after the other.
- `local` with `num_proc` > 1: a `multiprocessing` pool of that many processes, batches dispatched in order.
  Workers are forked where the OS can (Linux): they inherit what the parent already loaded (Presidio's
  analyzer is cached per process, so the factory is cheap in a fork), where "spawn" re-imports and reloads
  for seconds per worker (measured: 2 spawned workers were slower than 1 process on 10k banking77 rows).
  The steps run here use no torch or OpenMP threads (spaCy's NER runs on numpy, tokenizers in Rust), which
  is what makes forking a process that imported torch safe; `TUNEGATE_MP_START=spawn` switches. Small
  inputs stay in process.
- `ray`: Ray Data (`ray.data.from_items(...).map_batches` with a class UDF, one actor per `num_proc`) on the
  cluster `ray.init()` finds, or a local one. Items travel pickled, so any Python object works, and results
  are put back in input order. The same step functions run on every engine, so the outputs are identical.
  With RAY_ADDRESS set, the existing cluster is used. The factories travel to every node: the base model's
  tokenizer folder must be readable there (a shared filesystem), and in pseudonym mode the PII key goes to
  the cluster's workers with the factory.

`datasets.map(num_proc=...)` was the first choice; it converts rows to Arrow, and tunegate's records (free-form
`meta`, nested messages) do not all have one Arrow schema, so tunegate maps its own batches.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Sequence

from tunegate.core.process import die_with_parent

ENGINES = ("local", "ray")
# Below this many batches per process the pool's start-up costs more than it saves.
MIN_BATCHES_PER_PROC = 2

_worker_make: Callable[[], Callable[[list], list]] | None = None
_worker_fn: Callable[[list], list] | None = None


def default_num_proc() -> int:
    """The cores this process may use (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _init_worker(make_fn: Callable[[], Callable[[list], list]]) -> None:
    global _worker_make
    _worker_make = make_fn
    die_with_parent()


def _run_batch(batch: list) -> list:
    """Builds the step on a worker's first batch, not in the pool initializer: an initializer that raises makes
    `multiprocessing` respawn workers forever, while an error here comes back to the caller."""
    global _worker_fn
    if _worker_fn is None:
        _worker_fn = _worker_make()
    return _worker_fn(batch)


def _batches(items: Sequence[Any], batch_size: int) -> list[list]:
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def map_batches(
    make_fn: Callable[[], Callable[[list], list]],
    items: Sequence[Any],
    *,
    engine: str = "local",
    num_proc: int = 1,
    batch_size: int = 1024,
    desc: str | None = None,
) -> list:
    """`fn(batch)` over `items` in batches of `batch_size`; returns the concatenated results in input order.

    Raises:
        ValueError: an unknown engine, or a batch function that returns a different number of results.
        TunegateError: engine "ray" and Ray is not installed.
    """
    if engine not in ENGINES:
        raise ValueError(f"data.engine {engine!r} is not one of {', '.join(ENGINES)}")
    if not items:
        return []
    batches = _batches(items, batch_size)
    if engine == "ray":
        out = _map_ray(make_fn, batches, num_proc)
    elif num_proc <= 1 or len(batches) < MIN_BATCHES_PER_PROC * num_proc:
        fn = make_fn()
        out = [_checked(fn(b), b) for b in _progress(batches, desc, len(items))]
    else:
        import multiprocessing as mp

        start = os.environ.get("TUNEGATE_MP_START") or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with mp.get_context(start).Pool(num_proc, initializer=_init_worker, initargs=(make_fn,)) as pool:
            out = [_checked(r, b) for r, b in zip(_progress(pool.imap(_run_batch, batches), desc, len(items), batches), batches)]
    return [x for part in out for x in part]


def _checked(result: list, batch: list) -> list:
    if len(result) != len(batch):
        raise ValueError(f"a batch function returned {len(result)} results for {len(batch)} items")
    return result


def _progress(it, desc: str | None, total_items: int, batches: list[list] | None = None):
    """A progress bar counted in items (not batches) on tunegate's console (core.console.progress); silent for
    small inputs or without a description."""
    from tunegate.core.console import progress

    if desc is None or total_items < 2048:
        yield from it
        return
    with progress(desc, total_items) as advance:
        for i, x in enumerate(it):
            advance(len(batches[i]) if batches is not None else len(x))
            yield x


class _RayStep:
    """Ray Data class UDF: builds the step once per actor; rows carry pickled batches and their index."""

    def __init__(self, make_fn: Callable[[], Callable[[list], list]]):
        self.fn = make_fn()

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        outs = [pickle.dumps(_checked(self.fn(pickle.loads(x)), pickle.loads(x))) for x in rows["batch"]]
        return {"i": rows["i"], "result": outs}


def _map_ray(make_fn: Callable[[], Callable[[list], list]], batches: list[list], num_proc: int) -> list[list]:
    try:
        import ray
    except ImportError:
        from tunegate import TunegateError

        raise TunegateError("data.engine is ray but Ray is not installed: pip install 'ray[data]'") from None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # an existing cluster: its resources are its own
            ray.init(log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=max(1, num_proc), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"i": i, "batch": pickle.dumps(b)} for i, b in enumerate(batches)])
    mapped = ds.map_batches(_RayStep, fn_constructor_args=(make_fn,), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=max(1, num_proc)))
    rows = sorted(mapped.take_all(), key=lambda r: r["i"])
    if len(rows) != len(batches):
        raise ValueError(f"Ray returned {len(rows)} batches for {len(batches)}")
    return [pickle.loads(r["result"]) for r in rows]
