"""Every training recipe for a few steps on the real embedded SmolLM2-135M-Instruct (marked slow), and the
acceptance checks that need real data (marked real_data; skipped with a reason without ../shared/data).
The longer acceptance runs (DPO margins, GRPO held-out reward, CPT perplexity) are bench/recipes_real.py."""

import json
import math

import pytest

from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

from conftest import REPO, shared_data, write_jsonl

QS = REPO / "examples" / "quickstart" / "data"


def quickstart_chats(n: int) -> list[dict]:
    return [json.loads(x) for x in (QS / "train.jsonl").read_text().splitlines()[:n]]


def project(tmp_path, rows, fmt: str, train_yaml: str) -> object:
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "golden.jsonl", [json.loads(x) for x in (QS / "golden.jsonl").read_text().splitlines()[:4]])
    (tmp_path / "tunegate.yaml").write_text(f"""
name: real
data:
  sources: [{{path: train.jsonl, format: {fmt}}}]
  golden: {{path: golden.jsonl, format: chat}}
  val_fraction: 0.0
  max_length: 256
  decontaminate: null
train:
{train_yaml}
audit: {{enabled: false}}
""")
    return load_project(tmp_path / "tunegate.yaml")


def pairs_from_quickstart(n: int) -> list[dict]:
    rows = []
    for r in quickstart_chats(n):
        rows.append({"id": r["id"], "prompt": r["messages"][:-1], "chosen": r["messages"][-1]["content"],
                     "rejected": "Sorry, I can't help with that."})
    return rows


STEPS = "trl: {max_steps: 2, per_device_train_batch_size: 2, logging_steps: 1, save_steps: 100, warmup_steps: 0}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "full", "cpt", "dpo", "kto", "orpo", "grpo", "distillation"])
def test_each_recipe_runs_a_few_steps_on_the_real_model(tmp_path, method):
    fmt, extra, rows = "chat", "", quickstart_chats(8)
    if method == "full":
        extra = "adapter: full"
    elif method == "cpt":
        fmt, rows = "text", [{"id": r["id"], "text": r["messages"][1]["content"]} for r in rows]
    elif method in ("dpo", "orpo", "kto"):
        fmt, rows = "preference", pairs_from_quickstart(8)
    elif method == "grpo":  # a verifier whose reward follows the sampled answer's length, so it varies in a group
        (tmp_path / "reward.py").write_text("def score(completion, reference, row):\n    return len(completion) % 3 / 2\n")
        extra = 'grpo: {verifier: "reward.py:score", smoke_prompts: 2}'
    elif method == "distillation":
        extra = "distillation: {teacher: smollm2-135m-instruct, max_new_tokens: 24}"
    steps = STEPS.replace("per_device_train_batch_size: 2", "per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 16") if method == "grpo" else STEPS
    train_yaml = f"  method: {'sft' if method == 'full' else method}\n" + (f"  {extra}\n" if extra else "") + f"  {steps}\n"
    summary = run_pipeline(project(tmp_path, rows, fmt, train_yaml), until="train")["train"].metrics
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    saved = tmp_path / "runs/default/train" / ("model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors")
    assert saved.is_file()


@pytest.mark.slow
@pytest.mark.real_data
def test_dpo_on_hh_rlhf_starts_at_ln2(tmp_path):
    """Acceptance: DPO on Anthropic HH-RLHF starts at loss ln 2 = 0.693 within 1e-3 (reference = start policy)."""
    path = shared_data("hh_rlhf", "helpful_base_test_first2000.jsonl")
    rows = []
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        if len(r["chosen"]) < 500 and len(r["rejected"]) < 500:
            rows.append({"id": f"hh{len(rows)}", **r})
        if len(rows) == 8:
            break
    p = project(tmp_path, rows, "preference", "  method: dpo\n  trl: {max_steps: 1, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 100}\n")
    summary = run_pipeline(p, until="train")["train"].metrics
    assert abs(summary["first_loss"] - math.log(2)) < 1e-3
    assert abs(summary["first_reward_margin"]) < 1e-3
