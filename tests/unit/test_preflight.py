import json
import subprocess
import sys

import pytest

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.preflight import (
    ASSUMED_MFU,
    Finding,
    anti_pattern_table,
    anti_patterns,
    estimate,
    measure_matmul_peak,
    render,
    resolve_target_modules,
    train_flops,
)

GOLDEN_ROW = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def project(tmp_path, extra: str = "", golden: str | None = GOLDEN_ROW + "\n", fmt: str = "chat"):
    """A project in tmp_path; `extra` is YAML appended at top level; golden=None: no golden file written;
    fmt: the training source's format (dpo/kto read preference pairs)."""
    if golden is not None:
        (tmp_path / "golden.jsonl").write_text(golden)
    text = f"name: p\ndata:\n  sources: [{{path: train.jsonl, format: {fmt}}}]\n  golden: {{path: golden.jsonl}}\n" + extra
    (tmp_path / "tunegate.yaml").write_text(text)
    return load_project(tmp_path / "tunegate.yaml")


def names(findings):
    return {f.name for f in findings}


def by_name(findings, name):
    return next(f for f in findings if f.name == name)


# ---------------------------------------------------------------- anti-patterns

def test_defaults_only_warn_about_feedback_capture(tmp_path):
    found = anti_patterns(project(tmp_path), n_train_rows=5000, base_is_instruct=True)
    assert names(found) == {"no_feedback_capture"}
    assert found[0].level == "warning" and found[0].to_json()["name"] == "no_feedback_capture"


def test_small_data_high_rank_many_epochs(tmp_path):
    p = project(tmp_path, "train:\n  lora: {r: 64}\n  trl: {num_train_epochs: 10}\n")
    f = by_name(anti_patterns(p, 500, True), "small_data_high_rank")
    assert f.level == "warning"
    assert "500 training rows" in f.message and "r=64" in f.message and "10 epochs" in f.message
    assert "r: 16" in f.fix and "1-3" in f.fix
    assert "small_data_high_rank" not in names(anti_patterns(p, 1000, True))  # enough rows
    fixed = project(tmp_path, "train:\n  lora: {r: 16}\n  trl: {num_train_epochs: 10}\n")
    assert "small_data_high_rank" not in names(anti_patterns(fixed, 500, True))
    fixed = project(tmp_path, "train:\n  lora: {r: 64}\n  trl: {num_train_epochs: 9}\n")  # many epochs starts at 10
    assert "small_data_high_rank" not in names(anti_patterns(fixed, 500, True))


def test_small_data_epochs_come_from_max_steps_when_set(tmp_path):
    # 125 steps x 8 rows / 100 rows = 10 epochs
    p = project(tmp_path, "train:\n  lora: {r: 128}\n  trl: {max_steps: 125, per_device_train_batch_size: 8}\n")
    f = by_name(anti_patterns(p, 100, True), "small_data_high_rank")
    assert "10 epochs (max_steps 125)" in f.message
    assert "small_data_high_rank" not in names(anti_patterns(p, 400, True))  # 2.5 epochs


def test_full_sft_on_instruct_model_with_base_model_lr(tmp_path):
    p = project(tmp_path, "train:\n  adapter: full\n  trl: {learning_rate: 2e-4}\n")
    f = by_name(anti_patterns(p, 5000, True), "instruct_high_lr")
    assert f.level == "warning" and "train.trl.learning_rate 0.0002" in f.message and "smollm2-135m-instruct" in f.message
    assert "instruct_high_lr" not in names(anti_patterns(p, 5000, False))  # a base model: fine
    fixed = project(tmp_path, "train:\n  adapter: full\n  trl: {learning_rate: 1e-5}\n")
    assert "instruct_high_lr" not in names(anti_patterns(fixed, 5000, True))


def test_adapter_on_instruct_model_with_too_high_lr(tmp_path):
    p = project(tmp_path, "train:\n  adapter: lora\n  trl: {learning_rate: 1e-3}\n")
    f = by_name(anti_patterns(p, 5000, True), "instruct_high_lr")
    assert "lora" in f.message and "0.001" in f.message and "(> 0.0005)" in f.message
    ok = project(tmp_path, "train:\n  adapter: dora\n  trl: {learning_rate: 5e-4}\n")  # the bound itself passes
    assert "instruct_high_lr" not in names(anti_patterns(ok, 5000, True))


def test_findings_name_the_adapter_peft_builds_not_the_default(tmp_path):
    # adapter defaults to dora, but lora.use_dora: false trains plain LoRA (examples/banking77): the warning
    # must not say "dora"
    p = project(tmp_path, "train:\n  lora: {use_dora: false}\n  trl: {learning_rate: 1e-3}\n")
    f = by_name(anti_patterns(p, 5000, True), "instruct_high_lr")
    assert f.message.startswith("lora on the instruct model")
    p = project(tmp_path, "train:\n  adapter: lora\n  lora: {use_dora: true}\n  trl: {learning_rate: 1e-3}\n")
    assert by_name(anti_patterns(p, 5000, True), "instruct_high_lr").message.startswith("dora on")


def test_missing_or_empty_golden_set_is_an_error(tmp_path):
    found = anti_patterns(project(tmp_path, golden=None), 5000, True)
    f = found[0]
    assert f.name == "no_golden_set" and f.level == "error"  # errors first
    assert str(tmp_path / "golden.jsonl") in f.message and "does not exist" in f.message
    f = by_name(anti_patterns(project(tmp_path, golden="\n \n"), 5000, True), "no_golden_set")
    assert "is empty" in f.message
    assert "no_golden_set" not in names(anti_patterns(project(tmp_path), 5000, True))


def test_serve_section_with_feedback_silences_the_warning(tmp_path):
    # feedback capture is checked, not assumed missing: `tunegate serve` takes feedback when serve.feedback is on
    f = by_name(anti_pattern_table(project(tmp_path), 5000, True), "no_feedback_capture")  # no serve section
    assert f.found and "no feedback capture is configured (serve.feedback)" in f.message
    assert "no_feedback_capture" not in names(anti_patterns(project(tmp_path, "serve: {}\n"), 5000, True))  # on by default
    assert "no_feedback_capture" not in names(anti_patterns(project(tmp_path, "serve: {feedback: true}\n"), 5000, True))
    f = by_name(anti_patterns(project(tmp_path, "serve: {feedback: false}\n"), 5000, True), "no_feedback_capture")
    assert f.message.startswith("serve.feedback is false")


def test_a_feedback_data_source_is_feedback_capture(tmp_path):
    p = project(tmp_path)
    cfg = tmp_path / "tunegate.yaml"
    cfg.write_text(cfg.read_text().replace("sources: [{path: train.jsonl, format: chat}]",
                                           "sources: [{path: train.jsonl, format: chat}, {feedback: sft}]"))
    p = load_project(cfg)
    f = by_name(anti_pattern_table(p, 5000, True), "no_feedback_capture")
    assert not f.found and f.message == "data.sources reads served feedback ({feedback: sft})"
    # ... unless the server is told not to take feedback
    cfg.write_text(cfg.read_text() + "serve: {feedback: false}\n")
    assert by_name(anti_pattern_table(load_project(cfg), 5000, True), "no_feedback_capture").found


def test_anti_patterns_name_what_they_found(tmp_path):
    # the rules the audit page added: knowledge that changes (the audit's answers, else audit.answers) and no eval gate
    p = project(tmp_path)
    f = by_name(anti_patterns(p, 5000, True, {"changing_knowledge": "yes"}), "changing_knowledge")
    assert f.level == "warning" and f.message.startswith("changing_knowledge: yes") and "retrieve" in f.fix
    assert "changing_knowledge" not in names(anti_patterns(p, 5000, True, {"changing_knowledge": "no"}))
    answered = project(tmp_path, "audit:\n  answers: {changing_knowledge: 'yes'}\n")
    assert "changing_knowledge" in names(anti_patterns(answered, 5000, True))
    assert by_name(anti_pattern_table(p, 5000, True), "changing_knowledge").message == "changing_knowledge: not answered"

    unbounded = project(tmp_path, "eval:\n  gate: [{metric: exact_match, max: 1.0}]\n")  # a gate that compares nothing
    f = by_name(anti_patterns(unbounded, 5000, True), "no_eval_gate")
    assert f.message == "bounded metrics: none" and "gate_not_on_golden" not in names(anti_patterns(unbounded, 5000, True))
    assert by_name(anti_pattern_table(p, 5000, True), "no_eval_gate").message == "bounded metrics: exact_match"


def test_one_table_holds_each_rule_once(tmp_path):
    p = project(tmp_path, "train:\n  lora: {r: 64}\n  trl: {num_train_epochs: 10}\n")
    table = anti_pattern_table(p, 500, True, cuda=False)
    assert len({f.name for f in table}) == len(table) == 10
    assert all(f.rule and f.message and f.fix and f.level in ("error", "warning") for f in table)
    assert names(anti_patterns(p, 500, True, cuda=False)) == {f.name for f in table if f.found} == {"small_data_high_rank", "no_feedback_capture"}
    assert {"found", "rule"} <= set(table[0].to_json())


def test_gate_only_on_suite_metrics(tmp_path, monkeypatch):
    from tunegate.config import GateRule

    p = project(tmp_path)
    p.eval.gate = [GateRule(metric="ifeval_prompt_strict", max_regression=0.02),
                   GateRule(metric="over_refusal", max_regression=0.05)]
    f = by_name(anti_patterns(p, 5000, True), "gate_not_on_golden")
    assert "only holds suite metrics (ifeval_prompt_strict, over_refusal)" in f.message and "exact_match" in f.message
    assert "{metric: exact_match, min_delta_ci_low: 0.0}" in f.fix
    p.eval.gate = []
    assert "has no rules" in by_name(anti_patterns(p, 5000, True), "gate_not_on_golden").message
    p.eval.gate = [GateRule(metric="exact_match", min_delta_ci_low=0.0), GateRule(metric="over_refusal", max_regression=0.05)]
    assert "gate_not_on_golden" not in names(anti_patterns(p, 5000, True))


def test_grpo_with_one_generation_is_an_error(tmp_path):
    grpo = "train:\n  method: grpo\n  grpo: {verifier: exact_label}\n"
    p = project(tmp_path, grpo + "  trl: {num_generations: 1}\n")
    f = by_name(anti_patterns(p, 5000, True), "grpo_too_few_generations")
    assert f.level == "error" and "num_generations 1" in f.message and "NaN" in f.message
    assert "grpo_too_few_generations" not in names(anti_patterns(project(tmp_path, grpo), 5000, True))  # TRL default 8
    ok = project(tmp_path, grpo + "  trl: {num_generations: 2}\n")
    assert "grpo_too_few_generations" not in names(anti_patterns(ok, 5000, True))


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_optimisation_on_a_base_model_without_sft(tmp_path, method):
    p = project(tmp_path, f"base_model: my-base-7b\ntrain:\n  method: {method}\n", fmt="preference")
    f = by_name(anti_patterns(p, 5000, False), "preference_on_base")
    assert f.level == "warning" and method in f.message and "my-base-7b" in f.message and "no SFT first" in f.message
    assert "preference_on_base" not in names(anti_patterns(p, 5000, True))
    sft_first = project(tmp_path, f"base_model: my-base-7b\ntrain:\n  method: {method}\n  init_adapter: runs/sft/adapter\n",
                        fmt="preference")
    assert "preference_on_base" not in names(anti_patterns(sft_first, 5000, False))


def test_qlora_without_cuda_is_an_error(tmp_path):
    p = project(tmp_path, "train:\n  adapter: qlora\n")
    f = by_name(anti_patterns(p, 5000, True, cuda=False), "qlora_needs_cuda")
    assert f.level == "error" and "bitsandbytes" in f.message and "CUDA" in f.message
    assert "qlora_needs_cuda" not in names(anti_patterns(p, 5000, True, cuda=True))


def test_import_does_not_import_torch():
    code = "import sys, tunegate.preflight; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- target modules (C12 in docs/cases.md)

@pytest.fixture(scope="module")
def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_all_linear_matches_every_projection_but_not_lm_head(tiny_llama):
    r = resolve_target_modules(tiny_llama, "all-linear")
    assert r["matched_suffixes"] == LLAMA_LINEAR
    assert r["available_linear_suffixes"] == LLAMA_LINEAR
    assert len(r["matched"]) == 2 * 7 and "lm_head" not in r["matched"]
    assert r["requested"] == "all-linear"


def test_all_linear_agrees_with_peft(tiny_llama):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    cfg = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"), tiny_llama)
    assert sorted(resolve_target_modules(tiny_llama, "all-linear")["matched"]) == sorted(cfg.target_modules)


def test_names_of_another_architecture_raise_with_the_available_layers(tiny_llama):
    with pytest.raises(TunegateError) as exc:
        resolve_target_modules(tiny_llama, ["c_attn"])
    assert str(exc.value) == ("train.lora.target_modules ['c_attn'] match no module of this model; its linear layers "
                              "are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


def test_a_list_matches_by_suffix(tiny_llama):
    r = resolve_target_modules(tiny_llama, ["q_proj", "v_proj"])
    assert r["matched_suffixes"] == ["q_proj", "v_proj"]
    assert r["matched"] == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    exact = resolve_target_modules(tiny_llama, ["model.layers.1.mlp.down_proj"])
    assert exact["matched"] == ["model.layers.1.mlp.down_proj"]


def test_a_string_is_a_full_match_regex(tiny_llama):
    r = resolve_target_modules(tiny_llama, r".*\.1\.self_attn\.(q|k)_proj")
    assert r["matched"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    with pytest.raises(TunegateError, match="match no module"):
        resolve_target_modules(tiny_llama, "q_proj")  # fullmatch: a bare suffix as a regex matches nothing
    with pytest.raises(TunegateError, match=r"LoRA cannot wrap \(LlamaAttention\)"):
        resolve_target_modules(tiny_llama, r".*self_attn")


# ---------------------------------------------------------------- FLOPs and estimates

def test_train_flops_arithmetic():
    assert train_flops(1_000, 10, 100, full=True) == 6 * 1_000 * 100
    assert train_flops(1_000, 10, 100, full=False) == 4 * 1_000 * 100 + 6 * 10 * 100
    assert train_flops(135_000_000, 4_000_000, 1_000_000, full=False) == 5.64e14


def test_measure_matmul_peak_is_a_positive_rate():
    peak = measure_matmul_peak(seconds=0.05, n=128)
    assert 1e6 < peak < 1e15


PRICES = {"machines": {"cpu": {"usd_per_hour": 0.1},
                       "gpu-x": {"usd_per_hour": 2.0, "gpu_peak_bf16_flops": 100e12}}}


def test_estimate_7b_cost_time_and_memory(tmp_path):
    p = project(tmp_path, "train:\n  adapter: lora\n  trl: {num_train_epochs: 2}\n")
    e = estimate(p, n_params=100_000_000, n_trainable=1_000_000, train_tokens=1_000_000, tokens_per_s=1000.0, prices=PRICES)
    assert e["epochs"] == 2 and e["train_tokens"] == 2_000_000
    assert e["flops"] == 4 * 1e8 * 2e6 + 6 * 1e6 * 2e6
    assert e["seconds_here"] == 2000.0
    s = e["at_7b"]
    assert s["n_trainable"] == pytest.approx(7e7) and s["mfu"] == ASSUMED_MFU == 0.35
    assert list(s["gpus"]) == ["gpu-x"]  # machines without a bf16 peak are not priced
    flops7 = 4 * 7e9 * 2e6 + 6 * 7e7 * 2e6  # 5.684e16
    hours = flops7 / (0.35 * 100e12) / 3600  # 0.45111 h
    assert s["flops"] == pytest.approx(flops7)
    assert s["gpus"]["gpu-x"]["hours"] == pytest.approx(hours)
    assert s["gpus"]["gpu-x"]["usd"] == pytest.approx(0.902222, abs=1e-6)
    m = e["memory"]
    assert m["activations_gib"] is None
    assert m["total_gib"] * 2**30 == pytest.approx(4 * 1e8 + 4 * 1e6 + 8 * 1e6)


def test_estimate_names_the_adapter_peft_builds(tmp_path):
    """`adapter: dora` (the default) with `lora: {use_dora: false}` trains plain LoRA: the estimate says lora."""
    p = project(tmp_path, "train:\n  lora: {use_dora: false}\n")
    assert estimate(p, 1_000, 10, 100, None, PRICES)["adapter"] == "lora"
    assert estimate(project(tmp_path, "train: {}\n"), 1_000, 10, 100, None, PRICES)["adapter"] == "dora"


def test_estimate_full_max_steps_activations_and_dpo_reference(tmp_path):
    p = project(tmp_path, "train:\n  adapter: full\n  trl: {max_steps: 10, per_device_train_batch_size: 8}\n")
    e = estimate(p, 1_000_000, 5, 4_000, None, PRICES, n_train_rows=40,
                 dims={"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000})
    assert e["epochs"] == 2 and e["epochs_from"] == "max_steps" and e["train_tokens"] == 8_000
    assert e["n_trainable"] == 1_000_000 and e["flops"] == 6 * 1e6 * 8_000 and e["seconds_here"] is None
    s, b, h, L, V = 512, 8, 64, 2, 1000  # data.max_length default 512, fp32 activations
    assert e["memory"]["activations_gib"] * 2**30 == L * 34 * s * b * h * 2 + 4 * s * b * V
    assert e["memory"]["total_gib"] * 2**30 == pytest.approx(16 * 1e6 + L * 34 * s * b * h * 2 + 4 * s * b * V)

    dpo = project(tmp_path, "train:\n  method: dpo\n  adapter: lora\n", fmt="preference")
    e = estimate(dpo, 1_000, 10, 100, None, PRICES)
    assert e["flops"] == 4 * 1_000 * 100 + 6 * 10 * 100 + 2 * 1_000 * 100
    assert "reference forward" in e["flops_formula"]


def test_render_puts_errors_first_and_prints_the_estimate(tmp_path):
    p = project(tmp_path, "train:\n  adapter: lora\n")
    findings = [Finding("w1", "warning", "a warning", "do w"), Finding("e1", "error", "an error", "do e")]
    text = render(findings, estimate(p, 100_000_000, 1_000_000, 1_000_000, 500.0, PRICES))
    assert text.startswith("preflight: 1 error(s), 1 warning(s)\n  ERROR [e1] an error\n      fix: do e\n  WARNING [w1]")
    assert "time here: 33.3 min at 500 tokens/s" in text
    assert "gpu-x:" in text and "$0.45" in text
    assert render([], None) == "preflight: 0 error(s), 0 warning(s)\n"


# ---------------------------------------------------------------- refuse before spend (issue 20)


@pytest.fixture(scope="module")
def short_vocab_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose embedding has 16 rows fewer than its tokenizer has tokens (as after adding tokens to the
    tokenizer without resizing the model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer) - 16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("short-vocab")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _on_disk_project(tmp_path, base_model, *overrides):
    (tmp_path / "train.jsonl").write_text(GOLDEN_ROW + "\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(GOLDEN_ROW + "\n")  # the data stage's output, for run_checks
    return load_project(project(tmp_path, f"base_model: {base_model}\n").source_file, list(overrides))


def test_a_tokenizer_larger_than_the_embedding_is_an_error_at_validate_and_preflight(tmp_path, short_vocab_model_dir, tokenizer):
    from tunegate.pipeline import validate_project
    from tunegate.preflight import run_checks

    p = _on_disk_project(tmp_path, short_vocab_model_dir)
    n = len(tokenizer)
    problems = validate_project(p)
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert f"the tokenizer has {n} tokens but the model's embedding has {n - 16} rows" in problems[0]
    check = run_checks(p, tmp_path / "data", measure=False)
    found = by_name([Finding(**f) for f in check["findings"]], "vocab_mismatch")
    assert found.level == "error" and f"{n} tokens" in found.message and f"{n - 16} rows" in found.message
    assert check["errors"] >= 1


def test_a_matching_vocabulary_passes(tmp_path, tiny_model_dir):
    from tunegate.pipeline import validate_project

    assert validate_project(_on_disk_project(tmp_path, tiny_model_dir)) == []


def test_validate_and_the_preflight_refuse_packing(tmp_path, tiny_model_dir):
    from tunegate.pipeline import validate_project
    from tunegate.preflight import run_checks

    p = _on_disk_project(tmp_path, tiny_model_dir, "train.trl.packing=true", "train.trl.max_length=2048")
    problems = validate_project(p)
    assert len(problems) == 1 and problems[0].startswith("train.trl.packing: True is not supported by tunegate"), problems
    check = run_checks(p, tmp_path / "data", measure=False)
    found = by_name([Finding(**f) for f in check["findings"]], "passthrough_unsupported")
    assert found.level == "error" and found.message == problems[0]
    assert check["findings"][0]["level"] == "error"
