"""`tunegate validate` resolves base_model without the network and reads every source's header and first rows, so
a misspelled model or a wrong `format` is caught before any model loads."""

import subprocess
import sys

import pytest

from tunegate.config import load_project
from tunegate.pipeline import validate_project


def problems(project_dir, *overrides):
    return validate_project(load_project(project_dir / "tunegate.yaml", list(overrides)))


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty HF_HOME: no hub id is cached, and nothing may go to the network."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def test_the_tiny_project_validates_clean(tiny_project):
    assert problems(tiny_project) == []


def test_a_feedback_source_not_exported_yet_is_no_problem_but_a_broken_one_is(tiny_project):
    cfg = tiny_project / "tunegate.yaml"
    cfg.write_text(cfg.read_text().replace("sources: [{path: train.jsonl, format: chat}]",
                                           "sources: [{path: train.jsonl, format: chat}, {feedback: sft}]"))
    assert problems(tiny_project) == []  # a fresh clone: feedback/ is git-ignored, `tunegate run` writes it
    (tiny_project / "feedback").mkdir()
    (tiny_project / "feedback" / "sft.jsonl").write_text('{"prompt": "not a chat row"}\n')
    assert any(x.startswith("data.sources.1 (format chat)") for x in problems(tiny_project))


def test_a_misspelled_embedded_model_is_named_with_the_right_spelling(tiny_project, offline_empty_cache):
    found = problems(tiny_project, "base_model=smollm2-135m-instrct")
    assert found == ["base_model smollm2-135m-instrct: not an embedded model, a folder or a cached hub id; "
                     "did you mean smollm2-135m-instruct?"]


def test_a_missing_model_folder_is_an_error(tiny_project, tmp_path):
    missing = tmp_path / "models" / "mine"
    found = problems(tiny_project, f"base_model={missing}")
    assert found == [f"base_model {missing}: no such folder ({missing})"]
    (tmp_path / "empty-model").mkdir()
    assert problems(tiny_project, f"base_model={tmp_path / 'empty-model'}") == [
        f"base_model {tmp_path / 'empty-model'}: no config.json in that folder"]


def test_an_uncached_hub_id_offline_is_one_line_and_exit_2(tiny_project, offline_empty_cache):
    found = problems(tiny_project, "base_model=acme/no-such-model")
    assert len(found) == 1 and found[0].startswith("base_model acme/no-such-model: a Hugging Face id not in the local cache")
    assert str(offline_empty_cache / "hub") in found[0] and "HF_HUB_OFFLINE is set" in found[0]
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "validate", str(tiny_project / "tunegate.yaml"),
                        "base_model=acme/no-such-model"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "base_model acme/no-such-model: a Hugging Face id not in the local cache" in r.stderr


def test_a_csv_without_the_mapped_column_is_caught(tiny_project):
    (tiny_project / "qa.csv").write_text("question,answer\nwhat is alpha,alpha\n")
    found = problems(tiny_project, "data.sources.0.path=qa.csv", "data.sources.0.format=csv")
    assert len(found) == 1 and found[0].startswith(f"data.sources.0: {tiny_project / 'qa.csv'}:1: column(s) prompt, completion not in the header")
    # mapped to the columns it has: clean
    assert problems(tiny_project, "data.sources.0.path=qa.csv", "data.sources.0.format=csv",
                    "data.sources.0.prompt_column=question", "data.sources.0.completion_column=answer") == []


def test_a_chat_file_declared_as_alpaca_is_caught(tiny_project):
    found = problems(tiny_project, "data.sources.0.format=alpaca")
    assert len(found) == 1
    assert found[0].startswith("data.sources.0 (format alpaca): none of the first 5 row(s) parse as alpaca; first: ")
    assert f"{tiny_project / 'train.jsonl'}:1 (id t0)" in found[0]
