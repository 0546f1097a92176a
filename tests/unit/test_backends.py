"""The OpenAI-compatible backend against an in-process fake server (no network)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tunegate import TunegateError
from tunegate.evals.backends import OpenAIChat, user_turns


class _Handler(BaseHTTPRequestHandler):
    requests: list = []
    lora_root: str | None = None

    def do_GET(self):  # noqa: N802  /v1/models, vLLM style: a LoRA module's card names its adapter path
        cards = [{"id": "base", "object": "model", "created": 0, "owned_by": "vllm", "root": "base", "parent": None},
                 {"id": "candidate", "object": "model", "created": 0, "owned_by": "vllm", "root": _Handler.lora_root, "parent": "base"}]
        data = json.dumps({"object": "list", "data": cards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.requests.append((self.path, body))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            return
        text = "echo: " + body["messages"][-1]["content"]
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Handler.requests = []
    yield f"http://127.0.0.1:{srv.server_port}/v1"
    srv.shutdown()


def test_answers_in_input_order_with_greedy_settings(server):
    chat = OpenAIChat(server, "candidate", concurrency=4)
    out = chat.complete(user_turns([f"q{i}" for i in range(10)], system="be brief"), max_new_tokens=7)
    assert out == [f"echo: q{i}" for i in range(10)]
    path, body = _Handler.requests[0]
    assert path == "/v1/chat/completions"
    assert body["temperature"] == 0 and body["max_tokens"] == 7 and body["model"] == "candidate"
    assert body["messages"][0] == {"role": "system", "content": "be brief"}


def test_prefill_becomes_an_instruction(server):
    (out,) = OpenAIChat(server, "judge").complete(user_turns(["rate it"]), 4, prefill="[[")
    assert out == "echo: rate it\n\nBegin your answer with: [["


def test_server_error_names_the_url(server):
    with pytest.raises(TunegateError, match=r"127\.0\.0\.1:\d+/v1: OpenAI-compatible server for model 'broken' failed"):
        OpenAIChat(server, "broken").complete(user_turns(["x"]), 4)


def test_the_served_candidate_must_be_this_runs_adapter(server, tmp_path):
    from tunegate.evals.backends import check_served_adapter

    ours, other = tmp_path / "ours", tmp_path / "other"
    for d, payload in ((ours, b"weights-1"), (other, b"weights-2")):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(payload)
    _Handler.lora_root = str(ours)
    check_served_adapter(server, "candidate", ours)  # same weights: fine
    _Handler.lora_root = str(other)
    with pytest.raises(TunegateError, match="whose weights differ"):
        check_served_adapter(server, "candidate", ours)
    _Handler.lora_root = None
    with pytest.raises(TunegateError, match="cannot verify that 'candidate' is this run's adapter"):
        check_served_adapter(server, "candidate", ours)
    with pytest.raises(TunegateError, match=r"serves \['base', 'candidate'\], not the candidate 'adapter-x'"):
        check_served_adapter(server, "adapter-x", ours)
