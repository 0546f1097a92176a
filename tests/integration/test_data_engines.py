"""The data stage's row steps (PII redaction, chat template and loss mask) give the same output in one process,
on a pool of local processes, and on a local Ray instance (issue 3, scale)."""

import json

import pytest

from tunegate.config import load_project
from tunegate.data import engine
from tunegate.pipeline import run_pipeline

from conftest import chat

OUTPUTS = ("train.jsonl", "val.jsonl", "golden.jsonl", "rejected.jsonl", "stats.json")


def _square(batch):
    return [x * x for x in batch]


def _make_square():
    return _square


def _make_bad():
    return lambda batch: batch[:-1]


def test_map_batches_keeps_order_in_process_and_on_a_pool(monkeypatch):
    items = list(range(1000))
    assert engine.map_batches(_make_square, items, batch_size=64) == [x * x for x in items]
    monkeypatch.setattr(engine, "MIN_BATCHES_PER_PROC", 0)
    assert engine.map_batches(_make_square, items, num_proc=2, batch_size=64) == [x * x for x in items]
    assert engine.map_batches(_make_square, [], num_proc=2) == []
    with pytest.raises(ValueError, match="returned 63 results for 64 items"):
        engine.map_batches(_make_bad, items, batch_size=64)
    with pytest.raises(ValueError, match="not one of local, ray"):
        engine.map_batches(_make_square, items, engine="spark")


def _project_with_pii(tiny_project):
    with open(tiny_project / "train.jsonl", "a") as f:
        for i, row in enumerate([
            chat("write to ann@example.com about topic beta", "beta", "mail"),
            chat("message number 0 about topic alpha", "alpha", "t0-copy"),
            chat("call bob at bob@example.org about topic gamma " + "word " * 80, "gamma", "long"),  # over max_length
        ]):
            f.write(json.dumps(row) + "\n")
    return ["data.dedup={one_word_variants: false}", "data.max_rejected_fraction=0.2", "data.pii={mode: pseudonym, entities: [EMAIL_ADDRESS]}"]


def _outputs(tiny_project, run_id):
    out = tiny_project / "runs" / run_id / "data"
    return {name: (out / name).read_text() for name in OUTPUTS}


def test_a_pool_of_processes_gives_the_same_rows_as_one_process(tiny_project, monkeypatch):
    monkeypatch.setenv("TUNEGATE_PII_KEY", "k" * 32)
    overrides = _project_with_pii(tiny_project)
    run_pipeline(load_project(tiny_project / "tunegate.yaml", [*overrides, "data.num_proc=1"]), run_id="one", until="data")
    monkeypatch.setattr(engine, "MIN_BATCHES_PER_PROC", 0)  # a pool even for 63 rows
    run_pipeline(load_project(tiny_project / "tunegate.yaml", [*overrides, "data.num_proc=2"]), run_id="two", until="data")
    one, two = _outputs(tiny_project, "one"), _outputs(tiny_project, "two")
    assert one == two
    stats = json.loads(one["stats.json"])
    assert stats["pii"]["found_by_type"] == {"EMAIL_ADDRESS": 2} and stats["rejected_by_rule"] == {"duplicate": 1, "overlength": 1}
    assert "<EMAIL_ADDRESS_" in one["train.jsonl"] + one["val.jsonl"]  # the same keyed pseudonym in both runs
    timings = json.loads((tiny_project / "runs/two/data/timings.json").read_text())
    assert timings["num_proc"] == 2 and timings["engine"] == "local"


@pytest.mark.ray
def test_ray_data_gives_the_same_rows_as_one_process(tiny_project, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[data]')")
    import ray

    monkeypatch.setenv("TUNEGATE_PII_KEY", "k" * 32)
    overrides = _project_with_pii(tiny_project)
    run_pipeline(load_project(tiny_project / "tunegate.yaml", [*overrides, "data.num_proc=1"]), run_id="local", until="data")
    try:
        run_pipeline(load_project(tiny_project / "tunegate.yaml", [*overrides, "data.engine=ray", "data.num_proc=2"]),
                     run_id="ray", until="data")
    finally:
        ray.shutdown()
    assert _outputs(tiny_project, "local") == _outputs(tiny_project, "ray")
    assert json.loads((tiny_project / "runs/ray/data/timings.json").read_text())["engine"] == "ray"


def test_pool_workers_die_with_the_process_that_started_them(tmp_path):
    """Found by trying it: after kill -9 of `tunegate data`, its two workers ran on for ~30 s holding the stage
    lock. A pool started by a child process that is then SIGKILLed leaves no worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import time\n"
            "from tunegate.data.engine import map_batches\n"
            "def slow():\n"
            "    def run(b):\n"
            "        time.sleep(60)\n"
            "        return b\n"
            "    return run\n"
            "if __name__ == '__main__':\n"
            "    map_batches(slow, list(range(64)), engine='local', num_proc=2, batch_size=1)\n")
    (tmp_path / "pool.py").write_text(code)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "pool.py")])
    deadline = time.monotonic() + 60
    children: list[int] = []
    while time.monotonic() < deadline and len(children) < 2:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        children = [int(c) for c in out]
        time.sleep(0.2)
    assert len(children) >= 2, "the pool did not start"
    time.sleep(1.0)  # the workers have run their initializer
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    alive = [c for c in children if os.path.exists(f"/proc/{c}") and "Z" not in open(f"/proc/{c}/stat").read().split()[2]]
    assert alive == [], alive
