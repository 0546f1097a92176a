"""Release documents (report/release_docs.py) from a hand-built run folder: no model, no data files.

The artifacts mirror the shapes the stages write (copied from a real banking77 run: stats.json,
train_summary.json, adapter_config.json, metrics.jsonl, scores.json, verdict.json, audit.json), with
made-up values chosen so the expected numbers can be computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.core.manifest import Manifest, sha256_file, write_manifest
from tunegate.report.release_docs import (
    BLANK,
    compute_assessment,
    render_release_docs,
    write_release_docs,
)

REPO = Path(__file__).resolve().parents[2]
N_BASE = 134_515_008  # SmolLM2-135M as loaded (tied embeddings)
N_A = 4_884_480  # LoRA r16 on all linear layers
TOKENS = 220_573
MARK = BLANK.split("{")[0]  # "[TO BE ANSWERED BY A PERSON: "


def _ci(mean, lo, hi):
    return {"mean": mean, "ci_low": lo, "ci_high": hi}


def _project(tmp_path: Path, base_model: str = "smollm2-135m-instruct", pii: bool = True):
    cfg = {
        "name": "tickets",
        "base_model": base_model,
        "data": {
            "sources": [{"path": "data/train.csv", "format": "csv", "prompt_column": "text", "completion_column": "label",
                         "instruction": "Ticket label?", "license": "CC-BY-4.0 (Example corpus)"}],
            "golden": {"path": "data/test.csv", "format": "csv", "prompt_column": "text", "completion_column": "label"},
            "max_length": 128,
            **({"pii": {"mode": "mask"}} if pii else {}),
        },
        "train": {"method": "sft", "adapter": "lora", "lora": {"r": 16, "lora_alpha": 32, "use_dora": False}},
        "eval": {"metrics": ["exact_match", "macro_f1"], "max_new_tokens": 16,
                 "gate": [{"metric": "exact_match", "min": 0.8, "min_delta_ci_low": 0.0}]},
    }
    (tmp_path / "tunegate.yaml").write_text(yaml.safe_dump(cfg))
    return load_project(tmp_path / "tunegate.yaml")


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _run(tmp_path: Path, project, *, tokens_seen=TOKENS, audit_verdict="TRAIN", summary_extra=None) -> Path:
    run = project.runs_dir / "r1"
    src = str(project.data.sources[0].path)
    _write(run / "data" / "stats.json", {
        "duplicates_removed": {"exact": 2, "near": 1}, "golden_overlap_removed": 3, "golden_ngram_overlap_removed": 1,
        "golden_rows": 200, "golden_sha256": "ab" * 32, "licenses": ["CC-BY-4.0 (Example corpus)"],
        "per_source": {src: {"kept": 960, "rejected": 40, "rejected_structure": 0, "rows_read": 1000, "train": 940, "val": 20}},
        "rejected_by_rule": {"golden_overlap": 2, "golden_ngram_overlap": 1, "pii_rescan": 1, "too_long": 36},
        "rows_kept": 960, "rows_read": 1000, "rows_rejected": 40, "template_has_system_role": True,
        "tokens_per_row_max": 125, "tokens_per_row_mean": 41.3, "tokens_total": 39648, "train_rows": 940, "truncated_rows": 0,
        "val_rows": 20,
        "steps": [
            {"step": "read and validate structure", "rows_in": 1000, "rows_out": 1000, "removed_by_rule": {}},
            {"step": "PII (mask)", "rows_in": 1000, "rows_out": 999, "removed_by_rule": {"pii_rescan": 1}},
            {"step": "chat template, loss mask, max_length 128 (drop)", "rows_in": 999, "rows_out": 963, "removed_by_rule": {"too_long": 36}},
            {"step": "golden-set overlap", "rows_in": 963, "rows_out": 961, "removed_by_rule": {"golden_overlap": 2}},
            {"step": "golden-set n-gram overlap (13-word)", "rows_in": 961, "rows_out": 960, "removed_by_rule": {"golden_ngram_overlap": 1}},
        ],
        "pii": {"mode": "mask", "entities": ["EMAIL_ADDRESS", "PERSON", "PHONE_NUMBER"], "regions": ["US", "GB"],
                "score_threshold": 0.35, "rescan_score_threshold": None, "phone_match": "possible",
                "rows_scanned": 1000, "rows_with_pii": 9, "rows_dropped_pii": 0, "rows_dropped_rescan": 1,
                "found_by_type": {"EMAIL_ADDRESS": 7, "PERSON": 3}, "rescan_by_type": {"PERSON": 1},
                "texts": 2000, "texts_distinct": 1990, "golden_rows_with_pii": 2},
    })
    summary = {
        "epochs_seen": 0.538, "final_eval_loss": 0.105, "final_train_loss": 0.069,
        "lora": {"lora_alpha": 32, "lora_dropout": 0.0, "r": 16, "target_modules": "all-linear", "use_dora": False},
        "max_steps": 330, "precision": "bf16", "resumed_from_step": 0, "steps": 330, "stopped_by_budget": False,
        "supervised_tokens_per_epoch": 73019, "tokens_seen": tokens_seen, "total_params": N_BASE + N_A, "train_rows": 940,
        "train_tokens_per_epoch": 405120, "train_tokens_per_s": 244.5, "train_wall_s": 902.1, "trainable_params": N_A,
        "trl": {"learning_rate": 0.001, "lr_scheduler_type": "cosine", "max_steps": 330, "per_device_train_batch_size": 16,
                "seed": 0, "use_cpu": True, "warmup_steps": 15},
        "val_rows": 20, **(summary_extra or {}),
    }
    _write(run / "train" / "train_summary.json", summary)
    _write(run / "train" / "adapter" / "adapter_config.json", {
        "base_model_name_or_path": "/cache/smollm2-135m-instruct", "lora_alpha": 32, "lora_dropout": 0.0, "r": 16,
        "peft_type": "LORA", "peft_version": "0.21.2", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "use_dora": False, "use_rslora": False, "modules_to_save": None, "task_type": "CAUSAL_LM"})
    (run / "train" / "metrics.jsonl").write_text(json.dumps(
        {"train_runtime": 901.3, "total_flos": 150347301285888.0, "train_loss": 0.44, "epoch": 0.538, "step": 330}) + "\n")
    scores = {
        "baseline": "base model", "bootstrap_samples": 10000, "confidence": 0.95, "headline": "exact_match", "n": 200,
        "candidate_stopped_before_max_new_tokens": 0.99,
        "metrics": {
            "exact_match": {"baseline": _ci(0.1, 0.06, 0.14), "candidate": _ci(0.812, 0.757, 0.863), "delta": _ci(0.712, 0.65, 0.77)},
            "macro_f1": {"baseline": _ci(0.05, 0.02, 0.08), "candidate": _ci(0.7644991505994417, 0.72, 0.80), "delta": _ci(0.71, 0.66, 0.76)},
        },
    }
    _write(run / "eval" / "scores.json", scores)
    _write(run / "eval" / "verdict.json", {"verdict": "PASS", "rules": [
        {"ci": [0.757, 0.863], "description": "exact_match: candidate >= 0.8", "metric": "exact_match", "passed": True,
         "rule": "min", "threshold": 0.8, "value": 0.812}]})
    _write(run / "audit" / "audit.json", {
        "bar": 0.8, "golden_rows": 200, "metric": "exact_match", "task": "classification", "labels": 12,
        "anti_patterns": [],
        "candidates": [
            {"name": "zero_shot", "method": "prompt_optimization", "trains": False, "mean": 0.1, "ci_low": 0.06, "ci_high": 0.14,
             "detail": "the base model with the project's own prompt", "usd_per_1k_requests": 0.002},
            {"name": "knn_classifier", "method": "prompt_optimization", "trains": False, "mean": 0.91 if audit_verdict == "NO_TRAIN" else 0.5,
             "ci_low": 0.87, "ci_high": 0.95, "detail": "MiniLM kNN", "usd_per_1k_requests": 0.0001},
        ],
        "recommendation": {"verdict": audit_verdict, "best_no_training": {"name": "knn_classifier", "mean": 0.91},
                           "decision": {"method": "lora", "why": "the audit's reason", "rejected": []}},
    })
    return run


def _flops_by_hand(n_base=N_BASE, n_a=N_A, tokens=TOKENS):
    return 4 * n_base * tokens + 6 * n_a * tokens  # LoRA: frozen base forward+activation grads, adapter 6·N_a·D


def test_compute_135m_base_known_tokens(tmp_path):
    project = _project(tmp_path)
    docs = render_release_docs(_run(tmp_path, project), project)
    flops = _flops_by_hand()
    assert flops == pytest.approx(1.2515e14, rel=1e-3)
    base = 6 * 135e6 * 2e12  # SmolLM2-135M: 135M params x 2T tokens
    assert base == pytest.approx(1.62e21)
    summary = json.loads((project.runs_dir / "r1" / "train" / "train_summary.json").read_text())
    c = compute_assessment(summary, "smollm2-135m-instruct", "sft", "lora")
    assert c["n_params"] == N_BASE and c["n_trainable"] == N_A and c["tokens"] == TOKENS
    assert c["flops"] == pytest.approx(flops)
    assert c["threshold"] == pytest.approx(base / 3)
    assert c["ratio_to_base"] == pytest.approx(flops / base)
    assert c["ratio_to_threshold"] == pytest.approx(3 * flops / base)  # 2.32e-7
    assert c["exceeds"] is False and c["base_below_gpai"] is True
    a25 = docs["article25.md"]
    for text in ("1.25 × 10¹⁴", "1.62 × 10²¹", "5.40 × 10²⁰", "7.73 × 10⁻⁸", "2.32 × 10⁻⁷", "134,515,008", "4,884,480", "220,573",
                 "4·N·D + 6·N_a·D", "does NOT make you the provider", "NOT LEGAL ADVICE",
                 "https://huggingface.co/HuggingFaceTB/SmolLM2-135M", "arXiv:2502.02737",
                 "guidelines-scope-obligations-providers-general-purpose-ai-models-under-ai-act"):
        assert text in a25, text
    assert "1.50 × 10¹⁴" in a25  # transformers' total_flos, shown as a cross-check


def test_conclusion_flips_above_one_third(tmp_path):
    project = _project(tmp_path)
    # Full fine-tune on 1e12 tokens: 6 x 134.5M x 1e12 = 8.07e20 > 5.4e20 (one third of 6 x 135M x 2T)
    big = 1_000_000_000_000
    summary = {"total_params": N_BASE, "trainable_params": N_BASE, "tokens_seen": big}
    c = compute_assessment(summary, "HuggingFaceTB/SmolLM2-135M", "sft", "full")
    assert c["flops"] == pytest.approx(6 * N_BASE * big)
    assert c["exceeds"] is True and c["ratio_to_base"] > 1 / 3
    # just below one third stays below
    small = int(0.99 * (6 * 135e6 * 2e12 / 3) / (6 * N_BASE))
    assert compute_assessment({**summary, "tokens_seen": small}, "HuggingFaceTB/SmolLM2-135M", "sft", "full")["exceeds"] is False
    # and the rendered conclusion follows: an adapter run whose token count puts it above the threshold
    project_docs = render_release_docs(_run(tmp_path, project, tokens_seen=2 * 10**12), project)["article25.md"]
    assert "DOES meet the indicative criterion" in project_docs
    assert "does NOT make you" not in project_docs
    assert "Article 53" in project_docs


def test_unknown_base_model_uses_default_threshold(tmp_path):
    project = _project(tmp_path, base_model="my-org/custom-model-7b")
    docs = render_release_docs(_run(tmp_path, project), project)
    summary = {"total_params": N_BASE + N_A, "trainable_params": N_A, "tokens_seen": TOKENS}
    c = compute_assessment(summary, "my-org/custom-model-7b", "sft", "lora")
    assert c["base"]["known"] is False and c["ratio_to_base"] is None
    assert c["threshold"] == pytest.approx(1e23 / 3)
    assert c["ratio_to_threshold"] == pytest.approx(_flops_by_hand() / (1e23 / 3))
    a25 = docs["article25.md"]
    assert "3.33 × 10²²" in a25 and "fallback" in a25
    assert MARK + "its parameters, training tokens" in a25  # the published compute is a blank for a person
    assert "base_model: my-org/custom-model-7b" in docs["MODEL_CARD.md"]


def test_tokens_derived_when_not_recorded():
    summary = {"total_params": N_BASE + N_A, "trainable_params": N_A, "train_tokens_per_epoch": 405120, "epochs_seen": 0.5}
    c = compute_assessment(summary, "smollm2-135m-instruct", "dpo", "lora")
    assert c["tokens"] == pytest.approx(202560)
    assert c["tokens_source"].startswith("derived")
    # DPO adds the frozen reference model's forward pass
    assert c["flops"] == pytest.approx(_flops_by_hand(tokens=202560) + 2 * N_BASE * 202560)
    assert "reference" in c["formula"]
    # a DPO pair is two sequences: the source says so, as the recipe counts both
    assert "prompt + rejected" in compute_assessment({**summary, "method": "dpo"}, "smollm2-135m-instruct", "dpo", "lora")["tokens_source"]


def test_kto_counts_its_kl_estimate():
    """KTO forwards each prompt with a mismatched completion through the policy and the reference (no gradients):
    4·N·D_KL on top of training and the reference pass, D_KL = kl_tokens_per_epoch x epochs."""
    summary = {"method": "kto", "total_params": N_BASE + N_A, "trainable_params": N_A, "train_tokens_per_epoch": 1000,
               "kl_tokens_per_epoch": 900, "epochs_seen": 2.0}
    c = compute_assessment(summary, "smollm2-135m-instruct", "kto", "lora")
    assert c["tokens"] == 2000
    assert c["flops"] == pytest.approx(_flops_by_hand(tokens=2000) + 2 * N_BASE * 2000 + 4 * N_BASE * 1800)
    assert "D_KL = 1,800" in c["formula"]
    # without the KL term (TRL's apo_zero_unpaired loss) there is nothing to add
    no_kl = compute_assessment({**summary, "kl_tokens_per_epoch": None}, "smollm2-135m-instruct", "kto", "lora")
    assert no_kl["flops"] == pytest.approx(_flops_by_hand(tokens=2000) + 2 * N_BASE * 2000)


def test_the_golden_sets_licence_is_stated_where_it_is_given(tmp_path):
    # banking77's DPIA asked a person for the licence of test.csv, a file of the same licensed dataset
    _project(tmp_path)  # writes tunegate.yaml
    project = load_project(tmp_path / "tunegate.yaml", ["data.golden.license=CC-BY-4.0 (Example corpus, test split)"])
    docs = render_release_docs(_run(tmp_path, project), project)
    assert "never trained on; licence: CC-BY-4.0 (Example corpus, test split)." in docs["MODEL_CARD.md"]
    assert "(golden set, evaluation only) | CC-BY-4.0 (Example corpus, test split) | 200 | 0 |" in docs["dpia.md"]


def test_pii_table_and_blanks(tmp_path):
    project = _project(tmp_path)
    docs = render_release_docs(_run(tmp_path, project), project)
    for name in ("dpia.md", "MODEL_CARD.md"):
        assert "| EMAIL_ADDRESS | 7 | 0 |" in docs[name], name
        assert "| PERSON | 3 | 1 |" in docs[name], name
        assert "| PHONE_NUMBER | 0 | 0 |" in docs[name], name
    dpia = docs["dpia.md"]
    assert "9 of 1,000 rows" in dpia and "2 of 200 golden rows hold PII" in dpia
    assert "NOT LEGAL ADVICE" in dpia
    for blank in ("name and contact of the controller", "DPO name", "basis, and for reuse", "sought? how",
                  "retention", "the business purpose"):
        assert MARK + blank in dpia, blank
    for section in ("35(7)(a)", "35(7)(b)", "35(7)(c)", "35(7)(d)"):
        assert section in dpia
    a25 = docs["article25.md"]
    for art in ("25(1)(a)", "25(1)(b)", "25(1)(c)", "Annex III"):
        assert art in a25
    assert a25.count(MARK) >= 5
    card = docs["MODEL_CARD.md"]
    assert MARK + "who uses this model" in card
    assert "never trained on; licence: " + MARK + "licence of the golden set" in card  # no data.golden.license given
    assert "| golden-set n-gram overlap (13-word) | 961 | 960 | golden_ngram_overlap 1 |" in card
    assert "2 exact, 1 near" not in card  # dedup was not configured: counts are not claimed
    assert "not checked (`data.dedup` not set)" in card


def test_model_card_front_matter(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project)
    card = render_release_docs(run, project)["MODEL_CARD.md"]
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert "lora" in meta["tags"]
    scores = json.loads((run / "eval" / "scores.json").read_text())
    (result,) = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {k: v["candidate"]["mean"] for k, v in scores["metrics"].items()}
    assert result["dataset"]["revision"] == "ab" * 32
    # sections, and what was not measured is said
    for heading in ("## Model details", "## Intended use", "## Out-of-scope use", "## Training data", "## Training procedure",
                    "## Evaluation", "## Safety", "## Limitations", "## How to load it"):
        assert heading in card
    assert "0.812 [0.757, 0.863]" in card
    assert "Not measured: this run configured no safety" in card
    assert "PeftModel.from_pretrained" in card and '"Ticket label?"' in card
    assert "width 0.106" in card  # the golden CI width, as a limitation


def test_safety_suites_reported_when_run(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project)
    scores = json.loads((run / "eval" / "scores.json").read_text())
    scores["metrics"]["harmful_refusal"] = {"baseline": _ci(0.9, 0.85, 0.95), "candidate": _ci(0.7, 0.62, 0.78), "delta": _ci(-0.2, -0.28, -0.12)}
    _write(run / "eval" / "scores.json", scores)
    _write(run / "eval" / "suites.json", {"safety": {"n_prompts": 100, "sources": ["harmbench", "xstest"], "max_new_tokens": 64}})
    docs = render_release_docs(run, project)
    card = docs["MODEL_CARD.md"]
    assert "| harmful_refusal | 0.900 [0.850, 0.950] | 0.700 [0.620, 0.780] | -0.200 [-0.280, -0.120] |" in card
    assert "HarmBench, XSTest" in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert any(m["type"] == "harmful_refusal" and m["value"] == 0.7 for r in meta["model-index"][0]["results"] for m in r["metrics"])



def test_lm_eval_benchmarks_have_their_own_table_not_the_golden_sets_or_safetys(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project)
    scores = json.loads((run / "eval" / "scores.json").read_text())
    scores["metrics"]["lm_eval.local_arith.acc"] = {"baseline": _ci(0.5, 0.3, 0.7), "candidate": _ci(0.6, 0.4, 0.8), "delta": _ci(0.1, 0.0, 0.2)}
    _write(run / "eval" / "scores.json", scores)
    _write(run / "eval" / "suites.json", {"lm_eval": {"tasks": ["local_arith"], "num_fewshot": 0, "limit": None, "lm_eval_version": "0.4.13"}})
    card = render_release_docs(run, project)["MODEL_CARD.md"]
    evaluation, safety = card.split("## Evaluation")[1].split("## Safety")
    golden_table, rest = evaluation.split("Standard benchmarks through lm-evaluation-harness (tasks local_arith, 0-shot, lm-eval 0.4.13)")
    assert "lm_eval" not in golden_table
    assert "| lm_eval.local_arith.acc | 0.500 [0.300, 0.700] | 0.600 [0.400, 0.800] | +0.100 [+0.000, +0.200] |" in rest
    assert "lm_eval" not in safety.split("## Limitations")[0] and "were not scored" in safety

def test_audit_no_train_and_stale_lineage(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project, audit_verdict="NO_TRAIN")
    data_m = Manifest(stage="data", fingerprint="x", config={}, started_at="2026-01-01T10:00:00+00:00")
    write_manifest(run / "data", data_m)
    write_manifest(run / "train", Manifest(stage="train", fingerprint="y", config={}, upstream={"data": "0" * 64},
                                           started_at="2026-01-01T11:00:00+00:00"))
    write_manifest(run / "audit", Manifest(stage="audit", fingerprint="z", config={}, upstream={"data": sha256_file(run / "data" / "manifest.json")},
                                           started_at="2026-01-01T12:00:00+00:00", verdict="NO_TRAIN"))
    docs = render_release_docs(run, project)
    dpia = docs["dpia.md"]
    assert "Audit verdict: NO_TRAIN" in dpia
    assert MARK + "why fine-tuning is necessary although the audit" in dpia
    assert "the data stage was re-run" in dpia and "ran after training" in dpia
    assert "knn_classifier, scored 0.910" in docs["MODEL_CARD.md"]  # a better option without training is a limitation


def test_anti_patterns_the_preflight_found_are_limitations(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project)
    assert "anti-pattern" not in render_release_docs(run, project)["MODEL_CARD.md"]  # no train/preflight.json: nothing listed
    _write(run / "train" / "preflight.json", {"findings": [
        {"name": "no_feedback_capture", "level": "warning", "message": "no feedback capture is configured (serve.feedback)",
         "fix": "add `serve: {feedback: true}`", "found": True, "rule": "no feedback capture"}]})
    card = render_release_docs(run, project)["MODEL_CARD.md"]
    assert "found the anti-pattern no_feedback_capture (warning): no feedback capture is configured" in card


def test_missing_eval_names_the_file(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project)
    (run / "eval" / "scores.json").unlink()
    with pytest.raises(TunegateError, match=r"eval/scores.json: not found"):
        render_release_docs(run, project)


def test_write_and_cli(tmp_path):
    from typer.testing import CliRunner

    from tunegate.cli import app

    project = _project(tmp_path, pii=False)
    run = _run(tmp_path, project)
    paths = write_release_docs(run, project)
    assert [p.name for p in paths] == ["MODEL_CARD.md", "article25.md", "dpia.md"]
    assert all(p.parent == run / "docs" and p.stat().st_size > 0 for p in paths)
    out = tmp_path / "bundle_docs"
    res = CliRunner().invoke(app, ["docs", str(tmp_path / "tunegate.yaml"), "--run-id", "r1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "article25.md", "dpia.md"]
    # the data stage of this run recorded PII findings, whatever the project file says now: the run's files win
    assert "| EMAIL_ADDRESS | 7 | 0 |" in (out / "dpia.md").read_text()


BANKING77 = REPO / "examples" / "banking77"


@pytest.mark.skipif(not (BANKING77 / "runs" / "default" / "eval" / "scores.json").is_file(),
                    reason="examples/banking77/runs/default is not here (git-ignored; made by `tunegate run examples/banking77`)")
def test_real_banking77_run():
    project = load_project(BANKING77 / "tunegate.yaml")
    run = project.runs_dir / "default"
    docs = render_release_docs(run, project)
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    n = summary["total_params"] - summary["trainable_params"]
    flops = 4 * n * summary["tokens_seen"] + 6 * summary["trainable_params"] * summary["tokens_seen"]
    c = compute_assessment(summary, project.base_model, "sft", "lora")
    assert c["flops"] == pytest.approx(flops) and c["exceeds"] is False
    assert "does NOT make you the provider" in docs["article25.md"]
    scores = json.loads((run / "eval" / "scores.json").read_text())
    meta = yaml.safe_load(docs["MODEL_CARD.md"].split("---\n")[1])
    got = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert got == {k: v["candidate"]["mean"] for k, v in scores["metrics"].items()}
    assert "CC-BY-4.0" in docs["dpia.md"]


@pytest.mark.parametrize("knn, expected", [
    ((0.62, 0.55, 0.70), "the upper end of every such option's 95% CI is below\n0.800"),
    ((0.76, 0.70, 0.82), "but the 95% CI of knn_classifier (0.760 [0.700, 0.820]) reaches it"),
    ((0.83, 0.78, 0.88), "An option without fine-tuning met the bar on its point estimate (knn_classifier 0.830 [0.780, 0.880])"),
])
def test_dpia_necessity_wording_follows_the_audits_cis(tmp_path, knn, expected):
    project = _project(tmp_path)
    run = _run(tmp_path, project, audit_verdict="TRAIN")
    audit = json.loads((run / "audit" / "audit.json").read_text())
    audit["candidates"][1].update(mean=knn[0], ci_low=knn[1], ci_high=knn[2])
    _write(run / "audit" / "audit.json", audit)
    dpia = render_release_docs(run, project)["dpia.md"]
    assert expected in dpia
    said_none = "The audit measured that no option without training met the bar" in dpia
    assert said_none == (knn[2] < 0.8)  # "none met the bar" only when no CI reaches it


def test_documents_name_project_files_relative_to_the_project(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project)
    (run / "data" / "train.jsonl").write_text("")
    docs = render_release_docs(run, project)
    for name, text in docs.items():
        assert str(tmp_path) not in text, name  # an absolute path of this machine would mean nothing to a reviewer
    assert "| data/train.csv |" in docs["dpia.md"] and "runs/r1/data/train.jsonl" in docs["dpia.md"]


def test_the_card_points_at_the_bundles_merged_model_instead_of_advising_a_merge(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project)
    cfg = json.loads((run / "train" / "adapter" / "adapter_config.json").read_text())
    _write(run / "train" / "adapter" / "adapter_config.json", {**cfg, "use_dora": True})
    assert "merge it into the base model first with `tunegate export`" in render_release_docs(run, project)["MODEL_CARD.md"]
    card = render_release_docs(run, project, merged="merged/")["MODEL_CARD.md"]
    assert "tunegate export" not in card and "serve the merged model in this bundle's `merged/` folder" in card


def test_dpia_says_nothing_was_measured_without_a_bar_or_a_cheaper_option(tmp_path):
    project = _project(tmp_path)
    run = _run(tmp_path, project, audit_verdict="TRAIN")
    audit = json.loads((run / "audit" / "audit.json").read_text())
    _write(run / "audit" / "audit.json", {**audit, "bar": None})
    dpia = render_release_docs(run, project)["dpia.md"]
    assert "no bar was set" in dpia and "met the bar" not in dpia
    _write(run / "audit" / "audit.json", {**audit, "candidates": [{**c, "trains": True} for c in audit["candidates"]]})
    dpia = render_release_docs(run, project)["dpia.md"]
    assert "every candidate trains" in dpia and "no option without training met the bar" not in dpia
