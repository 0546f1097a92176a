"""tunegate.serve.production.Switchboard without a model: a fake engine records what is loaded; the registry,
the bundles (signed, verified for real) and the switch logic are the real ones."""

from functools import partial
from types import SimpleNamespace

import pytest
from test_registry import fake_run

from tunegate import TunegateError, registry, release
from tunegate.serve.production import Switchboard


class FakeEngine:
    base_name = "base"

    def __init__(self):
        self.adapters, self.loaded, self.refuse = {}, [], set()
        self.fail: dict[str, BaseException] = {}  # slot -> what load_slot raises
        self.fail_unload: dict[str, BaseException] = {}  # slot -> what unload_slot raises
        self.gate = None  # a threading.Event load_slot waits for, when set

    def load_slot(self, slot, bundle, release_json):
        if self.gate is not None:
            self.gate.wait(10)
        if slot in self.refuse:
            raise TunegateError(f"{bundle}: refused for the test")
        if slot in self.fail:
            raise self.fail[slot]
        assert (bundle / "adapter" / "adapter_model.safetensors").is_file()  # the verified private copy
        self.loaded.append(slot)

    def unload_slot(self, slot):
        if slot in self.fail_unload:
            raise self.fail_unload[slot]
        self.loaded.remove(slot)


@pytest.fixture
def setup(tmp_path):
    private, public = release.generate_keys(tmp_path / "keys")
    project = SimpleNamespace(name="p", registry=tmp_path / "tunegate.db", root=tmp_path, base_model="base",
                              serve=SimpleNamespace(public_key=public, versions=[], reload_interval_s=0.05))
    verify = partial(release.verify_bundle, public_key=public)

    def promote(run_id):
        run = fake_run(tmp_path, run_id, "PASS", keys=(private, public))
        return registry.promote(project.registry, "p", run, bundle=release.bundle_dir(run), verify=verify)

    logs = []
    engine = FakeEngine()
    board = Switchboard(project, engine, log=logs.append)
    yield SimpleNamespace(project=project, engine=engine, board=board, promote=promote, logs=logs, verify=verify)
    board.stop()


def test_a_request_in_flight_keeps_its_version_until_it_is_done(setup):
    engine, board = setup.engine, setup.board
    board.sync()
    assert "p" not in engine.adapters and "no production version of project p; promote one" in board.missing["p"]
    setup.promote("r1")
    assert board.sync() == [f"p -> p-v1 (run r1, adapter sha256 {engine_sha(setup, 1)[:12]})"]
    assert engine.adapters["p"].slot == "p-v1" and engine.adapters["p"].label == "p-v1" and "p" not in board.missing
    with board.lease("p") as served:
        setup.promote("r2")
        board.sync()
        assert engine.adapters["p"].slot == "p-v2"  # new requests: v2
        assert served.slot == "p-v1" and engine.loaded == ["p-v1", "p-v2"]  # v1 is held by this request
    assert board.reap() == ["p-v1"] and engine.loaded == ["p-v2"]


def test_a_version_that_cannot_be_loaded_keeps_the_name_on_what_it_served(setup):
    engine, board = setup.engine, setup.board
    setup.promote("r1")
    board.sync()
    engine.refuse.add("p-v2")
    setup.promote("r2")
    assert board.sync() == [] and board.sync() == []
    assert engine.adapters["p"].slot == "p-v1"
    refusals = [m for m in setup.logs if "not loaded" in m]  # logged once, not at every poll
    assert len(refusals) == 1 and refusals[0].startswith("p: version 2 not loaded, still serving p-v1: ")
    assert refusals[0].endswith("refused for the test")
    engine.refuse.clear()
    board.sync()
    assert engine.adapters["p"].slot == "p-v2"


def test_the_watcher_follows_a_rollback_and_strict_start_refuses_a_changed_copy(setup):
    import time

    engine, board = setup.engine, setup.board
    setup.promote("r1")
    setup.promote("r2")
    board.start()
    deadline = time.monotonic() + 5
    while (engine.adapters.get("p") is None or engine.adapters["p"].slot != "p-v2") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.adapters["p"].slot == "p-v2"
    registry.rollback(setup.project.registry, "p", verify=setup.verify)
    deadline = time.monotonic() + 5
    while engine.adapters["p"].slot != "p-v1" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.adapters["p"].slot == "p-v1"
    board.stop()
    # a stored copy changed behind the registry's back: a server starting now refuses to serve it
    files = setup.project.root / "bundles" / "p-v1" / "files.json"
    files.write_text(files.read_text() + " ")
    fresh = Switchboard(setup.project, FakeEngine(), log=setup.logs.append)
    with pytest.raises(TunegateError, match="bundles/p-v1/files.json: missing or changed since version 1 was registered"):
        fresh.sync(strict=True)
    fresh.stop()


def test_a_bundle_named_like_the_registry_names_is_refused(setup):
    engine = FakeEngine()
    engine.adapters["p-v3"] = object()
    with pytest.raises(TunegateError, match=r"adapter name\(s\) p-v3 clash with the registry's names for project p"):
        Switchboard(setup.project, engine)


def engine_sha(setup, version):
    return registry.version(setup.project.registry, "p", version)["adapter_sha256"]


def pin(setup, *versions):
    setup.project.serve.versions = list(versions)
    setup.board.pinned = list(versions)


def test_an_engine_error_of_one_name_spares_the_others_and_idle_slots_are_still_reaped(setup):
    """Review finding 4: a RuntimeError (not a TunegateError) from load_slot escaped sync: the names after it were
    not synced, reap() was skipped, and the watcher logged it at every interval."""
    engine, board = setup.engine, setup.board
    setup.promote("r1")
    board.sync()
    for run in ("r2", "r3"):
        setup.promote(run)  # production: version 3
    pin(setup, 2, 3)  # two pinned names: p-v2 (its engine fails) and p-v3
    engine.fail["p-v2"] = RuntimeError("CUDA error: out of memory")
    assert board.sync() == [f"p -> p-v3 (run r3, adapter sha256 {engine_sha(setup, 3)[:12]})",
                            f"p-v3 -> p-v3 (run r3, adapter sha256 {engine_sha(setup, 3)[:12]})"]
    assert engine.adapters["p"].slot == "p-v3" and engine.adapters["p-v3"].slot == "p-v3" and "p-v2" not in engine.adapters
    assert engine.loaded == ["p-v3"]  # p-v1 was reaped in the same sync
    board.sync()
    failures = [m for m in setup.logs if "RuntimeError" in m]
    assert failures == ["p-v2: version 2 not loaded, still serving nothing: RuntimeError: CUDA error: out of memory"]
    del engine.fail["p-v2"]
    board.sync()
    assert engine.adapters["p-v2"].slot == "p-v2"


def test_an_unload_that_raises_a_value_error_is_logged_once_and_retried(setup):
    """PEFT's delete_adapter raises ValueError: reap() only caught TunegateError."""
    engine, board = setup.engine, setup.board
    setup.promote("r1")
    board.sync()
    setup.promote("r2")
    engine.fail_unload["p-v1"] = ValueError("Adapter p-v1 does not exist")
    board.sync()
    board.sync()
    assert engine.adapters["p"].slot == "p-v2" and board.loaded == ["p-v1", "p-v2"]
    assert [m for m in setup.logs if "could not be unloaded" in m] == [
        "p-v1: could not be unloaded (retried at the next sync): ValueError: Adapter p-v1 does not exist"]
    del engine.fail_unload["p-v1"]
    board.sync()
    assert board.loaded == ["p-v2"] and engine.loaded == ["p-v2"]


def test_a_version_the_engine_cannot_serve_never_fails_start_up_and_its_name_says_why(setup):
    """Review finding 2: a version the engine cannot serve (DoRA on vLLM, a --merged server) made the strict
    start-up sync raise: vLLM did not start once such a version was in production."""
    from tunegate.serve.engine import NotServable

    engine, board = setup.engine, setup.board
    setup.promote("r1")
    engine.fail["p-v1"] = NotServable("refused for vLLM multi-LoRA serving: DoRA; vLLM serves it only merged")
    assert board.sync(strict=True) == []
    assert "p" not in engine.adapters and board.loaded == []
    assert board.missing["p"] == ("model 'p': version 1 of project p cannot be served by this server: refused for vLLM "
                                  "multi-LoRA serving: DoRA; vLLM serves it only merged")
    # a changed stored copy is still refused at start-up: that one is integrity, not the engine's kind
    files = setup.project.root / "bundles" / "p-v1" / "files.json"
    files.write_text(files.read_text() + " ")
    with pytest.raises(TunegateError, match="files.json: missing or changed"):
        board.sync(strict=True)


def test_stop_leaves_the_copies_while_the_watcher_still_runs(setup):
    """Review finding 13: stop() deleted the private copies after join(timeout) even when the watcher still ran."""
    import threading
    import time
    from pathlib import Path

    engine, board = setup.engine, setup.board
    setup.promote("r1")
    engine.gate = threading.Event()  # the watcher's first sync stops inside load_slot
    board.start()
    copy = Path(board._workdir.name) / "p-v1"
    deadline = time.monotonic() + 5
    while not copy.is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert copy.is_dir()
    assert board.stop(timeout_s=0.1) is False
    assert (copy / "adapter" / "adapter_model.safetensors").is_file()  # still there for the load in progress
    assert any("still running after 0.1 s" in m for m in setup.logs)
    engine.gate.set()
    assert board.stop() is True and not Path(board._workdir.name).exists()


def test_two_stops_at_once_do_not_trip_over_each_other(setup):
    """CI log: a second stop() cleared `_thread` between the first one's join() and is_alive() (AttributeError in
    the server's shutdown thread). Here the watcher thread's join is where the other stop finishes first."""
    board = setup.board
    board.start()
    real = board._thread

    class Racing:
        def join(self, timeout=None):
            real.join(timeout)
            board._thread = None  # the other stop() got there first

        def is_alive(self):
            return real.is_alive()

    board._thread = Racing()
    assert board.stop(timeout_s=5) is True and board._thread is None


def test_promote_refuses_sigstore_signing_with_one_line(tmp_path):
    from tunegate.serve import production

    project = SimpleNamespace(name="p", source_file=tmp_path / "tunegate.yaml", release=SimpleNamespace(sigstore=True))
    with pytest.raises(TunegateError, match=r"tunegate.yaml: release.sigstore is true; Sigstore-signed bundles cannot be "
                                            r"promoted yet \(the registry and the server verify with a key\)") as info:
        production.promote(project, "r1")
    assert "\n" not in str(info.value)
