"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random 2-layer Llama built on it.

The tokenizer comes from the embedded base model (converted once into the tunegate cache, ~30 s on a
fresh machine). The tiny model has the real vocabulary and chat template, so every template and mask
path is the real one, while training and generation take seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TUNEGATE_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def base_dir() -> Path:
    from tunegate.models import resolve_base_model

    return Path(resolve_base_model("smollm2-135m-instruct", progress=False))


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    from tunegate.models import load_tokenizer

    return load_tokenizer(base_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) with the real tokenizer, saved like any HF model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


SPLIT_EOS_ANSWER = "The answer."  # what the split-eos model answers to any chat prompt, then <|im_end|>


@pytest.fixture(scope="session")
def split_eos_model_dir(tmp_path_factory, base_dir) -> Path:
    """A tiny Llama whose tokenizer's eos is not its end-of-turn token, as many Hub chat models have it: the SmolLM2
    tokenizer with eos (and pad) `<|endoftext|>`, while its ChatML template still ends each turn with `<|im_end|>`;
    config.json and generation_config.json name `<|endoftext|>` as eos, like such a base model's.

    Built to answer deterministically: its attention and MLP outputs are scaled down 100x, so the last hidden
    state is (nearly) the last token's embedding, and its untied output layer maps a few tokens to a successor:
    "\n" (the end of the generation prompt) -> "The" -> " answer" -> "." -> `<|im_end|>` -> "\n" -> ... Greedy
    decoding therefore writes SPLIT_EOS_ANSWER, then `<|im_end|>`; a generator that does not stop there writes
    the answer again and again up to its token limit. Head size 32 (2 heads of 64), which vLLM's CPU attention runs.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunegate.models import load_tokenizer

    tok = load_tokenizer(base_dir)
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != eot
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    chain = newline + tok(SPLIT_EOS_ANSWER, add_special_tokens=False)["input_ids"] + [eot] + newline
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
        emb, out = model.model.embed_tokens.weight, model.lm_head.weight  # (V, 64) each
        for prev, nxt in zip(chain, chain[1:]):
            out[nxt] = emb[prev] * 10.0  # logit of `nxt` after `prev`: ~13; any other token: under ~1
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir = tmp_path_factory.mktemp("tiny-llama-split-eos")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(user: str, answer: str, rid: str | None = None, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return ({"id": rid} if rid else {}) | {"messages": msgs}


def make_tiny_project(root: Path, tiny_model_dir: Path) -> Path:
    """A small classification project on the tiny model in `root`: 60 train rows, 12 golden rows, 3 labels."""
    labels = ["alpha", "beta", "gamma"]
    train = [chat(f"message number {i} about topic {labels[i % 3]}", labels[i % 3], f"t{i}") for i in range(60)]
    golden = [chat(f"golden question {i} on {labels[i % 3]}", labels[i % 3], f"g{i}") for i in range(12)]
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "golden.jsonl", golden)
    (root / "tunegate.yaml").write_text(project_yaml(
        "tiny", tiny_model_dir,
        train="  lora: {r: 4, lora_alpha: 8}\n"
              "  trl: {max_steps: 4, per_device_train_batch_size: 4, save_steps: 2, logging_steps: 1, warmup_steps: 0}"))
    return root


def hold_out_gamma(cfg: str, eval_extra: str = "") -> str:
    """The tiny project file (make_tiny_project) with its label gamma held out: dropped from training, `oos` in the golden
    set, and the out-of-scope metrics measured (`eval_extra`: more indented eval lines, e.g. "  abstain: {...}\n")."""
    cfg = cfg.replace("  sources: [{path: train.jsonl, format: chat}]", "  sources: [{path: train.jsonl, format: chat, drop_labels: [gamma]}]")
    cfg = cfg.replace("  golden: {path: golden.jsonl, format: chat}", "  golden: {path: golden.jsonl, format: chat, label_map: {gamma: oos}}")
    return cfg.replace("  gate: [{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}]",
                       "  metrics: [exact_match, in_scope_accuracy, oos_recall, oos_precision]\n" + eval_extra
                       + "  gate: [{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}]")


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir):
    """A small classification project on the tiny model: 60 train rows, 12 golden rows, 3 labels."""
    return make_tiny_project(tmp_path, tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_project_factory(tiny_model_dir):
    """`make(root)` writes the tiny project into `root` (for tests that need several, e.g. under Hypothesis)."""
    return lambda root: make_tiny_project(root, tiny_model_dir)


def project_yaml(name, base_model, train: str, eval_: str = "  max_new_tokens: 4\n  batch_size: 8\n  bootstrap_samples: 200",
                 extra: str = "") -> str:
    """A tiny project file: train.jsonl / golden.jsonl chat sources, max_length 64, a gate that always passes,
    no audit (it has its own tests). `train` and `eval_` are the indented bodies of those sections."""
    return f"""
name: {name}
base_model: {base_model}
data:
  sources: [{{path: train.jsonl, format: chat}}]
  golden: {{path: golden.jsonl, format: chat}}
  val_fraction: 0.1
  max_length: 64
train:
{train}
eval:
{eval_}
  gate: [{{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}}]
audit:
  enabled: false
{extra}"""


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the shared datasets folder (../shared/data) is absent")
    return path


@contextlib.contextmanager
def fake_openai_server(answer, models=lambda: []):
    """An in-process OpenAI-compatible server (no network): POST /v1/chat/completions answers
    `answer(model, messages)` (None -> HTTP 500), any other POST gets `{}`, GET /v1/models lists `models()` cards. Yields
    (base_url, requests) where requests collects (path, body) of every completion call."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    requests: list = []

    class Handler(BaseHTTPRequestHandler):
        def _send(self, payload, status=200):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._send({"object": "list", "data": [{"object": "model", "created": 0, "owned_by": "fake", **m} for m in models()]})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body))
            if not self.path.endswith("/chat/completions"):  # vLLM's /v1/load_lora_adapter and the like
                return self._send({})
            text = answer(body["model"], body["messages"])
            if text is None:
                return self._send({"error": {"message": "boom"}}, status=500)
            self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/v1", requests
    finally:
        srv.shutdown()
