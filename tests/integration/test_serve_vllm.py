"""A real vLLM server (from .venv-vllm) behind tunegate's app: a tiny random Llama (head size 32: vLLM's CPU
attention has no head size 16, which the shared tiny model uses) and two signed PASS bundles of ranks 8 and 16
(C14 in docs/cases.md: --max-lora-rank 16), the smoke test (C17) against the in-process PEFT reference, a tenant request through
the proxy, an adapter unloaded and loaded again at run time, and the smoke test failing on an adapter vLLM
accepts but does not apply (C17's silent case, made real). Skipped when the vLLM environment is absent
(`make vllm`); vLLM starts in ~1-2 minutes here with --enforce-eager.

vLLM runs in float32 here so its greedy answers can be compared with the fp32 PEFT reference exactly: on a
randomly initialised model the top logits are near-ties, and bf16 rounding flips them within a few tokens."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO, chat, project_yaml, write_jsonl

from tunegate.config import load_project

VENV = Path(os.environ.get("TUNEGATE_VLLM_VENV", REPO / ".venv-vllm"))

INSTALLED = (VENV / ".tunegate-vllm-installed").is_file()
if not INSTALLED and os.environ.get("TUNEGATE_REQUIRE_VLLM"):  # CI (.ci/run) builds it: absent there is a failure
    raise RuntimeError(f"TUNEGATE_REQUIRE_VLLM is set but there is no vLLM environment at {VENV} (`make vllm`)")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not INSTALLED, reason=f"no vLLM environment at {VENV} (install it with `make vllm` or `tunegate serve-setup vllm`)"),
]


def _yaml(base, r, serve=""):
    return project_yaml("vsvc", base, extra=serve, eval_="  max_new_tokens: 2\n  batch_size: 12\n  bootstrap_samples: 100", train=(
        f"  adapter: lora\n  lora: {{r: {r}, lora_alpha: {2 * r}, init_lora_weights: false}}\n"
        "  trl: {max_steps: 1, per_device_train_batch_size: 4, save_steps: 1, logging_steps: 1, warmup_steps: 0}"))


@pytest.fixture(scope="module")
def vllm_project(tmp_path_factory, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunegate.pipeline import run_pipeline
    from tunegate.release import build_bundle, generate_keys

    root = tmp_path_factory.mktemp("vllm-project")
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
    private, _ = generate_keys(root / "keys")
    for run_id, seed, name, r in (("a", 1, "support", 8), ("b", 2, "sales", 16)):
        (root / "tunegate.yaml").write_text(_yaml(base, r))
        project = load_project(root / "tunegate.yaml", [f"train.seed={seed}"])
        run_pipeline(project, run_id=run_id, until="eval")
        build_bundle(project, run_id, private_key=private, out_dir=root / "bundles" / name, merge=False)
    (root / "tunegate.yaml").write_text(_yaml(base, 8, "serve:\n  bundles: [bundles/support, bundles/sales]\n"
                                                       "  public_key: keys/public.pem\n  max_new_tokens: 16\n"))
    return load_project(root / "tunegate.yaml")


def test_vllm_serves_two_adapters_behind_the_proxy(vllm_project, tmp_path):
    from fastapi.testclient import TestClient

    from tunegate.serve import create_app
    from tunegate.serve import db as servedb
    from tunegate.serve.smoke import format_smoke, run_smoke
    from tunegate.serve.vllm import VLLMEngine

    engine = VLLMEngine.launch(vllm_project, venv=VENV, dtype="float32", enforce_eager=True, timeout_s=900,
                               max_model_len=512)
    try:
        argv = engine.process.proc.args
        assert argv[argv.index("--max-lora-rank") + 1] == "16"  # C14: from the rank-16 adapter
        report = run_smoke(vllm_project, engine.url, [None, "support", "sales"], max_tokens=12, max_rank=1)
        print(format_smoke(report))
        assert report["passed"], report["failures"]
        # fp32 on both sides: exact, and teacher-forced every reference token is vLLM's top token
        assert all(r["exact"] and r["max_rank"] == 1 for m in report["models"].values() for r in m["rows"] if r["reference_tokens"])
        assert report["models"]["support"]["differs_from_base"] and report["models"]["sales"]["differs_from_base"]

        app = create_app(vllm_project, engine=engine, admin_token="admin-test")
        key = servedb.add_tenant(servedb.connect(servedb.project_url(vllm_project)), "acme", ["support", "sales"])
        with TestClient(app) as client:
            body = {"model": "support", "messages": [{"role": "user", "content": "golden 0 on alpha"}], "temperature": 0, "max_tokens": 12}
            r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            served = report["models"]["support"]["rows"][0]
            assert r.json()["choices"][0]["message"]["content"] == served["served"]
            assert client.get("/health").json()["engine"] == "vllm"
            # run time: unload an adapter, then load it again from its (re-verified) bundle
            admin = {"Authorization": "Bearer admin-test"}
            assert client.delete("/admin/adapters/sales", headers=admin).status_code == 200
            body["model"] = "sales"
            assert client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 404
            bundle = str(vllm_project.root / "bundles" / "sales")
            r = client.post("/admin/adapters", json={"path": bundle, "name": "sales"}, headers=admin)
            assert r.status_code == 201, r.text
            r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == report["models"]["sales"]["rows"][0]["served"]

        # C17, the failing side: an adapter vLLM accepts and does not apply. Its tensors name the layers under a
        # path vLLM's Llama does not have (model.decoder.layers.N, as from a differently wrapped model); vLLM checks
        # only the last part of each name (q_proj), loads it, logs "No LoRA weights found for module ..., skipping"
        # at debug level, and answers with the base model. Loaded behind tunegate's back, under the name "sales".
        from safetensors.torch import load_file, save_file

        ignored = tmp_path / "ignored-adapter"
        shutil.copytree(vllm_project.root / "bundles" / "sales" / "adapter", ignored)
        weights = load_file(ignored / "adapter_model.safetensors")
        assert any(".model.layers." in k for k in weights)
        save_file({k.replace(".model.layers.", ".model.decoder.layers."): v for k, v in weights.items()},
                  ignored / "adapter_model.safetensors")
        assert engine.client.post("/unload_lora_adapter", json={"lora_name": "sales"}).status_code == 200
        r = engine.client.post("/load_lora_adapter", json={"lora_name": "sales", "lora_path": str(ignored)})
        assert r.status_code == 200, r.text  # accepted: this is the silent case
        bad = run_smoke(vllm_project, engine.url, [None, "sales"], max_tokens=12, max_rank=1)
        assert not bad["passed"] and bad["models"]["sales"]["differs_from_base"] is False
        assert any(f.startswith("sales: answers exactly like the base model on all 4 canary prompts") and "case C17" in f
                   for f in bad["failures"]), bad["failures"]
    finally:
        engine.close()
    assert engine.process.proc.poll() is not None


def test_vllm_stops_at_the_end_of_turn_when_the_bases_eos_is_another_token(tmp_path, split_eos_model_dir):
    """Issue 20, stop tokens travel: the base's tokenizer and generation_config.json name `<|endoftext|>` as eos,
    its template ends turns with `<|im_end|>`, and the model answers "The answer." then `<|im_end|>`, then
    repeats itself (conftest.split_eos_model_dir). vLLM started by tunegate stops there both for a request sent
    to it directly with no stop ids (--generation-config) and for one forwarded by the proxy (stop_token_ids)."""
    import httpx
    from conftest import SPLIT_EOS_ANSWER

    from tunegate.serve.vllm import VLLMEngine

    (tmp_path / "tunegate.yaml").write_text(project_yaml("stops", split_eos_model_dir, train="  adapter: lora"))
    project = load_project(tmp_path / "tunegate.yaml")
    engine = VLLMEngine.launch(project, venv=VENV, dtype="float32", enforce_eager=True, timeout_s=900, max_model_len=512)
    n, max_tokens = 8, 32
    try:
        direct, proxied = [], []
        for i in range(n):
            msgs = [{"role": "user", "content": f"golden question {i} on alpha"}]
            r = httpx.post(engine.url + "/chat/completions", timeout=300, json={
                "model": engine.base_name, "messages": msgs, "max_tokens": max_tokens, "temperature": 0})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            direct.append((choice["message"]["content"], choice["finish_reason"]))
            out = engine.complete(None, msgs, max_tokens, temperature=0)
            proxied.append((out.text, out.finish_reason))
    finally:
        engine.close()
    stopped = [sum(a == (SPLIT_EOS_ANSWER, "stop") for a in answers) for answers in (direct, proxied)]
    print(f"vLLM answers that stopped at the end of turn: direct (--generation-config) {stopped[0]}/{n}, "
          f"through the proxy (stop_token_ids) {stopped[1]}/{n}; first answers {direct[0]!r} {proxied[0]!r}")
    assert stopped == [n, n]
