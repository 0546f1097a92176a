"""The OpenAI-compatible backend against an in-process fake server (no network)."""

import pytest
from conftest import fake_openai_server

from tunegate import TunegateError
from tunegate.evals.backends import OpenAIChat, check_served_adapter, user_turns


def _echo(model, messages):
    return None if model == "broken" else "echo: " + messages[-1]["content"]


def test_answers_in_input_order_with_greedy_settings():
    with fake_openai_server(_echo) as (url, requests):
        out = OpenAIChat(url, "candidate", concurrency=4).complete(user_turns([f"q{i}" for i in range(10)], system="be brief"), max_new_tokens=7)
    assert out == [f"echo: q{i}" for i in range(10)]
    path, body = requests[0]
    assert path == "/v1/chat/completions"
    assert body["temperature"] == 0 and body["max_tokens"] == 7 and body["model"] == "candidate"
    assert body["messages"][0] == {"role": "system", "content": "be brief"}


def test_prefill_becomes_an_instruction():
    with fake_openai_server(_echo) as (url, _):
        (out,) = OpenAIChat(url, "judge").complete(user_turns(["rate it"]), 4, prefill="[[")
    assert out == "echo: rate it\n\nBegin your answer with: [["


def test_server_error_names_the_url():
    with fake_openai_server(_echo) as (url, _):
        with pytest.raises(TunegateError, match=r"127\.0\.0\.1:\d+/v1: OpenAI-compatible server for model 'broken' failed"):
            OpenAIChat(url, "broken").complete(user_turns(["x"]), 4)


def test_the_served_candidate_must_be_this_runs_adapter(tmp_path):
    ours, other = tmp_path / "ours", tmp_path / "other"
    for d, payload in ((ours, b"weights-1"), (other, b"weights-2")):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(payload)
    served = {"root": str(ours)}  # vLLM style: a LoRA module's card names its adapter path
    cards = lambda: [{"id": "base", "root": "base", "parent": None}, {"id": "candidate", "root": served["root"], "parent": "base"}]  # noqa: E731
    with fake_openai_server(_echo, cards) as (url, _):
        check_served_adapter(url, "candidate", ours)  # same weights: fine
        served["root"] = str(other)
        with pytest.raises(TunegateError, match="whose weights differ"):
            check_served_adapter(url, "candidate", ours)
        served["root"] = None
        with pytest.raises(TunegateError, match="cannot verify that 'candidate' is this run's adapter"):
            check_served_adapter(url, "candidate", ours)
        with pytest.raises(TunegateError, match=r"serves \['base', 'candidate'\], not the candidate 'adapter-x'"):
            check_served_adapter(url, "adapter-x", ours)
