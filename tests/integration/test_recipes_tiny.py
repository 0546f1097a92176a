"""Every training recipe on the tiny random Llama (real tokenizer): each trains, saves, and reports what it
should. Real-model and real-data versions are in test_recipes_real.py (marked)."""

import json
import math

import pytest

from tunegate.config import load_project
from tunegate.models import load_tokenizer
from tunegate.pipeline import run_pipeline

from conftest import chat, write_jsonl

LABELS = ["alpha", "beta", "gamma"]
GOLDEN = [chat(f"golden question {i} on {LABELS[i % 3]}", LABELS[i % 3], f"g{i}") for i in range(6)]


def project_file(tmp_path, tiny_model_dir, rows, fmt: str, train_yaml: str, name: str = "tiny") -> object:
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "golden.jsonl", GOLDEN)
    (tmp_path / "tunegate.yaml").write_text(
        f"""
name: {name}
base_model: {tiny_model_dir}
data:
  sources: [{{path: train.jsonl, format: {fmt}}}]
  golden: {{path: golden.jsonl, format: chat}}
  val_fraction: 0.0
  max_length: 64
  decontaminate: null
train:
{train_yaml}
eval:
  max_new_tokens: 4
  bootstrap_samples: 100
  gate: [{{metric: exact_match, min: 0.0, min_delta_ci_low: -1.0}}]
audit: {{enabled: false}}
"""
    )
    return tmp_path / "tunegate.yaml"


def pairs(n: int = 16) -> list[dict]:
    return [
        {"id": f"p{i}", "prompt": f"which topic is message {i} about?", "chosen": LABELS[i % 3], "rejected": f"I cannot say, number {i}"}
        for i in range(n)
    ]


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_ln2_with_zero_margin_and_saves_an_adapter(tmp_path, tiny_model_dir):
    path = project_file(tmp_path, tiny_model_dir, pairs(), "preference", """
  method: dpo
  lora: {r: 4, lora_alpha: 8}
  trl: {max_steps: 3, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 10, warmup_steps: 0}
""")
    summary = run_pipeline(load_project(path), until="train")["train"].metrics
    assert summary["method"] == "dpo" and summary["pairs"] == 16
    assert abs(summary["first_loss"] - math.log(2)) < 1e-3
    assert abs(summary["first_reward_margin"]) < 1e-3
    assert (tmp_path / "runs/default/train/adapter/adapter_model.safetensors").is_file()
    # the compute estimate's D counts both sequences of a pair: the chat-templated prompt + chosen and prompt + rejected
    tok = load_tokenizer(tiny_model_dir)
    by_hand = sum(len(tok.apply_chat_template([{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]}],
                                              tokenize=True, return_dict=True)["input_ids"])
                  for p in pairs() for side in ("chosen", "rejected"))
    assert summary["train_tokens_per_epoch"] == by_hand


def test_dpo_from_an_sft_adapter_uses_it_as_the_frozen_reference(tmp_path, tiny_model_dir):
    """Case C19 in docs/cases.md: starting from a trained adapter, step 0 is still ln 2 and margin 0 (reference = start policy)."""
    sft_dir = tmp_path / "sft"
    sft = project_file(sft_dir, tiny_model_dir, [chat(f"which topic is message {i} about?", LABELS[i % 3]) for i in range(16)], "chat", """
  lora: {r: 4, lora_alpha: 8}
  trl: {max_steps: 4, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 10, warmup_steps: 0, learning_rate: 0.01}
""")
    run_pipeline(load_project(sft), until="train")
    adapter = sft_dir / "runs/default/train/adapter"
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert max(float(v.abs().max()) for v in lora_b) > 1e-3  # the starting adapter is not the identity
    dpo_dir = tmp_path / "dpo"
    path = project_file(dpo_dir, tiny_model_dir, pairs(), "preference", f"""
  method: dpo
  init_adapter: {adapter}
  trl: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 10, warmup_steps: 0}}
""")
    summary = run_pipeline(load_project(path), until="train")["train"].metrics
    assert abs(summary["first_loss"] - math.log(2)) < 1e-3
    assert abs(summary["first_reward_margin"]) < 1e-3
    saved = dpo_dir / "runs/default/train/adapter"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "ref").exists()


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_and_log_a_finite_loss(tmp_path, tiny_model_dir, method):
    rows = pairs(12)
    fmt = "preference"
    if method == "kto":  # unpaired thumbs: half up, half down
        rows = [{"id": f"k{i}", "prompt": f"which topic is message {i} about?",
                 "completion": LABELS[i % 3] if i % 2 else "no idea", "label": bool(i % 2)} for i in range(16)]
        fmt = "kto"
    path = project_file(tmp_path, tiny_model_dir, rows, fmt, f"""
  method: {method}
  lora: {{r: 4, lora_alpha: 8}}
  trl: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 10, warmup_steps: 0}}
""")
    summary = run_pipeline(load_project(path), until="train")["train"].metrics
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    if method == "kto":
        assert (summary["desirable_rows"], summary["undesirable_rows"]) == (8, 8)
        # TRL's KL estimate forwards each prompt with the previous row's completion (rotated within a batch of 4)
        assert summary["kl_tokens_per_epoch"] > 0
    assert summary["train_tokens_per_epoch"] > 0


def grpo_project(tmp_path, tiny_model_dir, verifier_body: str, trl: str = "num_generations: 4"):
    (tmp_path / "reward.py").write_text(f"def score(completion, reference, row):\n    {verifier_body}\n")
    rows = [chat(f"say the word {LABELS[i % 3]} ({i})", LABELS[i % 3], f"r{i}") for i in range(12)]
    return project_file(tmp_path, tiny_model_dir, rows, "chat", f"""
  method: grpo
  grpo: {{verifier: "reward.py:score", smoke_prompts: 4}}
  lora: {{r: 4, lora_alpha: 8}}
  trl: {{max_steps: 2, per_device_train_batch_size: 4, {trl}, max_completion_length: 8, logging_steps: 1, save_steps: 10, warmup_steps: 0}}
""")


def test_grpo_trains_against_a_file_verifier_and_records_its_sha256(tmp_path, tiny_model_dir):
    import hashlib

    path = grpo_project(tmp_path, tiny_model_dir, "return float(len(completion) % 2)")  # varies between samples
    summary = run_pipeline(load_project(path), until="train")["train"].metrics
    assert summary["steps"] == 2 and summary["smoke"]["zero_variance_groups"] < 4
    assert summary["verifier"]["sha256"] == hashlib.sha256((tmp_path / "reward.py").read_bytes()).hexdigest()
    logged = [r for r in metrics(tmp_path / "runs/default") if "reward" in r]
    assert logged and all(math.isfinite(r["reward"]) and 0 <= r["reward"] <= 1 for r in logged)


def test_grpo_stops_before_training_when_the_reward_never_varies(tmp_path, tiny_model_dir):
    """Case C18: a constant reward gives every advantage 0; the smoke batch catches it before any step."""
    from tunegate import TunegateError

    path = grpo_project(tmp_path, tiny_model_dir, "return 0.5")
    with pytest.raises(TunegateError, match="same reward to every answer.*case C18"):
        run_pipeline(load_project(path), until="train")
    assert not (tmp_path / "runs/default/train/manifest.json").exists()


def test_grpo_refuses_one_generation(tmp_path, tiny_model_dir):
    from tunegate import TunegateError

    path = grpo_project(tmp_path, tiny_model_dir, "return float(len(completion) % 2)", trl="num_generations: 1, generation_batch_size: 4")
    with pytest.raises(TunegateError, match="train.trl: trl.GRPOConfig refused it: GRPO requires at least 2 generations"):
        run_pipeline(load_project(path), until="train")


def test_cpt_packs_raw_text_and_reports_held_out_perplexity(tmp_path, tiny_model_dir):
    words = "the ledger posts every transfer before the settlement window closes".split()
    texts = [{"id": f"x{i}", "text": " ".join(words[(i + j) % len(words)] for j in range(30))} for i in range(40)]
    path = project_file(tmp_path, tiny_model_dir, texts, "text", """
  method: cpt
  lora: {r: 8, lora_alpha: 16}
  trl: {max_steps: 12, per_device_train_batch_size: 4, logging_steps: 4, save_steps: 100, warmup_steps: 0, learning_rate: 0.005}
""")
    project = load_project(path, ["data.val_fraction=0.2"])
    summary = run_pipeline(project, until="train")["train"].metrics
    # 32 train texts of 31 tokens-ish packed into 64-token blocks: fewer blocks than texts, none padded
    assert summary["texts"] == 32 and summary["blocks"] < summary["texts"]
    assert summary["perplexity_after"] < summary["perplexity_before"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model made to answer "alpha": the random model's greedy pick is a newline (id 198); with tied
    embeddings, giving "alpha" twice that token's embedding makes it the greedy pick instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (alpha,) = tok("alpha", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[alpha] = 2 * emb[198]
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_distillation_refuses_a_teacher_that_answers_nothing(tmp_path, tiny_model_dir):
    from tunegate import TunegateError

    rows = [chat(f"which topic is message {i} about?", LABELS[i % 3], f"d{i}") for i in range(4)]
    path = project_file(tmp_path, tiny_model_dir, rows, "chat", f"""
  method: distillation
  distillation: {{teacher: {tiny_model_dir}, max_new_tokens: 4}}
  trl: {{max_steps: 1}}
""")
    with pytest.raises(TunegateError, match="teacher .* gave an empty answer to all 4 prompts"):
        run_pipeline(load_project(path), until="train")


@pytest.mark.parametrize("mode", ["sequence", "logits"])
def test_distillation_learns_from_the_teacher(tmp_path, tiny_model_dir, teacher_dir, mode):
    rows = [chat(f"which topic is message {i} about?", LABELS[i % 3], f"d{i}") for i in range(8)]
    path = project_file(tmp_path, tiny_model_dir, rows, "chat", f"""
  method: distillation
  distillation: {{teacher: {teacher_dir}, mode: {mode}, max_new_tokens: 6}}
  lora: {{r: 4, lora_alpha: 8}}
  trl: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 10, warmup_steps: 0{", max_completion_length: 6" if mode == "logits" else ""}}}
""")
    summary = run_pipeline(load_project(path), until="train")["train"].metrics
    assert summary["steps"] == 2 and summary["mode"] == mode and math.isfinite(summary["final_train_loss"])
    if mode == "sequence":
        answers = [json.loads(x) for x in (tmp_path / "runs/default/train/teacher_answers.jsonl").read_text().splitlines()]
        assert summary["teacher_answers"] == len(answers) > 0
        assert all(a["meta"]["original_answer"] in LABELS for a in answers)
        assert all(a["messages"][-1]["content"].startswith("alphaalpha") for a in answers)  # the teacher's words


def test_full_sft_saves_a_whole_model_and_the_gate_compares_it_with_the_base(tmp_path, tiny_model_dir):
    rows = [chat(f"which topic is message {i} about?", LABELS[i % 3], f"f{i}") for i in range(16)]
    path = project_file(tmp_path, tiny_model_dir, rows, "chat", """
  adapter: full
  trl: {max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 10, warmup_steps: 0}
""")
    manifests = run_pipeline(load_project(path), until="eval")
    summary = manifests["train"].metrics
    assert summary["adapter"] == "full" and summary["lora"] is None
    assert summary["trainable_params"] == summary["total_params"]
    run_dir = tmp_path / "runs/default"
    assert (run_dir / "train/model/model.safetensors").is_file() and not (run_dir / "train/adapter").exists()
    assert manifests["eval"].verdict == "PASS"


def test_qlora_without_cuda_is_refused_with_the_reason(tmp_path, tiny_model_dir):
    import torch

    from tunegate import TunegateError

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: QLoRA can run here")
    rows = [chat(f"which topic is message {i} about?", LABELS[i % 3]) for i in range(8)]
    path = project_file(tmp_path, tiny_model_dir, rows, "chat", "  adapter: qlora\n  trl: {max_steps: 1}\n")
    with pytest.raises(TunegateError, match="(?s)qlora_needs_cuda.*CUDA GPU.*adapter: dora"):
        run_pipeline(load_project(path), until="train")
