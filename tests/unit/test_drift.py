"""`tunegate drift`: production traces vs training prompts, and the golden set re-run on the served adapter.

A fake embedding (hashed bag of words) stands in for MiniLM, so the tests load no model; the serving database
is a temporary SQLite file filled through tunegate.serve.db's own API.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random

import numpy as np
import pytest
from conftest import chat, fake_openai_server, write_jsonl
from typer.testing import CliRunner

from tunegate import EXIT_DRIFT, EXIT_INVALID_INPUT, TunegateError
from tunegate.config import load_project
from tunegate.drift import mmd_permutation_test, parse_since, run_drift
from tunegate.serve import db as servedb

BIKES = ["road bike", "kids' bike", "e-bike", "gravel bike", "folding bike", "mountain bike"]
PARTS = ["saddle", "chain", "brake", "tyre", "pedal", "derailleur", "wheel"]
DAYS = ["Monday", "Tuesday", "Thursday", "Friday", "Saturday"]
TEMPLATES = [
    "My {bike} {part} is broken, can you repair it on {day}?",
    "Do you sell a {part} for a {bike}?",
    "Is the {part} on the {bike} compatible with my frame?",
    "Can I book a service for my {bike} on {day}?",
]
NEW_TOPIC = ["kubernetes", "pod", "autoscaling", "cluster", "node", "memory", "OOMKilled", "deployment", "replica", "helm", "chart", "ingress", "namespace", "container", "registry", "image", "rollout", "liveness", "probe", "cronjob", "daemonset", "configmap", "secret", "volume"]
LABELS = ["alpha", "beta", "gamma"]


def bike_prompt(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(bike=rng.choice(BIKES), part=rng.choice(PARTS), day=rng.choice(DAYS))


def k8s_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(NEW_TOPIC) for _ in range(rng.randint(35, 50)))


def fake_embed(texts):
    """Hashed bag of lower-cased words, 256 dims, unit norm: shape (len(texts), 256)."""
    out = np.zeros((len(texts), 256))
    for i, t in enumerate(texts):
        for w in t.lower().replace("?", " ").replace(",", " ").split():
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 256] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@pytest.fixture
def drift_project(tmp_path):
    """A project with a finished-looking run: data/train.jsonl (120 bike prompts), a frozen golden set of 12 rows,
    eval/scores.json and samples.jsonl (release score exact_match 1.0), and an eval.server section."""
    rng = random.Random(0)
    train = [chat(bike_prompt(rng), "ticket", f"t{i}") for i in range(120)]
    golden = [chat(f"golden question {i} on {LABELS[i % 3]}", LABELS[i % 3], f"g{i}") for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "golden.jsonl", golden)
    (tmp_path / "tunegate.yaml").write_text(
        "name: drifty\n"
        "data:\n  sources: [{path: train.jsonl, format: chat}]\n  golden: {path: golden.jsonl, format: chat}\n"
        "  decontaminate: null\n"
        "eval:\n  max_new_tokens: 8\n  bootstrap_samples: 200\n  gate: [{metric: exact_match, min: 0.5}]\n"
        "  server: {base_url: 'http://127.0.0.1:9/v1', base_model: base, candidate_model: cand}\n"
        "drift:\n  permutations: 100\n"
    )
    project = load_project(tmp_path)
    from tunegate.data import golden as golden_lock
    from tunegate.data.records import read_source

    raw, _ = read_source(project.data.golden, role="golden")
    golden_lock.freeze(project.data.golden, raw, project.data.golden_lock)
    data = tmp_path / "runs" / "default" / "data"
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "golden.jsonl", raw)
    write_jsonl(data / "val.jsonl", [])
    ev = tmp_path / "runs" / "default" / "eval"
    ev.mkdir(parents=True)
    one = {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    (ev / "scores.json").write_text(json.dumps({"n": 12, "metrics": {"exact_match": {"candidate": one, "baseline": one, "delta": one}}}))
    write_jsonl(ev / "samples.jsonl", [{"id": r["id"], "candidate_output": r["messages"][-1]["content"]} for r in raw])
    return tmp_path


def add_traces(project_dir, prompts, age=dt.timedelta(hours=1), adapter="cand"):
    engine = servedb.connect(servedb.default_url(project_dir))
    now = dt.datetime.now(dt.UTC)
    for i, p in enumerate(prompts):
        servedb.write_trace(engine, id=servedb.new_trace_id(), tenant="acme", model=adapter, adapter=adapter, adapter_sha256=None,
                            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}], params={},
                            response="ok", finish_reason="stop", prompt_tokens=len(p.split()), completion_tokens=1,
                            created_at=now - age + dt.timedelta(seconds=i), latency_ms=5.0)


def same_prompts(n=60, seed=1):
    rng = random.Random(seed)
    return [bike_prompt(rng) for _ in range(n)]


def shifted_prompts(n=60, seed=1):
    rng = random.Random(seed)
    return [k8s_prompt(rng) if i % 3 == 0 else bike_prompt(rng) for i in range(n)]  # a third: long, new topic


def test_parse_since():
    assert parse_since("7d") == dt.timedelta(days=7)
    assert parse_since("90m") == dt.timedelta(minutes=90)
    with pytest.raises(TunegateError, match="--since"):
        parse_since("yesterday")


def test_mmd_permutation_test_separates_shifted_samples():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 5)), rng.normal(size=(60, 5))
    same = mmd_permutation_test(x, y, permutations=200, seed=0)
    moved = mmd_permutation_test(x, y + 1.0, permutations=200, seed=0)
    assert same["p_value"] > 0.05 and moved["p_value"] == 1 / 201
    assert moved["mmd2"] > same["mmd2"]
    assert mmd_permutation_test(x, y, 200, 0) == same  # seeded


def test_same_distribution_is_no_drift(drift_project):
    add_traces(drift_project, same_prompts())
    add_traces(drift_project, [k8s_prompt(random.Random(i)) for i in range(20)], age=dt.timedelta(days=30))  # outside the window
    result, folder = run_drift(load_project(drift_project), since="7d", embed_fn=fake_embed)
    assert result["counts"]["recent_prompts"] == 60
    assert not result["drift"], result["reasons"]
    assert result["checks"]["new_clusters"]["novel_prompts"] == 0
    assert {p.name for p in folder.iterdir()} == {"drift.json", "drift.md", "drift.png"}
    assert folder.parent == drift_project / "runs" / "default" / "drift"
    assert json.loads((folder / "drift.json").read_text())["drift"] is False


def test_shifted_traces_are_flagged_with_reasons_and_examples(drift_project, tmp_path):
    add_traces(drift_project, shifted_prompts())
    result, folder = run_drift(load_project(drift_project), since="24h", out_dir=tmp_path / "report", embed_fn=fake_embed)
    checks = result["checks"]
    assert result["drift"]
    assert checks["length"]["drift"] and checks["length"]["recent"]["mean"] > checks["length"]["train"]["mean"]
    assert checks["embedding"]["drift"] and checks["embedding"]["mmd_p_value"] < 0.01
    clusters = checks["new_clusters"]["new_clusters"]
    assert checks["new_clusters"]["drift"] and len(clusters) == 1 and clusters[0]["size"] == 20
    examples = clusters[0]["examples"]
    assert len(examples) == 3 and all(set(e["prompt"].split()) <= set(NEW_TOPIC) for e in examples)
    assert len(result["reasons"]) == 3
    md = (folder / "drift.md").read_text()
    assert "Sensitive" in md and examples[0]["prompt"][:40] in md and "**Verdict: DRIFT**" in md


def test_cli_exit_codes(drift_project, monkeypatch):
    import tunegate.retrieval
    from tunegate.cli import app

    monkeypatch.setattr(tunegate.retrieval, "embed", fake_embed)
    add_traces(drift_project, same_prompts(), adapter="cand")
    add_traces(drift_project, shifted_prompts(seed=2), adapter="other")
    ok = CliRunner().invoke(app, ["drift", str(drift_project), "--adapter", "cand"])
    assert ok.exit_code == 0, ok.output
    assert "60 requests" in ok.output and "kubernetes" not in ok.output
    bad = CliRunner().invoke(app, ["drift", str(drift_project), "--adapter", "other", "--since", "2h"])
    assert bad.exit_code == EXIT_DRIFT, bad.output
    assert "DRIFT: prompt length shifted" in bad.output and "kubernetes" not in bad.output  # request text only in the report


def test_empty_window_is_a_clear_error(drift_project):
    add_traces(drift_project, same_prompts(), age=dt.timedelta(days=10))
    with pytest.raises(TunegateError, match=r"0 request\(s\) in the last 7d .*widen --since") as e:
        run_drift(load_project(drift_project), since="7d", embed_fn=fake_embed)
    assert e.value.exit_code == EXIT_INVALID_INPUT


def test_no_serving_database_is_a_clear_error(drift_project):
    with pytest.raises(TunegateError, match="no serving database"):
        run_drift(load_project(drift_project), embed_fn=fake_embed)


@pytest.mark.parametrize("correct", [True, False])
def test_golden_rerun_on_served_adapter(drift_project, correct):
    add_traces(drift_project, same_prompts())

    def answer(model, messages):
        label = messages[-1]["content"].split()[-1]
        return label if correct else "delta"

    with fake_openai_server(answer) as (url, requests):
        project = load_project(drift_project, [f"eval.server.base_url={url}"])
        result, folder = run_drift(project, golden=True, embed_fn=fake_embed)
    assert len(requests) == 12 and {body["model"] for _, body in requests} == {"cand"}
    g = result["checks"]["golden"]
    em = g["metrics"]["exact_match"]
    assert g["paired_with_release_answers"] and "could not verify" in g["note"]
    if correct:
        assert em["now"]["mean"] == 1.0 and not g["drift"] and not result["drift"]
    else:
        assert em["now"]["mean"] == 0.0 and em["drop"] == 1.0 and g["drift"]
        assert result["reasons"] == [g["reason"]] and "golden exact_match fell" in g["reason"]
    assert "Golden set on the served adapter" in (folder / "drift.md").read_text()
