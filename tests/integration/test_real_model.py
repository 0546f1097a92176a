"""Marked tests on the real embedded SmolLM2-135M-Instruct and the real shared datasets."""

import json

import pytest

from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

from conftest import REPO, shared_data


@pytest.mark.slow
def test_real_smollm2_learns_the_quickstart_tickets_and_stops(tmp_path):
    """A few steps of LoRA+DoRA on the real base model: loss falls, and greedy generation on training
    prompts stops at the end-of-turn token before max_new_tokens (case C01 after training)."""
    import shutil

    from peft import PeftModel

    from tunegate.data.format import generation_prompt
    from tunegate.core.io import read_jsonl
    from tunegate.evals.generate import generate
    from tunegate.models import load_model, load_tokenizer, resolve_base_model

    qs = REPO / "examples" / "quickstart"
    shutil.copytree(qs / "data", tmp_path / "data")
    text = (qs / "tunegate.yaml").read_text()
    (tmp_path / "tunegate.yaml").write_text(text)
    project = load_project(
        tmp_path / "tunegate.yaml",
        ["train.trl.max_steps=30", "train.trl.per_device_train_batch_size=8", "train.trl.logging_steps=2",
         "train.trl.learning_rate=1e-3",  # 30 steps are few: the rate this test was measured with, not the quickstart's
         "train.trl.save_steps=100", "data.val_fraction=0.0"],
    )
    run_pipeline(project, until="train")
    run_dir = tmp_path / "runs" / "default"
    losses = [r["loss"] for r in map(json.loads, (run_dir / "train/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] / 3, losses

    base = resolve_base_model("smollm2-135m-instruct")
    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_model(base), str(run_dir / "train" / "adapter"))
    rows = read_jsonl(run_dir / "data" / "train.jsonl")[:16]
    outs = generate(model, tok, [generation_prompt(tok, r) for r in rows], max_new_tokens=48, batch_size=8)
    n_tokens = [len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs]
    assert max(n_tokens) < 48, outs  # every answer ended with <|im_end|> before the limit
    labels = {"repair_booking", "order_status", "return_request", "product_question", "billing_issue", "other"}

    def queue(text):
        try:
            return json.loads(text).get("queue")
        except (json.JSONDecodeError, AttributeError):
            return None

    assert sum(queue(o) in labels for o in outs) >= 12, outs  # tickets in the learned format, with a known queue


@pytest.mark.real_data
def test_banking77_data_stage_on_the_real_files(tmp_path):
    """Reads ../shared/data/banking77: 10,003 train rows, a seeded 500-row golden sample, overlap removed."""
    folder = shared_data("banking77")
    import shutil

    shutil.copy(REPO / "examples/banking77/tunegate.yaml", tmp_path / "tunegate.yaml")
    shutil.copy(REPO / "examples/banking77/golden.lock.json", tmp_path / "golden.lock.json")
    project = load_project(
        tmp_path / "tunegate.yaml",
        [f"data.sources.0.path={folder / 'train.csv'}", f"data.golden.path={folder / 'test.csv'}"],
    )
    run_pipeline(project, until="data")  # the committed lock must match the shared test set
    stats = json.loads((tmp_path / "runs/default/data/stats.json").read_text())
    assert stats["rows_read"] == 10_003
    assert stats["golden_rows"] == 500
    assert stats["rows_kept"] + stats["rows_rejected"] == 10_003
    # exact overlap (1 row) and 13-word n-gram overlap (2 rows: test:775, test:2220) with the golden sample
    assert set(stats["rejected_by_rule"]) <= {"golden_overlap", "golden_ngram_overlap"}
    assert sum(stats["rejected_by_rule"].values()) == stats["golden_overlap_removed"]
    assert stats["train_rows"] + stats["val_rows"] == stats["rows_kept"]


@pytest.mark.real_data
def test_case_inputs_from_the_field_are_handled(tmp_path):
    """Every field-case input the data stage reads (docs/cases.md; the files live in the shared cases folder beside the
    repository): bad rows rejected, never a crash."""
    from tunegate.config import SourceConfig
    from tunegate.data.records import read_source

    cases = shared_data("..", "cases", "inputs")
    expected_rejects = {"bad_roles.jsonl": 5, "empty_turns.jsonl": 3, "list_content.jsonl": 0, "system_role.jsonl": 0, "chat_basic.jsonl": 0}
    for name, n in expected_rejects.items():
        records, rejected = read_source(SourceConfig(path=cases / name))
        assert len(rejected) == n, (name, [str(r) for r in rejected])
