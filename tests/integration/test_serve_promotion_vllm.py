"""Promotion is what is served, on a real vLLM (from .venv-vllm): the switch test of test_serve_promotion.py with
runtime LoRA load/unload. Version 1 is production when vLLM starts (it launches with it as a LoRA under its slot
name), version 2 is promoted while it runs, then rolled back; the switch latency is printed (and recorded with
TUNEGATE_BENCH_RESULTS=bench/results). Skipped without the vLLM environment (`make vllm`); minutes."""

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, chat, project_yaml, write_jsonl

from tunegate.config import load_project

VENV = Path(os.environ.get("TUNEGATE_VLLM_VENV", REPO / ".venv-vllm"))
INSTALLED = (VENV / ".tunegate-vllm-installed").is_file()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not INSTALLED, reason=f"no vLLM environment at {VENV} (install it with `make vllm`)"),
]


def _yaml(base, serve=""):
    return project_yaml("vprom", base, extra=serve, eval_="  max_new_tokens: 2\n  batch_size: 12\n  bootstrap_samples: 100", train=(
        "  adapter: lora\n  lora: {r: 8, lora_alpha: 16, init_lora_weights: false}\n"
        "  trl: {max_steps: 1, per_device_train_batch_size: 4, save_steps: 1, logging_steps: 1, warmup_steps: 0}"))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tokenizer):
    """A tiny Llama of head size 32 (vLLM's CPU attention), runs a and b with signed bundles in
    runs/<id>/release/bundle/ (project-local key)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunegate.pipeline import run_pipeline
    from tunegate.release import build_bundle, bundle_dir, generate_keys

    root = tmp_path_factory.mktemp("vllm-promotion")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tokenizer.save_pretrained(base)
    labels = ["alpha", "beta", "gamma"]
    write_jsonl(root / "train.jsonl", [chat(f"message {i} about {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(24)])
    write_jsonl(root / "golden.jsonl", [chat(f"golden {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(6)])
    (root / "tunegate.yaml").write_text(_yaml(base))
    private, _ = generate_keys(root / ".tunegate" / "keys")
    for run_id, seed in (("a", 1), ("b", 2)):
        p = load_project(root / "tunegate.yaml", [f"train.seed={seed}"])
        run_pipeline(p, run_id=run_id, until="eval")
        build_bundle(p, run_id, private_key=private, out_dir=bundle_dir(root / "runs" / run_id), merge=False)
    (root / "tunegate.yaml").write_text(_yaml(base, "serve:\n  max_new_tokens: 8\n"))
    return load_project(root / "tunegate.yaml")


def test_vllm_switches_to_the_promoted_version_and_back(project, tmp_path):
    from tunegate.serve import create_app, start_background
    from tunegate.serve import db as servedb
    from tunegate.serve import production
    from tunegate.serve.vllm import VLLMEngine

    v1 = production.promote(project, "a")
    preload = production.registry_copies(project, tmp_path / "copies")
    assert list(preload) == ["vprom-v1"]
    engine = VLLMEngine.launch(project, venv=VENV, dtype="float32", enforce_eager=True, timeout_s=900, max_model_len=512,
                               preload=preload, reserve_lora_rank=production.REGISTRY_LORA_RANK)
    timings = {}
    try:
        argv = engine.process.proc.args
        assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "64"
        app = create_app(project, engine=engine)
        board = app.state.production
        key = servedb.add_tenant(servedb.connect(servedb.project_url(project)), "acme", ["vprom"])
        server = start_background(app)
        try:
            def ask():
                body = {"model": "vprom", "messages": [{"role": "user", "content": "golden 0 on alpha"}],
                        "temperature": 0, "max_tokens": 8}
                return httpx.post(f"{server.url}/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {key}"}, timeout=120)

            def wait_for(want):
                start = time.perf_counter()
                while time.perf_counter() - start < 30:
                    r = ask()
                    if r.status_code == 200 and r.headers["X-Tunegate-Adapter-Version"] == want:
                        return r
                    time.sleep(0.02)
                raise AssertionError(f"no answer from {want} within 30 s")

            r = ask()
            assert r.status_code == 200, r.text
            assert r.headers["X-Tunegate-Adapter-Version"] == "vprom-v1"
            assert r.headers["X-Tunegate-Adapter-Sha256"] == v1["adapter_sha256"]
            first = r.json()["choices"][0]["message"]["content"]

            v2 = production.promote(project, "b")
            t0 = time.perf_counter()
            r = wait_for("vprom-v2")
            timings["promote_v2_s"] = time.perf_counter() - t0
            assert r.headers["X-Tunegate-Adapter-Sha256"] == v2["adapter_sha256"]
            deadline = time.monotonic() + 10
            while "vprom-v1" in board.loaded and time.monotonic() < deadline:
                time.sleep(0.1)
            assert board.loaded == ["vprom-v2"]  # v1 unloaded from vLLM once nothing used it

            production.rollback(project)
            t0 = time.perf_counter()
            r = wait_for("vprom-v1")
            timings["rollback_s"] = time.perf_counter() - t0
            assert r.json()["choices"][0]["message"]["content"] == first  # the same adapter again, greedy
        finally:
            server.stop()
    finally:
        engine.close()
    print("vLLM switch latency: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    record = {"engine": "vllm", "reload_interval_s": project.serve.reload_interval_s,
              "switch_s": {k: round(v, 3) for k, v in timings.items()}}
    if os.environ.get("TUNEGATE_BENCH_RESULTS"):  # bench/results/ holds the committed one
        (Path(os.environ["TUNEGATE_BENCH_RESULTS"]) / "promotion_switch_vllm.json").write_text(json.dumps(record, indent=2) + "\n")
    assert all(v < 10 for v in timings.values()), timings
