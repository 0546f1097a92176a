"""Eval stage and gate: the base model and the candidate adapter on the frozen golden set.

Refuses to score when the golden set changed since it was frozen, or when training data overlaps it
(case C23). Both systems answer every golden prompt with batched greedy generation; each row gets a task
score; the candidate-minus-base difference gets a paired bootstrap 95% CI. The gate rules in `eval.gate`
decide PASS or FAIL.

Writes: samples.jsonl (per row: prompt, reference, both outputs and scores), scores.json, verdict.json.
"""

from __future__ import annotations

from typing import Any

from tunegate import TunegateError
from tunegate.data import golden as golden_lock
from tunegate.data.format import generation_prompt
from tunegate.data.records import prompt_text, read_jsonl, read_source, reference_answer
from tunegate.evals.bootstrap import bootstrap_ci, paired_bootstrap
from tunegate.evals.metrics import METRICS
from tunegate.manifest import atomic_write_json, atomic_write_jsonl
from tunegate.pipeline import Stage, StageResult, console


def check_golden(project, data_dir) -> list[dict[str, Any]]:
    """The golden rows to score, after checking the lock and the train/golden overlap. Raises TunegateError."""
    import json

    cfg = project.data
    raw, rejected = read_source(cfg.golden, role="golden")
    if rejected:
        raise TunegateError(f"{cfg.golden.path}: {rejected[0]}")
    if not cfg.golden_lock.is_file():
        raise TunegateError(f"{cfg.golden_lock}: golden lock missing; the eval gate only scores a frozen golden set (rerun the data stage)")
    golden_lock.check(cfg.golden, raw, json.loads(cfg.golden_lock.read_text()), cfg.golden_lock)
    golden = read_jsonl(data_dir / "golden.jsonl")
    trained = read_jsonl(data_dir / "train.jsonl") + read_jsonl(data_dir / "val.jsonl")
    pairs = golden_lock.overlap(trained, golden)
    if pairs:
        shown = ", ".join(f"{t}~{g}" for t, g in pairs[:10])
        raise TunegateError(
            f"{data_dir / 'train.jsonl'}: {len(pairs)} training row(s) overlap the golden set (train~golden: {shown}); "
            "rule: the gate refuses to score a golden set the candidate was trained on"
        )
    return golden


def gate(rules, base: dict[str, Any], cand: dict[str, Any], delta: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configured rule with its measured value, CI and PASS/FAIL."""
    out = []
    if rules.min_score is not None:
        out.append({
            "rule": "min_score",
            "description": f"candidate score >= {rules.min_score}",
            "value": cand["mean"], "ci": [cand["ci_low"], cand["ci_high"]], "threshold": rules.min_score,
            "passed": cand["mean"] >= rules.min_score,
        })
    if rules.min_delta_ci_low is not None:
        out.append({
            "rule": "min_delta_ci_low",
            "description": f"lower end of the 95% CI of (candidate - base) > {rules.min_delta_ci_low}",
            "value": delta["ci_low"], "ci": [delta["ci_low"], delta["ci_high"]], "threshold": rules.min_delta_ci_low,
            "passed": delta["ci_low"] > rules.min_delta_ci_low,
        })
    return out


def run(st: Stage) -> StageResult:
    import time

    import torch
    from peft import PeftModel

    from tunegate.models import load_model, load_tokenizer, resolve_base_model

    project = st.project
    ecfg = project.eval
    golden = check_golden(project, st.upstream_dir("data"))

    base_path = resolve_base_model(project.base_model)
    tokenizer = load_tokenizer(base_path)
    prompts = [generation_prompt(tokenizer, r) for r in golden]
    refs = [reference_answer(r) for r in golden]
    metric = METRICS[ecfg.metric]

    torch.manual_seed(ecfg.seed)
    model = PeftModel.from_pretrained(load_model(base_path), str(st.upstream_dir("train") / "adapter"))
    from tunegate.evals.generate import generate

    t0 = time.perf_counter()
    with model.disable_adapter():
        base_out = generate(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size, desc="base model")
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cand_out = generate(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size, desc="candidate")
    cand_s = time.perf_counter() - t0

    base_scores = [metric(p, r) for p, r in zip(base_out, refs)]
    cand_scores = [metric(p, r) for p, r in zip(cand_out, refs)]
    n, seed = ecfg.bootstrap_samples, ecfg.seed
    base_ci = bootstrap_ci(base_scores, n, seed).as_dict()
    cand_ci = bootstrap_ci(cand_scores, n, seed).as_dict()
    delta_ci = paired_bootstrap(base_scores, cand_scores, n, seed).as_dict()
    rules = gate(ecfg.gate, base_ci, cand_ci, delta_ci)
    verdict = "PASS" if all(r["passed"] for r in rules) else "FAIL"

    samples = [
        {
            "id": g["id"], "prompt": prompt_text(g), "reference": ref,
            "base_output": bo, "candidate_output": co, "base_score": bs, "candidate_score": cs,
        }
        for g, ref, bo, co, bs, cs in zip(golden, refs, base_out, cand_out, base_scores, cand_scores)
    ]
    atomic_write_jsonl(st.dir / "samples.jsonl", samples)
    scores = {
        "metric": ecfg.metric,
        "n": len(golden),
        "base": base_ci,
        "candidate": cand_ci,
        "delta": delta_ci,
        "bootstrap_samples": n,
        "confidence": 0.95,
        "base_generation_s": round(base_s, 1),
        "candidate_generation_s": round(cand_s, 1),
        "stopped_before_max_new_tokens": sum(len(tokenizer(o)["input_ids"]) < ecfg.max_new_tokens for o in cand_out) / len(cand_out),
    }
    atomic_write_json(st.dir / "scores.json", scores)
    atomic_write_json(st.dir / "verdict.json", {"verdict": verdict, "rules": rules})
    console.print(
        f"{ecfg.metric} on {len(golden)} golden rows: base {base_ci['mean']:.3f} "
        f"[{base_ci['ci_low']:.3f}, {base_ci['ci_high']:.3f}], candidate {cand_ci['mean']:.3f} "
        f"[{cand_ci['ci_low']:.3f}, {cand_ci['ci_high']:.3f}], difference {delta_ci['mean']:+.3f} "
        f"[{delta_ci['ci_low']:+.3f}, {delta_ci['ci_high']:+.3f}]"
    )
    for r in rules:
        console.print(f"  {'[green]PASS[/green]' if r['passed'] else '[red]FAIL[/red]'} {r['description']}: {r['value']:.3f}")
    return StageResult(metrics=scores, verdict=verdict)
