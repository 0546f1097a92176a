"""Release documents drafted from a finished run: MODEL_CARD.md, article25.md and dpia.md.

`render_release_docs(run_dir, project)` reads only the run's artifacts (data/stats.json, audit/audit.json,
train/train_summary.json, train/metrics.jsonl, train/preflight.json, train/adapter/adapter_config.json,
eval/scores.json, eval/verdict.json, eval/suites.json, every stage's manifest.json) and returns the three
documents as text; `tunegate release` writes them into the signed bundle, `tunegate docs` into a folder. A
figure the artifacts do not hold is written as "not measured"; what only a person can answer is a marked
blank (`BLANK`).

* MODEL_CARD.md: the Hugging Face model card format (YAML front matter with `model-index`, then sections).
* article25.md: the EU AI Act provider questions for a modifier. Compute of this fine-tune (6·N·D for full
  fine-tuning, 4·N·D + 6·N_a·D for an adapter: `tunegate.preflight.train_flops`) against one third of the
  base model's training compute (6 × parameters × pre-training tokens, `KNOWN_BASE_MODELS`), or, when that
  is unknown, one third of 10^23 FLOP: the indicative criterion of the Commission's GPAI guidelines
  (`GPAI_GUIDELINES`). Then Article 25(1)(a)-(c) as questions for a person.
* dpia.md: a GDPR Article 35 DPIA draft, one section per Article 35(7)(a)-(d).

None of the three is legal advice; each says so at the top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.catalog import LM_EVAL_PREFIX
from tunegate.core.io import atomic_write_text, read_jsonl
from tunegate.core.manifest import MANIFEST, read_manifest, sha256_file, verify_outputs
from tunegate.core.paths import project_relative
from tunegate.evals.abstain import ABSTAIN_FILE

BLANK = "[TO BE ANSWERED BY A PERSON: {}]"
NOT_MEASURED = "not measured"
DOC_NAMES = ("MODEL_CARD.md", "article25.md", "dpia.md")

# Regulation (EU) 2024/1689 (AI Act) and the Commission's guidelines on GPAI models.
GPAI_INDICATIVE_FLOP = 1e23  # guidelines: a model trained with > 10^23 FLOP that generates language is indicatively GPAI
SYSTEMIC_RISK_FLOP = 1e25  # AI Act Art. 51(2): high-impact capabilities presumed above 10^25 FLOP
MODIFICATION_FRACTION = 1 / 3  # guidelines: modification compute > one third of the original model's training compute
GPAI_GUIDELINES = (
    "European Commission, Guidelines on the scope of the obligations for providers of general-purpose AI models "
    "under the AI Act (Regulation (EU) 2024/1689), published 18 July 2025, section on downstream modifiers: "
    "https://digital-strategy.ec.europa.eu/en/library/guidelines-scope-obligations-providers-general-purpose-ai-models-under-ai-act"
)
AI_ACT = "Regulation (EU) 2024/1689 (AI Act), Articles 3(3), 3(63), 25, 51(2), Annex III and recital 109: https://eur-lex.europa.eu/eli/reg/2024/1689/oj"
GDPR = "Regulation (EU) 2016/679 (GDPR), Articles 5, 6, 9, 35 and 36: https://eur-lex.europa.eu/eli/reg/2016/679/oj"
FLOPS_PAPER = "Kaplan et al. 2020, Scaling Laws for Neural Language Models (arXiv:2001.08361): training compute C ≈ 6·N·D"

# Pre-training compute of base models whose parameter count and token count are published. Base compute is
# estimated as 6 x params x pre-training tokens. An -Instruct variant maps to its pre-trained model: its
# SFT/DPO tokens are not published, so its base compute is a lower bound and the ratio below an upper bound.
_SMOLLM2_PAPER = "Allal et al. 2025, SmolLM2: When Smol Goes Big (arXiv:2502.02737)"
KNOWN_BASE_MODELS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M": {
        "params": 135e6, "train_tokens": 2e12,
        "source": f"model card https://huggingface.co/HuggingFaceTB/SmolLM2-135M (\"trained on 2 trillion tokens\"); {_SMOLLM2_PAPER}",
    },
    "HuggingFaceTB/SmolLM2-360M": {
        "params": 360e6, "train_tokens": 4e12,
        "source": f"model card https://huggingface.co/HuggingFaceTB/SmolLM2-360M (\"trained on 4 trillion tokens\"); {_SMOLLM2_PAPER}",
    },
    "HuggingFaceTB/SmolLM2-1.7B": {
        "params": 1.7e9, "train_tokens": 11e12,
        "source": f"model card https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B (\"trained on 11 trillion tokens\"); {_SMOLLM2_PAPER}",
    },
}

_SUITE_PREFIXES = ("ifeval_", "harmful_refusal", "over_refusal")
_SUITE_NAMES = {"harmbench": "HarmBench", "jbb": "JailbreakBench (JBB-Behaviors)", "xstest": "XSTest"}


# ---------------------------------------------------------------------------------------------------------
# Reading the run


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _require(path: Path, what: str) -> Any:
    obj = _json(path)
    if obj is None:
        raise TunegateError(f"{path}: not found; {what}")
    return obj


def base_model_facts(name: str) -> dict[str, Any]:
    """The Hugging Face id, licence and (when published) pre-training size of a base model name.

    name: `Project.base_model` (an embedded name, a Hugging Face id or a local folder). Returns {"name",
    "hf_id" (None when unknown), "license" (None when unknown), "known" (bool), "params", "train_tokens",
    "compute_flops" (6 x params x tokens), "source", "family_id" (the KNOWN_BASE_MODELS key used)}.
    """
    from tunegate.models import EMBEDDED

    emb = EMBEDDED.get(name)
    hf_id = emb["hf_id"] if emb else (name if "/" in name and not name.startswith((".", "/", "~")) else None)
    out: dict[str, Any] = {"name": name, "hf_id": hf_id, "license": emb.get("license") if emb else None, "known": False,
                           "params": None, "train_tokens": None, "compute_flops": None, "source": None, "family_id": None,
                           "instruct_variant": False}
    candidates = [hf_id or "", Path(name).name]
    by_lower = {k.lower(): k for k in KNOWN_BASE_MODELS}
    by_tail = {k.split("/")[-1].lower(): k for k in KNOWN_BASE_MODELS}
    for c in candidates:
        c = c.lower()
        for suffix in ("-instruct", ""):
            stem = c[: -len(suffix)] if suffix and c.endswith(suffix) else c
            key = by_lower.get(stem) or by_tail.get(stem.split("/")[-1])
            if key:
                facts = KNOWN_BASE_MODELS[key]
                out.update(known=True, family_id=key, params=facts["params"], train_tokens=facts["train_tokens"],
                           compute_flops=6.0 * facts["params"] * facts["train_tokens"], source=facts["source"],
                           instruct_variant=stem != c)
                return out
    return out


def _tokens_trained(summary: dict[str, Any], metrics: list[dict[str, Any]], stats: dict[str, Any] | None) -> tuple[float | None, str]:
    """D: tokens the fine-tune trained on, and where the number comes from."""
    if summary.get("tokens_seen"):
        return float(summary["tokens_seen"]), ("train/train_summary.json `tokens_seen`: non-padding input tokens counted by the "
                                               "trainer over all steps (transformers `num_input_tokens_seen`)")
    seen = [r["num_input_tokens_seen"] for r in metrics if r.get("num_input_tokens_seen")]
    if seen:
        return float(max(seen)), "train/metrics.jsonl `num_input_tokens_seen` (the trainer's count of input tokens)"
    epochs = summary.get("epochs_seen")
    if summary.get("train_tokens_per_epoch") and epochs:
        seqs = ("; a preference pair counts twice, prompt + chosen and prompt + rejected"
                if summary.get("method") in ("dpo", "orpo") else "")
        how = (f"derived: tokens per epoch of the training split ({summary['train_tokens_per_epoch']:,}, after the chat "
               f"template{seqs}) x epochs seen ({epochs}); the trainer did not count tokens")
        return float(summary["train_tokens_per_epoch"]) * epochs, how
    if stats and stats.get("tokens_total") and stats.get("rows_kept") and epochs:
        train_share = stats.get("train_rows", stats["rows_kept"]) / stats["rows_kept"]
        how = (f"derived: data/stats.json tokens_total ({stats['tokens_total']:,}) x train share ({train_share:.3f}) "
               f"x epochs seen ({epochs}); the trainer did not count tokens")
        return float(stats["tokens_total"]) * train_share * epochs, how
    return None, "not recorded: train_summary.json has no tokens_seen, tokens per epoch or epochs"


def compute_assessment(summary: dict[str, Any], base_model: str, method: str, adapter: str,
                       metrics: list[dict[str, Any]] | None = None, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training compute of this fine-tune against the GPAI modification threshold.

    summary: train/train_summary.json (total_params, trainable_params, tokens_seen, ...). base_model:
    `Project.base_model`. method/adapter: `train.method`, `train.adapter`. metrics: train/metrics.jsonl rows.

    N = base parameters (total_params - trainable_params for an adapter; all parameters for `full`), N_a =
    trainable parameters, D = tokens trained (`_tokens_trained`). FLOPs = `preflight.train_flops` (6·N·D full,
    4·N·D + 6·N_a·D adapter), plus 2·N·D for the frozen reference forward of DPO/KTO and 4·N·D_KL for KTO's KL
    estimate (D_KL: `kl_tokens_per_epoch` x epochs). For DPO/ORPO, D counts both sequences of a pair
    (`tunegate.recipes.preference.tokens_per_epoch`). Threshold: one third of
    the base model's training compute when known (`KNOWN_BASE_MODELS`), else one third of 10^23 FLOP (the
    Commission's fallback for an original model whose compute is unknown; one third of 10^25 FLOP if that
    model is a GPAI model with systemic risk).

    Returns {"n_params", "n_trainable", "tokens", "tokens_source", "full", "formula", "flops", "notes",
    "trainer_total_flos", "base" (base_model_facts), "threshold", "threshold_basis", "ratio_to_base" (None when the
    base compute is unknown), "ratio_to_threshold", "exceeds", "base_below_gpai" (None when unknown),
    "systemic_threshold", "exceeds_systemic", "flops_upper" (the largest estimate shown: ours, transformers'
    total_flos, 6·N·D)}; "flops" is None when N or D is not recorded.
    """
    from tunegate.preflight import train_flops

    full = adapter == "full"
    total, trainable = summary.get("total_params"), summary.get("trainable_params")
    n_params = total if full else (total - trainable if total and trainable is not None else None)
    tokens, tokens_source = _tokens_trained(summary, metrics or [], stats)
    notes: list[str] = []
    flops = None
    formula = "6·N·D" if full else "4·N·D + 6·N_a·D"
    if n_params and tokens:
        flops = train_flops(n_params, trainable or n_params, round(tokens), full)
        if method in ("dpo", "kto") and not (summary.get("trl") or {}).get("precompute_ref_log_probs"):
            flops += 2.0 * n_params * tokens
            formula += " + 2·N·D (the frozen reference model's forward pass)"
        kl_tokens = (summary.get("kl_tokens_per_epoch") or 0) * (summary.get("epochs_seen") or 0)
        if method == "kto" and kl_tokens:
            # KTO's KL estimate: mismatched (prompt, completion) pairs through the policy (no gradients) and the reference
            flops += 4.0 * n_params * kl_tokens
            formula += f" + 4·N·D_KL (KTO's KL estimate, D_KL = {round(kl_tokens):,} tokens: policy and reference forward passes)"
    if method == "grpo":
        notes.append("GRPO: the FLOPs of generating completions during training are not counted")
    if method == "distillation":
        notes.append("distillation: the teacher's FLOPs (generating answers or logits) are not counted")
    if adapter == "qlora":
        notes.append("QLoRA: parameters of 4-bit layers may be under-counted by PyTorch's numel (packed storage)")
    final = next((r for r in reversed(metrics or []) if "total_flos" in r), None)
    # The largest of the estimates the documents show (ours, transformers' total_flos which counts padding, and
    # 6·N·D as if every weight trained): the conclusion is stated for it too.
    upper = [f for f in (flops, final["total_flos"] if final else None,
                         6.0 * n_params * tokens if n_params and tokens else None) if f]
    base = base_model_facts(base_model)
    if base["known"]:
        threshold = base["compute_flops"] * MODIFICATION_FRACTION
        basis = "one third of the base model's estimated training compute (6 × parameters × pre-training tokens)"
    else:
        threshold = GPAI_INDICATIVE_FLOP * MODIFICATION_FRACTION
        basis = ("one third of 10^23 FLOP: the Commission's fallback when the original model's training compute is "
                 "unknown (one third of 10^25 FLOP applies instead if the original is a GPAI model with systemic risk; "
                 "the lower threshold is used here, which is the stricter choice)")
    out = {
        "n_params": n_params, "n_trainable": trainable, "tokens": tokens, "tokens_source": tokens_source, "full": full,
        "formula": formula, "flops": flops, "notes": notes,
        "trainer_total_flos": final["total_flos"] if final else None,
        "flops_upper": max(upper) if upper else None,
        "base": base, "threshold": threshold, "threshold_basis": basis,
        "ratio_to_base": flops / base["compute_flops"] if flops is not None and base["known"] else None,
        "ratio_to_threshold": flops / threshold if flops is not None else None,
        "exceeds": flops > threshold if flops is not None else None,
        "base_below_gpai": base["compute_flops"] <= GPAI_INDICATIVE_FLOP if base["known"] else None,
        "systemic_threshold": SYSTEMIC_RISK_FLOP * MODIFICATION_FRACTION,
        "exceeds_systemic": flops > SYSTEMIC_RISK_FLOP * MODIFICATION_FRACTION if flops is not None else None,
    }
    return out


def _lineage(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """Each stage's manifest, and plain-language problems: a stage re-run after its downstream stages used
    it (the upstream manifest hash no longer matches), output files changed since their manifest, an audit
    run after training."""
    manifests, problems = {}, []
    for name in ("data", "audit", "train", "eval"):
        m = read_manifest(run_dir / name)
        if m is not None:
            manifests[name] = m
    stale: dict[str, list[str]] = {}  # upstream stage -> downstream stages that read an earlier version of it
    for name, m in manifests.items():
        for up, digest in m.upstream.items():
            path = run_dir / up / MANIFEST
            if path.is_file() and sha256_file(path) != digest:
                stale.setdefault(up, []).append(name)
        bad = verify_outputs(run_dir / name, m)
        if bad:
            problems.append(f"{name}/: files changed or missing since its manifest was written: {', '.join(bad[:5])}")
    for up, downs in stale.items():
        when = manifests[up].started_at if up in manifests else "?"
        problems.insert(0, f"the {up} stage was re-run (started {when}) after the {' and '.join(downs)} stage(s) used it: "
                           f"the {up} figures here describe its current output, not necessarily what {' and '.join(downs)} read")
    a, t = manifests.get("audit"), manifests.get("train")
    if a and t and a.started_at and t.started_at and a.started_at > t.started_at:
        problems.append(f"the audit (started {a.started_at}) ran after training (started {t.started_at}): its verdict was "
                        "not available when the decision to train was taken")
    return manifests, problems


def _adapter(run_dir: Path, adapter: str, summary: dict[str, Any]) -> dict[str, Any]:
    cfg = _json(run_dir / "train" / "adapter" / "adapter_config.json")
    if adapter == "full" or cfg is None:
        return {"kind": "full fine-tune (every weight)" if adapter == "full" else adapter, "config": None, "dir": "model" if adapter == "full" else "adapter"}
    use_dora = bool(cfg.get("use_dora"))
    kind = "DoRA (weight-decomposed LoRA)" if use_dora else ("QLoRA (LoRA on a 4-bit base)" if adapter == "qlora" else "LoRA")
    targets = cfg.get("target_modules")
    return {
        "kind": kind, "dir": "adapter", "config": cfg, "r": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
        "dropout": cfg.get("lora_dropout"), "targets": sorted(targets) if isinstance(targets, list) else targets,
        "use_rslora": cfg.get("use_rslora"), "use_dora": use_dora, "peft_type": cfg.get("peft_type"),
        "peft_version": cfg.get("peft_version"), "modules_to_save": cfg.get("modules_to_save"),
        "base_path": cfg.get("base_model_name_or_path"),
    }


def _ci(s: dict[str, Any]) -> dict[str, Any]:
    return {"mean": s["mean"], "lo": s["ci_low"], "hi": s["ci_high"]}


def _eval(scores: dict[str, Any], verdict: dict[str, Any], suites: dict[str, Any] | None) -> dict[str, Any]:
    metrics = scores.get("metrics") or {}
    golden, suite_metrics, benchmark_metrics = [], [], []
    for name, s in metrics.items():
        row = {"name": name, "baseline": _ci(s["baseline"]), "candidate": _ci(s["candidate"]), "delta": _ci(s["delta"]),
               "half_width": (s["candidate"]["ci_high"] - s["candidate"]["ci_low"]) / 2}
        if name.startswith(LM_EVAL_PREFIX):
            benchmark_metrics.append(row)
        else:
            (suite_metrics if name.startswith(_SUITE_PREFIXES) else golden).append(row)
    suite_info = []
    for name, body in (suites or {}).items():
        if isinstance(body, dict):
            sources = body.get("sources")
            suite_info.append({"name": name, "n_prompts": body.get("n_prompts"),
                               "sources": ", ".join(_SUITE_NAMES.get(s, s) for s in sources) if sources else None,
                               "max_new_tokens": body.get("max_new_tokens"), "tasks": ", ".join(body.get("tasks") or []),
                               "num_fewshot": body.get("num_fewshot"), "limit": body.get("limit"),
                               "lm_eval_version": body.get("lm_eval_version")})
    return {"n": scores.get("n"), "headline": scores.get("headline"), "baseline_name": scores.get("baseline", "base model"),
            "bootstrap_samples": scores.get("bootstrap_samples"), "confidence": scores.get("confidence", 0.95),
            "golden": golden, "suite_metrics": suite_metrics, "benchmark_metrics": benchmark_metrics, "suites": suite_info,
            "verdict": verdict.get("verdict"), "rules": verdict.get("rules", []),
            "stopped_share": scores.get("candidate_stopped_before_max_new_tokens")}


def _section(manifests: dict[str, Any], stage: str, name: str, project) -> dict[str, Any]:
    """The config section `name` as the stage recorded it in its manifest (what the run actually used), or the
    project's current section when the stage has no manifest."""
    m = manifests.get(stage)
    if m is not None and name in m.config:
        return m.config[name]
    return project.section(name)


def _data(cfg: dict[str, Any], stats: dict[str, Any], data_manifest, root: Path) -> dict[str, Any]:
    """cfg: the data section as the data stage recorded it. A setting missing there (an older run) counts as not
    applied: the documents say only what the run's own files show. Files are named relative to the project
    folder `root` (project_relative)."""
    def key(s: dict[str, Any]) -> str:  # the data stage's per_source key (config.SourceConfig.name)
        if s.get("path") is None:
            return f"hf://{s.get('hub')}:{s.get('split', 'train')}"
        return str(s["path"]) + (f":{s.get('split', 'train')}" if Path(str(s["path"])).is_dir() else "")

    licence_of = {key(s): s.get("license") for s in cfg.get("sources", [])}
    inputs = data_manifest.inputs if data_manifest else {}
    sources = []
    for path, counts in (stats.get("per_source") or {}).items():
        sources.append({"name": Path(path).name, "path": project_relative(path, root), "license": licence_of.get(path), "sha256": inputs.get(path),
                        "rows_read": counts.get("rows_read"), "kept": counts.get("kept"), "rejected": counts.get("rejected"),
                        "train": counts.get("train"), "val": counts.get("val")})
    pii = stats.get("pii")
    pii_rows = []
    if pii:
        for t in sorted(set(pii.get("entities", [])) | set(pii.get("found_by_type", {}))):
            pii_rows.append({"type": t, "found": pii.get("found_by_type", {}).get(t, 0), "rescan": pii.get("rescan_by_type", {}).get(t, 0)})
    golden = cfg.get("golden") or {}
    csv_sources = [s for s in cfg.get("sources", []) if s.get("format") == "csv"]
    licences = stats.get("licenses") or sorted({v for v in licence_of.values() if v})
    return {
        "stats": stats, "sources": sources, "steps": stats.get("steps") or [],
        "rejected_by_rule": dict(sorted((stats.get("rejected_by_rule") or {}).items(), key=lambda t: -t[1])),
        "licenses": licences, "attribution": any("cc-by" in x.lower() for x in licences),
        "unlicensed": [s["name"] for s in sources if not s["license"]],
        "pii": pii, "pii_rows": pii_rows, "pii_config": cfg.get("pii"),
        "dedup_on": bool(cfg.get("dedup")), "dedup": stats.get("duplicates_removed") or {},
        # n-gram decontamination ran when its count is in stats.json (older data stages did not record it)
        "ngram": (cfg.get("decontaminate") or {}).get("ngram") if "golden_ngram_overlap_removed" in stats else None,
        # every turn, answers included, and short golden texts held whole: data stages since min_words existed
        "min_words": (cfg.get("decontaminate") or {}).get("min_words") if "golden_ngram_overlap_removed" in stats else None,
        "golden_overlap_removed": stats.get("golden_overlap_removed", 0),
        "golden_ngram_overlap_removed": stats.get("golden_ngram_overlap_removed"),
        "max_length": cfg.get("max_length"), "overlength": cfg.get("overlength"), "golden_path": project_relative(golden.get("path"), root),
        "golden_sample": golden.get("sample"), "golden_license": golden.get("license"),
        "instructions": sorted({s["instruction"] for s in cfg.get("sources", []) if s.get("instruction")}),
        "formats": sorted({s.get("format", "chat") for s in cfg.get("sources", [])}),
        "columns": sorted({f"{s.get('prompt_column', 'prompt')} -> user, {s.get('completion_column', 'completion')} -> assistant"
                           for s in csv_sources}),
    }


def _train(summary: dict[str, Any], cfg: dict[str, Any], train_manifest) -> dict[str, Any]:
    """cfg: the train section as the train stage recorded it."""
    trl = summary.get("trl") or {}
    per_device = trl.get("per_device_train_batch_size")
    accum = trl.get("gradient_accumulation_steps", 1) or 1
    world = summary.get("world_size", 1) or 1
    return {
        "method": summary.get("method") or cfg.get("method", "sft"), "adapter": summary.get("adapter") or cfg.get("adapter", "dora"),
        "lr": trl.get("learning_rate"), "scheduler": trl.get("lr_scheduler_type"), "warmup_steps": trl.get("warmup_steps"),
        "steps": summary.get("steps"), "max_steps": summary.get("max_steps"), "epochs_seen": summary.get("epochs_seen"),
        "per_device_batch": per_device, "grad_accum": accum, "world_size": world,
        "effective_batch": per_device * accum * world if per_device else None,
        "wall_s": summary.get("train_wall_s"), "tokens_seen": summary.get("tokens_seen"),
        "tokens_per_s": summary.get("train_tokens_per_s"), "precision": summary.get("precision"),
        "device": "CPU" if trl.get("use_cpu") else ("GPU" if "use_cpu" in trl else None),
        "seed": trl.get("seed", cfg.get("seed")), "stopped_by_budget": summary.get("stopped_by_budget"),
        "budget_minutes": cfg.get("budget_minutes"), "final_train_loss": summary.get("final_train_loss"),
        "final_eval_loss": summary.get("final_eval_loss"), "train_rows": summary.get("train_rows"),
        "val_rows": summary.get("val_rows"), "resumed_from_step": summary.get("resumed_from_step"),
        "tokens_per_epoch": summary.get("train_tokens_per_epoch"),
        "supervised_tokens_per_epoch": summary.get("supervised_tokens_per_epoch"),
        "packages": train_manifest.packages if train_manifest else {}, "started_at": train_manifest.started_at if train_manifest else None,
        "overrides": train_manifest.overrides if train_manifest else [],
        "trl": trl,
    }


def _audit(audit: dict[str, Any] | None, audit_manifest) -> dict[str, Any] | None:
    if audit is None:
        return None
    rec = audit.get("recommendation") or {}
    cands = [{"name": c["name"], "method": c.get("method"), "trains": c.get("trains"), "mean": c["mean"], "lo": c["ci_low"],
              "hi": c["ci_high"], "detail": c.get("detail"), "usd": c.get("usd_per_1k_requests")} for c in audit.get("candidates", [])]
    decision = rec.get("decision") or {}
    bar = audit.get("bar")
    no_training = [c for c in cands if not c["trains"]]
    # What the measurement supports: an option "met the bar" on its point estimate; one whose 95% CI reaches the
    # bar cannot be ruled out; only when no CI reaches it did the audit measure that none meets it.
    met = [c for c in no_training if bar is not None and c["mean"] >= bar]
    reaches = [c for c in no_training if bar is not None and c["mean"] < bar <= c["hi"]]
    return {"met_bar": met, "ci_reaches_bar": reaches, "no_training": no_training, "verdict": rec.get("verdict") or (audit_manifest.verdict if audit_manifest else None), "metric": audit.get("metric"),
            "bar": audit.get("bar"), "golden_rows": audit.get("golden_rows"), "task": audit.get("task"), "labels": audit.get("labels"),
            "candidates": cands, "best_no_training": rec.get("best_no_training"), "best_training": rec.get("best_training"),
            "gap": rec.get("gap"), "method": decision.get("method"), "why": decision.get("why"),
            "rejected": decision.get("rejected", []), "cost_of_being_wrong": rec.get("cost_of_being_wrong") or {},
            "started_at": audit_manifest.started_at if audit_manifest else None}


def _anti_patterns(preflight: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The anti-patterns the training's preflight found (train/preflight.json, the rules of
    `tunegate.preflight.anti_pattern_table`); empty when the run has no preflight.json."""
    return [f for f in (preflight or {}).get("findings", []) if f.get("found", True)]


def gather(run_dir: Path, project, merged: str | None = None, gguf: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the three templates show, read from the run's files. `merged`: the release bundle's folder
    holding the merged model ("merged/"), when the bundle has one; `gguf`: the bundle's gguf/verdict.json
    (tunegate.gguf_export), when it carries GGUF files. Raises TunegateError when the data, train or
    eval stage has not finished (their summaries are missing)."""
    run_dir = Path(run_dir)
    hint = "finish the run first (`tunegate run PROJECT.yaml`)"
    stats = _require(run_dir / "data" / "stats.json", hint)
    summary = _require(run_dir / "train" / "train_summary.json", hint)
    scores = _require(run_dir / "eval" / "scores.json", hint)
    verdict = _require(run_dir / "eval" / "verdict.json", hint)
    metrics_path = run_dir / "train" / "metrics.jsonl"
    metrics = read_jsonl(metrics_path) if metrics_path.is_file() else []
    manifests, problems = _lineage(run_dir)
    # What the run used, as its manifests recorded it; the project file only fills in what they do not hold.
    train_m = manifests.get("train")
    base_model = train_m.config.get("base_model", project.base_model) if train_m else project.base_model
    train = _train(summary, _section(manifests, "train", "train", project), train_m)
    adapter = _adapter(run_dir, train["adapter"], summary)
    compute = compute_assessment(summary, base_model, train["method"], train["adapter"], metrics, stats)
    base = compute["base"]
    eval_cfg = _section(manifests, "eval", "eval", project)
    ctx = {
        "name": project.name, "run_id": run_dir.name, "run_dir": project_relative(run_dir, project.root),
        "project_file": project_relative(project.source_file, project.root) if project.source_file else None,
        "base": base, "base_ref": base["hf_id"] or base_model,
        "adapter": adapter, "train": train, "compute": compute,
        "data": _data(_section(manifests, "data", "data", project), stats, manifests.get("data"), project.root),
        "eval": _eval(scores, verdict, _json(run_dir / "eval" / "suites.json")),
        "audit": _audit(_json(run_dir / "audit" / "audit.json"), manifests.get("audit")),
        # the task section the eval measured with (its stage config view holds it when set)
        "task": manifests["eval"].config.get("task") if manifests.get("eval") else (project.task.model_dump() if project.task else None),
        "anti_patterns": _anti_patterns(_json(run_dir / "train" / "preflight.json")),
        "manifests": {k: {"started_at": m.started_at, "wall_s": m.wall_s, "sha256": sha256_file(run_dir / k / MANIFEST)}
                      for k, m in manifests.items()},
        "lineage_problems": problems,
        "eval_max_new_tokens": eval_cfg.get("max_new_tokens"),
        "registry": project_relative(project.registry, project.root), "runs_dir": project_relative(project.runs_dir, project.root),
        "embedded_info": _embedded_info(base_model),
        "stored": _stored(run_dir, project.root),
        "merged_in_bundle": merged,
        "gguf": gguf,
        "classify": (summary.get("classify") if train["method"] == "classify" else None),  # labels, abstention
        "abstain": _json(run_dir / "eval" / ABSTAIN_FILE) or None,  # eval.abstain: the generating candidate's threshold
    }
    ctx["limitations"] = _limitations(ctx)
    return ctx


# Files of a run that hold (copies of) data rows or outputs about them, and what each holds.
_STORED = (
    ("data/train.jsonl", "training rows as trained on (after redaction, when data.pii is set)"),
    ("data/val.jsonl", "validation rows (same processing as training rows)"),
    ("data/golden.jsonl", "the golden set, frozen and not redacted"),
    ("data/rejected.jsonl", "rejected rows: file, line, id, rule, detail; the raw text of structurally invalid rows unless data.pii is set"),
    ("audit/samples.jsonl", "golden prompts with the audit candidates' answers"),
    ("audit/probe/data/train.jsonl", "a copy of a sample of training rows for the audit's LoRA probe"),
    ("train/adapter", "adapter weights: trained on the rows above, may reproduce parts of them"),
    ("train/.train.checkpoints", "intermediate training checkpoints (weights and optimizer state)"),
    ("eval/samples.jsonl", "golden prompts, references, and both systems' answers"),
    ("eval/suite_samples.jsonl", "safety / IFEval prompts and both systems' answers"),
    ("report/report.html", "run report with up to 20 golden prompts and answers"),
)


def _stored(run_dir: Path, root: Path) -> list[dict[str, str]]:
    return [{"path": project_relative(run_dir / rel, root), "holds": holds} for rel, holds in _STORED if (run_dir / rel).exists()]


def _embedded_info(name: str) -> dict[str, Any] | None:
    from tunegate.models import EMBEDDED

    return EMBEDDED.get(name)


def _limitations(ctx: dict[str, Any]) -> list[str]:
    """What the run's own numbers say this model has not shown, most important first. Plain sentences."""
    ev, tr, data, audit = ctx["eval"], ctx["train"], ctx["data"], ctx["audit"]
    out: list[str] = []
    head = next((m for m in ev["golden"] if m["name"] == ev["headline"]), ev["golden"][0] if ev["golden"] else None)
    if head:
        c = head["candidate"]
        out.append(f"Measured on {ev['n']} golden rows only: the 95% CI of {head['name']} is {c['lo']:.3f} to {c['hi']:.3f} "
                   f"(width {2 * head['half_width']:.3f}); a difference smaller than that between this model and another is not resolved.")
        b = head["baseline"]
        if b["mean"] <= 0.05:
            out.append(f"The comparison baseline ({ev['baseline_name']}) scored {b['mean']:.3f} on {head['name']}: the gate shows "
                       "that the adapter learned the task's answer format, not that it beats a reasonable alternative.")
        if audit and audit.get("best_no_training"):
            best = next((x for x in audit["candidates"] if x["name"] == audit["best_no_training"]["name"]), None)
            if best and best["mean"] > c["mean"] and audit.get("metric") == head["name"]:
                out.append(f"The audit's best option without training, {best['name']}, scored {best['mean']:.3f} "
                           f"[{best['lo']:.3f}, {best['hi']:.3f}] on {audit['golden_rows']} golden rows, above this adapter's "
                           f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]; the audit's verdict was {audit['verdict']}.")
    for r in ev["rules"]:
        if not r.get("passed"):
            out.append(f"Gate rule failed: {r.get('description')} (value {_f3(r.get('value'))}).")
    for a in ctx["anti_patterns"]:
        out.append(f"The preflight before training found the anti-pattern {a['name']} ({a['level']}): {a['message']} "
                   f"(fix: {a['fix']}).")
    if tr["epochs_seen"] is not None and tr["epochs_seen"] < 1:
        out.append(f"Training covered {tr['epochs_seen']} of one epoch: about {(1 - tr['epochs_seen']) * 100:.0f}% of the "
                   f"{_num(tr['train_rows'])} training rows were never seen.")
    if tr["stopped_by_budget"]:
        out.append(f"Training stopped at the time budget ({tr['budget_minutes']} min) at step {tr['steps']} of {tr['max_steps']} planned.")
    if not ev["suite_metrics"]:
        out.append("Safety (harmful-request refusal, over-refusal) and general instruction following were not measured: "
                   "eval.suites ran no safety or IFEval suite for this run.")
    if data["pii"] is None:
        out.append("The training data was not scanned for personal data (data.pii was not set).")
    if not data["dedup_on"]:
        out.append("Duplicate and near-duplicate rows were not checked (data.dedup was not set).")
    out.append(f"Training rows longer than {data['max_length']} tokens after the chat template were handled by the "
               f"`{data['overlength']}` policy: longer inputs are outside what was trained and measured.")
    if ev["stopped_share"] is not None and ev["stopped_share"] < 1:
        out.append(f"{(1 - ev['stopped_share']) * 100:.1f}% of the adapter's golden-set answers reached the "
                   f"{ctx['eval_max_new_tokens']}-token generation limit and were cut off.")
    out.append(f"One training run with seed {tr['seed']}: variation across seeds was not measured.")
    emb = ctx["embedded_info"]
    if emb:
        out.append(f"Trained against tunegate's embedded base model: the {emb['gguf_file']} GGUF from the `{emb['package']}` package, "
                   f"a 4-bit quantization of {emb['hf_id']} dequantized to float32. Its behaviour on the original Hub weights "
                   "was not measured.")
    out.append("Languages, domains and prompt styles other than those of the golden set were not measured.")
    out += [f"Provenance: {p}." for p in ctx["lineage_problems"]]
    return out


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _sci(x: float | None, digits: int = 3) -> str:
    """1.2515e14 -> "1.25 × 10¹⁴" (digits significant figures)."""
    if x is None:
        return NOT_MEASURED
    if x == 0:
        return "0"
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    sup = str(int(exp)).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"10{sup}" if float(mant) == 1 and digits == 1 else f"{mant} × 10{sup}"


def _num(x: Any) -> str:
    if x is None:
        return NOT_MEASURED
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _f3(x: float | None) -> str:
    return NOT_MEASURED if x is None else f"{x:.3f}"


def _cell(x: Any) -> str:
    """A value made safe for one markdown table cell."""
    return (NOT_MEASURED if x is None else str(x)).replace("|", "\\|").replace("\n", " ")


def _blank(what: str) -> str:
    return BLANK.format(what)


def _duration(s: float | None) -> str:
    if s is None:
        return NOT_MEASURED
    return f"{s:.0f} s ({s / 60:.1f} min)" if s >= 60 else f"{s:.1f} s"


def _env():
    from tunegate.report.render import environment

    # Markdown, not HTML: no autoescape (values that go into tables pass through the `cell` filter).
    env = environment(documents=True)
    env.filters.update(sci=_sci, num=_num, f3=_f3, cell=_cell, duration=_duration)
    env.globals.update(blank=_blank, NOT_MEASURED=NOT_MEASURED)
    return env


def _front_matter(ctx: dict[str, Any]) -> str:
    """The model card's YAML metadata (Hugging Face model card spec), dumped by PyYAML so it always parses."""
    import yaml

    ad, ev, tr = ctx["adapter"], ctx["eval"], ctx["train"]
    tags = ["tunegate", tr["method"]]
    if ad.get("config") is not None:
        tags += ["peft", "dora" if ad["use_dora"] else ("qlora" if tr["adapter"] == "qlora" else "lora")]
    meta: dict[str, Any] = {"base_model": ctx["base_ref"], "library_name": "peft" if ad.get("config") is not None else "transformers"}
    if ctx["base"]["license"]:
        meta["license"] = ctx["base"]["license"].lower()
    meta["tags"] = tags
    task_type = "text-classification" if ctx.get("classify") else "text-generation"  # train.method classify: a head
    meta["pipeline_tag"] = task_type
    golden_name = f"{ctx['name']} golden set ({Path(ctx['data']['golden_path']).name}, {ev['n']} rows)"
    results = []
    if ev["golden"]:
        results.append({
            "task": {"type": task_type, "name": ctx["audit"]["task"] if ctx["audit"] and ctx["audit"].get("task") else task_type},
            "dataset": {"name": golden_name, "type": "golden-set", "revision": ctx["data"]["stats"].get("golden_sha256")},
            "metrics": [{"type": m["name"], "value": m["candidate"]["mean"],
                         "name": f"{m['name']} (95% CI {m['candidate']['lo']:.3f}-{m['candidate']['hi']:.3f}; "
                                 f"{ev['baseline_name']} {m['baseline']['mean']:.3f})"} for m in ev["golden"]],
        })
    for m in ev["suite_metrics"]:
        results.append({"task": {"type": "text-generation"}, "dataset": {"name": m["name"].split("_judge")[0], "type": "tunegate-suite"},
                        "metrics": [{"type": m["name"], "value": m["candidate"]["mean"],
                                     "name": f"{m['name']} (95% CI {m['candidate']['lo']:.3f}-{m['candidate']['hi']:.3f})"}]})
    meta["model-index"] = [{"name": f"{ctx['name']}-{ctx['run_id']}", "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def render_release_docs(run_dir: Path, project, merged: str | None = None, gguf: dict[str, Any] | None = None) -> dict[str, str]:
    """MODEL_CARD.md, article25.md and dpia.md for a finished run, as {file name: markdown text}.

    run_dir: runs/<run_id>/ with finished data, train and eval stages (audit optional). project: the
    `config.Project` the run used (licences, golden set, data settings, base model). merged: the folder of the
    release bundle that holds the merged model ("merged/"), so the card points there instead of advising a merge.
    gguf: the bundle's gguf/verdict.json, so the card lists the GGUF files with their parity results.

    Raises:
        TunegateError: data/stats.json, train/train_summary.json, eval/scores.json or eval/verdict.json is missing.
    """
    ctx = gather(Path(run_dir), project, merged, gguf)
    env = _env()
    card = _front_matter(ctx) + "\n" + env.get_template("model_card.md.j2").render(**ctx)
    return {
        "MODEL_CARD.md": card,
        "article25.md": env.get_template("article25.md.j2").render(**ctx, sources={
            "guidelines": GPAI_GUIDELINES, "ai_act": AI_ACT, "flops": FLOPS_PAPER}, known_models=KNOWN_BASE_MODELS,
            gpai_flop=GPAI_INDICATIVE_FLOP, systemic_flop=SYSTEMIC_RISK_FLOP),
        "dpia.md": env.get_template("dpia.md.j2").render(**ctx, sources={"gdpr": GDPR}),
    }


def write_release_docs(run_dir: Path, project, out_dir: Path | None = None) -> list[Path]:
    """Render the three documents and write them (atomically) into out_dir (default runs/<run_id>/docs/)."""
    docs = render_release_docs(run_dir, project)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "docs"
    paths = []
    for name in DOC_NAMES:
        atomic_write_text(out_dir / name, docs[name])
        paths.append(out_dir / name)
    return paths
