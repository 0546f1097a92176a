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

    def load_slot(self, slot, bundle, release_json):
        if slot in self.refuse:
            raise TunegateError(f"{bundle}: refused for the test")
        assert (bundle / "adapter" / "adapter_model.safetensors").is_file()  # the verified private copy
        self.loaded.append(slot)

    def unload_slot(self, slot):
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
