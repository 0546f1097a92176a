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
from tunegate.evals.gate import check_rules, score_metrics, verdict
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

    summary, per_row = score_metrics(ecfg.metrics, base_out, cand_out, refs, ecfg.bootstrap_samples, ecfg.seed, ecfg.json_schema)
    rules = check_rules(ecfg.gate, summary)
    result = verdict(rules)

    samples = []
    for i, (g, ref, bo, co) in enumerate(zip(golden, refs, base_out, cand_out)):
        row = {"id": g["id"], "prompt": prompt_text(g), "reference": ref, "baseline_output": bo, "candidate_output": co}
        for name, scores in per_row.items():
            row[f"baseline_{name}"] = scores["baseline"][i]
            row[f"candidate_{name}"] = scores["candidate"][i]
        samples.append(row)
    atomic_write_jsonl(st.dir / "samples.jsonl", samples)
    n_new = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in cand_out]
    scores = {
        "n": len(golden),
        "headline": ecfg.metrics[0],
        "baseline": "base model",
        "metrics": summary,
        "bootstrap_samples": ecfg.bootstrap_samples,
        "confidence": 0.95,
        "baseline_generation_s": round(base_s, 1),
        "candidate_generation_s": round(cand_s, 1),
        "candidate_stopped_before_max_new_tokens": sum(n < ecfg.max_new_tokens for n in n_new) / len(n_new),
    }
    atomic_write_json(st.dir / "scores.json", scores)
    atomic_write_json(st.dir / "verdict.json", {"verdict": result, "rules": rules})
    for name, s in summary.items():
        b, c, d = s["baseline"], s["candidate"], s["delta"]
        console.print(
            f"{name} on {len(golden)} golden rows: base {b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}], "
            f"candidate {c['mean']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}], "
            f"difference {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        )
    for r in rules:
        console.print(f"  {'[green]PASS[/green]' if r['passed'] else '[red]FAIL[/red]'} {r['description']}: {r['value']:.3f}")
    return StageResult(metrics=scores, verdict=result)
