"""Promotion is what is served (issue 22): the embedded server on the tiny Llama serves the registry's production
version as the project's name and follows `promote` / `rollback` while it runs, on a real loopback uvicorn.

Two PASS runs (seeds 1 and 2) with signed bundles in runs/<id>/release/bundle/ and the project-local key
(.tunegate/keys/): no production -> 404; promote a -> svc-v1; promote b -> svc-v2 within seconds, a request in
flight finishing on v1, v1 unloaded afterwards; rollback -> v1 again; feedback rows carry the version; a
tampered bundle is refused. The switch latency (promote's commit -> first response from the new version) is
printed (and recorded with TUNEGATE_BENCH_RESULTS=bench/results)."""

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import chat, project_yaml, write_jsonl

from tunegate import TunegateError, registry
from tunegate.config import load_project
from tunegate.serve import db as servedb

pytestmark = pytest.mark.serve
# The measured switch latency is printed; with TUNEGATE_BENCH_RESULTS=DIR also written to DIR/promotion_switch.json
# (bench/results/ holds the committed one): a plain test run leaves the work tree as it was.
RESULTS = os.environ.get("TUNEGATE_BENCH_RESULTS")


def _yaml(tiny_model_dir, serve: str = "") -> str:
    return project_yaml("svc", tiny_model_dir, extra=serve, eval_="  max_new_tokens: 2\n  batch_size: 12\n  bootstrap_samples: 100", train=(
        "  adapter: lora\n  lora: {r: 8, lora_alpha: 16, init_lora_weights: false}\n"
        "  trl: {max_steps: 1, per_device_train_batch_size: 4, save_steps: 1, logging_steps: 1, warmup_steps: 0}"))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """Runs a (seed 1) and b (seed 2), each with its signed bundle at runs/<id>/release/bundle/, signed with the
    project-local key; serve pins version 2 (svc-v2) and polls the registry every second (the default)."""
    from tunegate.pipeline import run_pipeline
    from tunegate.release import build_bundle, bundle_dir, generate_keys

    root = tmp_path_factory.mktemp("promotion-project")
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(root / "train.jsonl", [chat(f"message {i} about {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(24)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(6)])
    (root / "tunegate.yaml").write_text(_yaml(tiny_model_dir))
    private, _ = generate_keys(root / ".tunegate" / "keys")
    for run_id, seed in (("a", 1), ("b", 2)):
        p = load_project(root / "tunegate.yaml", [f"train.seed={seed}"])
        run_pipeline(p, run_id=run_id, until="eval")
        build_bundle(p, run_id, private_key=private, out_dir=bundle_dir(root / "runs" / run_id), merge=False)
    (root / "tunegate.yaml").write_text(_yaml(tiny_model_dir, "serve:\n  max_new_tokens: 8\n  versions: [2]\n"))
    return load_project(root / "tunegate.yaml")


def ask(url, key, model, text="Tell me about alpha.", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 4, **extra}
    return httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def wait_for_version(url, key, want, timeout_s=10.0):
    """Ask until a response names version `want`; returns (seconds waited, that response)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        r = ask(url, key, "svc")
        if r.status_code == 200 and r.headers.get("X-Tunegate-Adapter-Version") == want:
            return time.perf_counter() - start, r
        time.sleep(0.02)
    raise AssertionError(f"no response from {want} within {timeout_s} s (last: {r.status_code} {r.headers.get('X-Tunegate-Adapter-Version')})")


def test_promote_and_rollback_switch_what_is_served_without_a_restart(project):
    from tunegate.serve import create_app, start_background
    from tunegate.serve import production

    app = create_app(project)
    engine, board = app.state.engine, app.state.production
    db = servedb.connect(servedb.project_url(project))
    key = servedb.add_tenant(db, "acme", ["svc", "svc-v2"])
    server = start_background(app)
    timings = {}
    try:
        url = server.url
        # no production version yet: a clear 404 naming what to do
        r = ask(url, key, "svc")
        assert r.status_code == 404 and "no production version of project svc; promote one" in r.json()["error"]["message"]
        r = ask(url, key, "svc-v2")
        assert r.status_code == 404 and "version 2 of project svc is not in the registry" in r.json()["error"]["message"]

        # promote a: version 1 served as svc
        v1 = production.promote(project, "a")
        committed = time.perf_counter()
        waited, r = wait_for_version(url, key, "svc-v1")
        timings["promote_v1_s"] = time.perf_counter() - committed
        assert r.headers["X-Tunegate-Adapter-Sha256"] == v1["adapter_sha256"]
        assert board.loaded == ["svc-v1"]

        # a request that has started on v1 (lease taken) is held back while v2 is promoted
        real_complete, gate, entered = engine.complete, threading.Event(), threading.Event()

        def held(adapter, *a, **kw):
            if not entered.is_set():
                entered.set()
                assert gate.wait(30)
            return real_complete(adapter, *a, **kw)

        engine.complete = held
        in_flight = {}
        t = threading.Thread(target=lambda: in_flight.setdefault("r", ask(url, key, "svc", "Tell me about beta.")))
        t.start()
        assert entered.wait(30)
        engine.complete = real_complete  # only the first request is held

        v2 = production.promote(project, "b")
        committed = time.perf_counter()
        waited, r = wait_for_version(url, key, "svc-v2")
        timings["promote_v2_s"] = time.perf_counter() - committed
        assert r.headers["X-Tunegate-Adapter-Sha256"] == v2["adapter_sha256"] != v1["adapter_sha256"]
        assert waited < 5
        assert ask(url, key, "svc-v2").headers["X-Tunegate-Adapter-Version"] == "svc-v2"  # the pinned name too
        time.sleep(project.serve.reload_interval_s * 2)
        assert sorted(board.loaded) == ["svc-v1", "svc-v2"]  # v1 is still leased by the request in flight
        gate.set()
        t.join(60)
        assert in_flight["r"].status_code == 200, in_flight["r"].text
        assert in_flight["r"].headers["X-Tunegate-Adapter-Version"] == "svc-v1"  # finished on the version it began with
        deadline = time.monotonic() + 10
        while "svc-v1" in board.loaded and time.monotonic() < deadline:
            time.sleep(0.1)
        assert board.loaded == ["svc-v2"]  # unloaded once no request used it
        assert "svc-v1" not in engine.model.peft_config

        # rollback: back to v1 (loaded again from the registry's stored, verified bundle)
        production.rollback(project)
        committed = time.perf_counter()
        waited, r = wait_for_version(url, key, "svc-v1")
        timings["rollback_s"] = time.perf_counter() - committed
        assert r.headers["X-Tunegate-Adapter-Sha256"] == v1["adapter_sha256"]

        # feedback rows carry the exact version that answered. The random tiny model never ends a turn, and the
        # export leaves out answers cut at max_tokens: each answer ends at a stop string taken from its greedy answer
        ids = {}
        for model, want in (("svc", "svc-v1"), ("svc-v2", "svc-v2")):
            greedy = ask(url, key, model, max_tokens=8).json()["choices"][0]["message"]["content"]
            r = ask(url, key, model, max_tokens=8, stop=[greedy[len(greedy) // 2:]])
            assert r.json()["choices"][0]["finish_reason"] == "stop" and r.json()["choices"][0]["message"]["content"]
            assert r.headers["X-Tunegate-Adapter-Version"] == want
            ids[want] = r.json()["id"]
            fb = httpx.post(f"{url}/feedback", json={"trace_id": r.json()["id"], "rating": "up"},
                            headers={"Authorization": f"Bearer {key}"})
            assert fb.status_code == 201, fb.text
        _, kto, _ = servedb.export_feedback(db)
        by_trace = {row["trace_id"]: row for row in kto}
        assert by_trace[ids["svc-v1"]]["adapter_version"] == "svc-v1"
        assert by_trace[ids["svc-v2"]]["adapter_version"] == "svc-v2"
        assert by_trace[ids["svc-v2"]]["adapter_sha256"] == v2["adapter_sha256"]
        assert servedb.get_trace(db, ids["svc-v2"])["version"] == "svc-v2"
        assert servedb.get_trace(db, in_flight["r"].json()["id"])["version"] == "svc-v1"  # the trace of the held request
        # ... and the data stage's own reader keeps it in each row's meta (`tunegate data feedback`)
        from tunegate.config import SourceConfig
        from tunegate.data.records import read_source

        paths, _ = servedb.export_to_files(project)
        rows, _ = read_source(SourceConfig(path=paths["kto"], format="kto"))
        assert {r["meta"]["trace_id"]: r["meta"]["adapter_version"] for r in rows} == {ids["svc-v1"]: "svc-v1", ids["svc-v2"]: "svc-v2"}
    finally:
        server.stop()
    line = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    print(f"switch latency (promote/rollback commit -> first response from the new version, "
          f"reload_interval_s {project.serve.reload_interval_s:g}): {line}")
    record = {"engine": "embedded", "reload_interval_s": project.serve.reload_interval_s,
              "switch_s": {k: round(v, 3) for k, v in timings.items()}}
    if RESULTS:
        (Path(RESULTS) / "promotion_switch.json").write_text(json.dumps(record, indent=2) + "\n")
    assert all(v < 5 for v in timings.values()), timings


def test_a_tampered_or_missing_bundle_is_refused_and_production_is_unchanged(project):
    from tunegate.release import bundle_dir
    from tunegate.serve import production

    before = registry.production(project.registry, project.name)
    bundle = bundle_dir(project.runs_dir / "a")
    saved = bundle.parent / "saved"
    shutil.copytree(bundle, saved)
    try:
        scores = bundle / "eval" / "scores.json"
        scores.write_text(scores.read_text().replace("{", '{"forged": 1, ', 1))
        with pytest.raises(TunegateError, match=r"does not verify:\n  changed: eval/scores.json"):
            production.promote(project, "a")
        shutil.rmtree(bundle)
        with pytest.raises(TunegateError, match="no signed release bundle"):
            production.promote(project, "a")
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.move(saved, bundle)
    assert registry.production(project.registry, project.name) == before
