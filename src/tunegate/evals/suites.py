"""Standard suites beside the golden set: IFEval, safety, and judge scores, for one or two systems.

Each suite answers its prompts with every system (a chat backend: tunegate.evals.backends), scores each
row, and returns per-row scores keyed by metric and system, so the eval stage can give every suite metric
the same paired-bootstrap CI and gate rules as a golden-set metric. Rows of one metric are the same for
both systems (same prompts, same instructions), so the pairing holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tunegate.catalog import IFEVAL_FILE, IFEVAL_METRICS, SAFETY_JUDGE_METRICS, SAFETY_METRICS
from tunegate.evals import ifeval, safety
from tunegate.evals.backends import user_turns

PerRow = dict[str, dict[str, list[float]]]  # metric -> system -> per-row scores


def run_ifeval(systems: Mapping[str, Any], data_root: Path, limit: int | None, max_new_tokens: int) -> tuple[PerRow, dict, list[dict]]:
    """IFEval for each system. Returns (per_row, details, samples); details has the four standard numbers,
    the leaderboard average and per-instruction strict accuracy per system."""
    rows = ifeval.load_prompts(Path(data_root) / IFEVAL_FILE, limit)
    per_row: PerRow = {m: {} for m in IFEVAL_METRICS}
    details: dict[str, Any] = {"n_prompts": len(rows), "max_new_tokens": max_new_tokens, "sentence_splitter": ifeval.sentence_splitter()}
    samples = [{"suite": "ifeval", "id": f"ifeval:{r['key']}", "prompt": r["prompt"], "instructions": r["instruction_id_list"]} for r in rows]
    for system, backend in systems.items():
        responses = backend.complete(user_turns([r["prompt"] for r in rows]), max_new_tokens, desc=f"IFEval: {system}")
        scores = ifeval.score(rows, responses)
        for m, v in scores.items():
            per_row[m][system] = v
        details[system] = {"summary": ifeval.summary(scores), "by_instruction": ifeval.by_instruction(rows, scores),
                           "hit_max_new_tokens": _hit_max(backend, responses, max_new_tokens)}
        for s, resp, strict in zip(samples, responses, scores["ifeval_prompt_strict"]):
            s[f"{system}_output"] = resp
            s[f"{system}_followed_all"] = strict
    return per_row, details, samples


def run_safety(systems: Mapping[str, Any], data_root: Path, sources, limit: int | None, max_new_tokens: int, judge=None) -> tuple[PerRow, dict, list[dict]]:
    """Harmful-request refusal and over-refusal for each system, by string match and (given a judge) by the judge."""
    rows = safety.load_prompts(Path(data_root), sources, limit)
    names = SAFETY_METRICS + (SAFETY_JUDGE_METRICS if judge else ())
    per_row: PerRow = {m: {} for m in names}
    details: dict[str, Any] = {"n_prompts": len(rows), "sources": list(sources), "max_new_tokens": max_new_tokens,
                               "classifiers": ["string_match"] + (["judge: " + judge.name] if judge else [])}
    samples = [{"suite": "safety", "id": r["id"], "kind": r["kind"], "prompt": r["prompt"]} for r in rows]
    prompts = [r["prompt"] for r in rows]
    for system, backend in systems.items():
        responses = backend.complete(user_turns(prompts), max_new_tokens, desc=f"safety: {system}")
        refused = safety.string_match(responses)
        scores = safety.score(rows, refused)
        details[system] = {"string_match": {m: sum(v) / len(v) for m, v in scores.items() if v}, "by_source": safety.by_source(rows, refused)}
        if judge:
            labels = judge.refusal(prompts, responses)
            judged = judge.refused(labels)
            jscores = safety.score(rows, judged, suffix="_judge")
            details[system]["judge_unparsed"] = sum(v is None for v in labels) / len(labels)
            scores.update(jscores)
            details[system]["judge"] = {m: sum(v) / len(v) for m, v in jscores.items() if v}
            details[system]["judge_by_source"] = safety.by_source(rows, judged)
            details[system]["classifier_agreement"] = sum(a == b for a, b in zip(refused, judged)) / len(rows)
        for m, v in scores.items():
            per_row[m][system] = v
        for i, (s, resp) in enumerate(zip(samples, responses)):
            s[f"{system}_output"] = resp
            s[f"{system}_refused"] = refused[i]
    return per_row, details, samples


def _hit_max(backend, responses, max_new_tokens: int) -> float | None:
    """Fraction of responses that used the whole token budget (truncated answers), when tokens can be counted."""
    tok = getattr(backend, "tokenizer", None)
    if tok is None or not responses:
        return None
    return sum(len(tok(r, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1 for r in responses) / len(responses)


def bootstrap_summary(per_row: PerRow, n_samples: int, seed: int, baseline: str = "baseline", candidate: str = "candidate") -> dict[str, dict]:
    """Per metric {"baseline", "candidate", "delta"} intervals, as the golden-set metrics have them; a run with
    one system (no candidate) gets {"baseline"} only. Metrics without rows are left out."""
    from tunegate.evals.bootstrap import bootstrap_ci, paired_bootstrap

    out = {}
    for m, by_system in per_row.items():
        b, c = by_system.get(baseline), by_system.get(candidate)
        if b and not c and candidate not in by_system:
            out[m] = {"baseline": bootstrap_ci(b, n_samples, seed).as_dict()}
            continue
        if not b or not c:
            continue
        out[m] = {"baseline": bootstrap_ci(b, n_samples, seed).as_dict(), "candidate": bootstrap_ci(c, n_samples, seed).as_dict(),
                  "delta": paired_bootstrap(b, c, n_samples, seed).as_dict()}
    return out


def run_suite(name: str, data_root: Path, base_model: str, adapter: Path | None = None, limit: int | None = None,
              max_new_tokens: int | None = None, batch_size: int = 16, sources: list[str] | None = None,
              judge_model: str | None = None, tasks: list[str] | None = None,
              include: Path | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Score the suite `name` ("ifeval", "safety" or "lm_eval") on a base model and, with `adapter`, on that adapter
    against its base with paired bootstrap CIs (10,000 resamples, seed 0): the code the eval stage runs for
    `eval.suites`.

    max_new_tokens: default 512 for IFEval, 64 for safety. sources: safety's harmbench, jbb, xstest (default all).
    judge_model: safety only, a local judge model that also classifies refusals. tasks, include: lm_eval only,
    lm-eval task names and a folder of task YAMLs (config.LmEvalConfig); data_root is not read for it.
    Returns (details with per-system summaries and `metrics`, per-prompt samples).
    Raises TunegateError for an unknown suite, a missing data root, lm_eval without tasks or a folder that is
    not an adapter.
    """
    from tunegate import TunegateError
    from tunegate.evals.backends import LocalChat
    from tunegate.models import fit_to_adapter, load_adapter_tokenizer, load_inference_model, load_tokenizer, resolve_base_model

    if name not in ("ifeval", "safety", "lm_eval"):
        raise TunegateError(f"unknown suite {name!r}; known: ifeval, safety, lm_eval")
    if name == "lm_eval":
        from pydantic import ValidationError

        from tunegate.config import LmEvalConfig

        if include is not None and not Path(include).is_dir():
            raise TunegateError(f"{include}: not a folder of lm-eval task YAML files (--include)")
        try:
            lm_eval_cfg = LmEvalConfig(tasks=tasks or [], include=Path(include).resolve() if include else None, limit=limit,
                                       batch_size=batch_size)
        except ValidationError as e:
            raise TunegateError(f"lm_eval: {e.errors()[0]['msg']} (--tasks)") from None
    elif not data_root.is_dir():
        raise TunegateError(f"{data_root}: suite data root not found (pass --data-root)")
    path = resolve_base_model(base_model)
    tok, model = load_tokenizer(path), load_inference_model(path)
    if adapter is not None:
        from peft import PeftModel

        if not (adapter / "adapter_config.json").is_file():
            raise TunegateError(f"{adapter}: not an adapter folder (no adapter_config.json)")
        tok = load_adapter_tokenizer(adapter, path)  # with the adapter's train.added_tokens, if any
        model = PeftModel.from_pretrained(fit_to_adapter(model, adapter), str(adapter))
        systems = {"baseline": LocalChat(model, tok, batch_size, "base model", adapter_off=True),
                   "candidate": LocalChat(model, tok, batch_size, str(adapter))}
    else:
        systems = {"baseline": LocalChat(model, tok, batch_size, "base model")}
    judge = None
    if judge_model:
        from tunegate.config import JudgeConfig
        from tunegate.evals.judge import build_judge

        judge = build_judge(JudgeConfig(model=judge_model))
    if name == "ifeval":
        per_row, details, samples = run_ifeval(systems, data_root, limit, max_new_tokens or 512)
    elif name == "lm_eval":
        from tunegate.evals.harness import run_lm_eval

        per_row, details, samples = run_lm_eval(systems, lm_eval_cfg, [])
    else:
        per_row, details, samples = run_safety(systems, data_root, sources or ["harmbench", "jbb", "xstest"], limit,
                                               max_new_tokens or 64, judge)
    details["metrics"] = bootstrap_summary(per_row, 10_000, 0)
    details["base_model"], details["adapter"] = base_model, str(adapter) if adapter else None
    return details, samples
