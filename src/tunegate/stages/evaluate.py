"""Eval stage and gate: the base model and the candidate adapter on the frozen golden set.

Refuses to score when the golden set changed since it was frozen, when a golden row spells one of the
tokenizer's control tokens (docs/design.md#control-tokens), or when training data overlaps it (case C23 in
docs/cases.md). Both systems answer every golden prompt with batched greedy generation (a classify run's
candidate instead: one forward pass of its classification head, tunegate.recipes.classify); each row gets a task
score; the candidate-minus-base difference gets a paired bootstrap 95% CI. The gate rules in `eval.gate` decide
PASS or FAIL.

Beside the golden set, `eval.suites` scores standard suites (IFEval, safety, lm-evaluation-harness tasks) for both systems and
`eval.judge` adds judge scores; their metrics get the same CIs and may carry gate rules. A rule on a judge
metric only passes when the judge passed its calibration (`tunegate judge calibrate`). With `eval.server`
both systems answer through an OpenAI-compatible server (vLLM multi-LoRA) instead of in-process.

Writes: samples.jsonl (per row: prompt, reference, both outputs and scores), scores.json, verdict.json,
suites.json and suite_samples.jsonl (when suites ran), abstain.json (with eval.abstain: the candidate's abstain
threshold, tuned on the validation rows before the golden set is answered; tunegate.evals.abstain), eval.html and
eval.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.data.golden import check_golden
from tunegate.data.records import prompt_text, reference_answer
from tunegate.evals import abstain
from tunegate.evals.answer import answer_golden
from tunegate.evals.custom import metric_files, metric_functions
from tunegate.evals.gate import check_rules, score_metrics, score_slices, verdict
from tunegate.core.io import atomic_write_json, atomic_write_jsonl
from tunegate.core.console import console
from tunegate.core.stage import Stage, StageResult, StageSpec, config_sections
from tunegate.report.eval import write_eval_report


def production_baseline(project) -> dict[str, Any] | None:
    """The registry's production version when eval.baseline is `production` (None: compare with the base model).
    Raises TunegateError when its stored adapter changed since it was registered."""
    from tunegate import registry

    if project.eval.baseline != "production":
        return None
    entry = registry.production(project.registry, project.name)
    if entry is not None:
        registry.check_stored(entry)
    return entry


def _same_base(production: dict[str, Any], adapter_dir) -> None:
    """The production adapter must sit on the candidate's base model. Raises TunegateError naming both."""
    import json

    def base_of(d):
        return json.loads((Path(d) / "adapter_config.json").read_text()).get("base_model_name_or_path")

    prod, cand = base_of(production["adapter_dir"]), base_of(adapter_dir)
    if prod != cand:
        raise TunegateError(f"{production['adapter_dir']}: production v{production['version']} is an adapter of {prod!r}, "
                            f"the candidate one of {cand!r}; rule: a baseline adapter must share the candidate's base model")


def _systems(project, tokenizer, base_path, adapter_dir, production):
    """The baseline (base model or production adapter) and the candidate as chat backends: in-process, or on eval.server."""
    ecfg = project.eval
    if ecfg.server:
        if production is not None:
            raise TunegateError("eval.server with eval.baseline: production is not supported; serve the production adapter and compare by hand")
        from tunegate.evals.backends import OpenAIChat

        srv = ecfg.server
        from tunegate.evals.backends import check_served_adapter

        if (adapter_dir.parent / "model").is_dir():
            raise TunegateError("eval.server: a full fine-tune is not an adapter; serve its model folder and evaluate in-process")
        from tunegate.recipes.classify import is_classifier

        if is_classifier(adapter_dir):
            raise TunegateError("eval.server with train.method classify: not supported; rule: vLLM's multi-LoRA does not "
                                "serve a classification head (modules_to_save); evaluate in-process (remove eval.server)")

        check_served_adapter(srv.base_url, srv.candidate_model, adapter_dir, srv.api_key_env)
        return {"baseline": OpenAIChat(srv.base_url, srv.base_model, srv.api_key_env, srv.concurrency),
                "candidate": OpenAIChat(srv.base_url, srv.candidate_model, srv.api_key_env, srv.concurrency)}
    from peft import PeftModel

    from tunegate.evals.backends import LocalChat, LocalClassifier
    from tunegate.models import fit_to_adapter, load_inference_model
    from tunegate.recipes.classify import is_classifier, load_trained

    if is_classifier(adapter_dir):  # method classify: the head answers in one forward pass; the base model generates
        if production is not None:
            raise TunegateError("eval.baseline: production with train.method classify is not supported; rule: a "
                                "classification head is compared with the base model (set eval.baseline: base)")
        classifier, head = load_trained(base_path, adapter_dir, tokenizer)
        return {"baseline": LocalChat(load_inference_model(base_path), tokenizer, ecfg.batch_size, "base model"),
                "candidate": LocalClassifier(classifier, tokenizer, head, ecfg.batch_size)}

    full_model = adapter_dir.parent / "model"
    if full_model.is_dir():  # `train.adapter: full`: the candidate is a whole model, the baseline the base model
        if production is not None:
            raise TunegateError("eval.baseline: production compares adapters on one base; a full fine-tune is compared with the base model")
        # the base model with rows for train.added_tokens (its tokenizer is the candidate's), as training started
        return {"baseline": LocalChat(fit_to_adapter(load_inference_model(base_path), full_model), tokenizer, ecfg.batch_size, "base model"),
                "candidate": LocalChat(load_inference_model(full_model), tokenizer, ecfg.batch_size, "candidate")}
    # grown first for the adapter's added tokens (models.fit_to_adapter); adapter name "default"
    model = PeftModel.from_pretrained(fit_to_adapter(load_inference_model(base_path), adapter_dir), str(adapter_dir))
    candidate = LocalChat(model, tokenizer, ecfg.batch_size, "candidate", adapter="default")
    if production is None:
        return {"baseline": LocalChat(model, tokenizer, ecfg.batch_size, "base model", adapter_off=True), "candidate": candidate}
    _same_base(production, adapter_dir)
    fit_to_adapter(model, production["adapter_dir"])
    model.load_adapter(production["adapter_dir"], adapter_name="production")
    return {"baseline": LocalChat(model, tokenizer, ecfg.batch_size, f"production v{production['version']}", adapter="production"),
            "candidate": candidate}


def _judge_golden(judge, golden, base_out, cand_out) -> dict[str, dict[str, list[float]]]:
    """judge_score (rating / 10; rows the judge could not rate for either system are left out) and
    judge_win_rate (candidate vs base, both orders, C22 ties) per golden row."""
    # the judge sees the whole prompt, system instruction included (the answer's form often lives there)
    questions = ["\n\n".join(m["content"] for m in r["messages"][:-1]) if "messages" in r else prompt_text(r) for r in golden]
    b, c = judge.grade(questions, base_out), judge.grade(questions, cand_out)
    keep = [i for i in range(len(golden)) if b[i] is not None and c[i] is not None]
    wins = judge.pairwise(questions, cand_out, base_out)
    cand_win = [{"first": 1.0, "tie": 0.5, "second": 0.0}[w["winner"]] for w in wins]
    return {"judge_score": {"baseline": [b[i] / 10 for i in keep], "candidate": [c[i] / 10 for i in keep]},
            "judge_win_rate": {"baseline": [1 - x for x in cand_win], "candidate": cand_win}}


def _judge_rules(rules, ecfg, judge_name: str | None) -> None:
    """A rule on a judge-made metric passes only when the judge passed calibration; the reason is noted."""
    from tunegate.catalog import JUDGE_METRICS, SAFETY_JUDGE_METRICS
    from tunegate.evals.judge import calibration_status

    judged = [r for r in rules if r["metric"] in JUDGE_METRICS or r["metric"] in SAFETY_JUDGE_METRICS]
    if not judged:
        return
    ok, why = calibration_status(ecfg.judge.calibration_file, judge_name)
    for r in judged:
        r["note"] = why
        if not ok:
            r["passed"] = False


def run(st: Stage) -> StageResult:
    import time

    import torch

    from tunegate.models import load_adapter_tokenizer, resolve_base_model

    project = st.project
    ecfg = project.eval
    custom = metric_functions(project)  # the project's metric code, loaded before any answer is generated
    base_path = resolve_base_model(project.base_model)
    trained = st.upstream_dir("train") / "adapter"
    # the tokenizer the candidate trained with (train.added_tokens), saved beside it; the base model's otherwise
    tokenizer = load_adapter_tokenizer(trained if trained.is_dir() else trained.parent / "model", base_path)
    golden = check_golden(project, st.upstream_dir("data"), tokenizer)  # control tokens too: its template renders them
    refs = [reference_answer(r) for r in golden]

    torch.manual_seed(ecfg.seed)
    production = production_baseline(project)
    if production is not None and production["run_id"] == st.run_dir.name:
        production = None  # this run is the production version: compare it with the base model, not itself
    systems = _systems(project, tokenizer, base_path, st.upstream_dir("train") / "adapter", production)
    baseline_name = f"production v{production['version']} (run {production['run_id']})" if production else "base model"
    if ecfg.baseline == "production" and production is None:
        baseline_name = "base model (no other production version)"

    # a production baseline that abstains when served (its bundle's eval/abstain.json) is scored as it is served
    base_rule = abstain.read_rule(Path(production["bundle_dir"]) / "eval") if production and production.get("bundle_dir") else None
    base_conf: list[float] | None = [] if base_rule else None
    t0 = time.perf_counter()
    base_out = answer_golden(systems["baseline"], tokenizer, golden, ecfg.max_new_tokens, "base model", confidences=base_conf)
    if base_rule:
        base_out = abstain.apply(base_out, base_conf, base_rule)
    base_s = time.perf_counter() - t0
    # eval.abstain: the candidate's confidence threshold, fixed or tuned on the validation rows before any golden answer
    rule = _abstain_rule(project, systems["candidate"], tokenizer, st.upstream_dir("data")) if ecfg.abstain else None
    t0 = time.perf_counter()
    cand_stopped: list[bool] = []  # in-process: whether each answer ended at a stop token (the GGUF parity gate reads it)
    cand_prob: list[float] = []  # method classify: the probability of each predicted label
    cand_conf: list[float] | None = [] if rule else None  # eval.abstain: each generated answer's confidence
    cand_out = answer_golden(systems["candidate"], tokenizer, golden, ecfg.max_new_tokens, "candidate", cand_stopped, cand_prob,
                             cand_conf)
    generated = None
    if rule:  # the answers under the threshold become the abstain label; what was generated stays in the samples
        generated, cand_out = cand_out, abstain.apply(cand_out, cand_conf, rule)
        rule["golden_rows_abstained"] = sum(c < rule["threshold"] for c in cand_conf)
        console.print(f"eval.abstain: the candidate answered {rule['abstain_label']} on {rule['golden_rows_abstained']} of "
                      f"{len(golden)} golden rows (confidence under {rule['threshold']:g}; {rule['rule']})")
        atomic_write_json(st.dir / abstain.ABSTAIN_FILE, rule)
    cand_s = time.perf_counter() - t0

    summary, per_row = score_metrics(ecfg.metrics, base_out, cand_out, refs, ecfg.bootstrap_samples, ecfg.seed, ecfg.json_schema,
                                     custom, st.project.task)

    judge, judge_counts = _judge(ecfg, golden, base_out, cand_out, summary)
    suite_details, suite_samples = _run_suites(ecfg, systems, judge, summary)

    rules = check_rules(ecfg.gate, summary)
    _judge_rules(rules, ecfg, judge.name if judge else None)
    result = verdict(rules)

    atomic_write_jsonl(st.dir / "samples.jsonl", _samples(golden, refs, base_out, cand_out, per_row, cand_stopped, cand_prob,
                                                          cand_conf, generated))
    if suite_details:
        atomic_write_json(st.dir / "suites.json", suite_details)
        atomic_write_jsonl(st.dir / "suite_samples.jsonl", suite_samples)
    n_new = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in (generated or cand_out)]
    scores = {
        "n": len(golden),
        "headline": ecfg.metrics[0],
        "baseline": baseline_name,
        "metrics": summary,
        "bootstrap_samples": ecfg.bootstrap_samples,
        "confidence": 0.95,
        "baseline_generation_s": round(base_s, 1),
        "candidate_generation_s": round(cand_s, 1),
        "candidate_stopped_before_max_new_tokens": sum(n < ecfg.max_new_tokens for n in n_new) / len(n_new),
    }
    if rule:
        scores["abstain"] = rule
    if base_rule:
        scores["baseline_abstain"] = base_rule
    if ecfg.slice_by:  # each row metric per value of a golden meta field (e.g. BFCL's category): reported, not gated
        groups = [str((r.get("meta") or {}).get(ecfg.slice_by)) for r in golden]
        scores["slices"] = {"by": ecfg.slice_by, "slices": score_slices(per_row, groups, ecfg.bootstrap_samples, ecfg.seed)}
    if judge_counts:
        scores["judge"] = judge_counts
    if project.task is not None and project.task.kind in ("classification", "multilabel"):  # the eval page's per-label table
        from tunegate.evals.labels import per_label_table

        scores["per_label"] = per_label_table({"baseline": base_out, "candidate": cand_out}, refs, project.task)
    atomic_write_json(st.dir / "scores.json", scores)
    atomic_write_json(st.dir / "verdict.json", {"verdict": result, "rules": rules})
    write_eval_report(st.dir, project.name)
    _print_results(summary, rules)
    for value, entry in (scores.get("slices") or {}).get("slices", {}).items():
        for name in (m for m in ecfg.metrics if m in entry):
            b, c = entry[name]["baseline"], entry[name]["candidate"]
            console.print(f"  {ecfg.slice_by}={value} (n={entry['n']}) {name}: base {b['mean']:.3f}, candidate {c['mean']:.3f} "
                          f"[{c['ci_low']:.3f}, {c['ci_high']:.3f}]")
    return StageResult(metrics=scores, verdict=result)


def _judge(ecfg, golden, base_out: list[str], cand_out: list[str], summary: dict[str, Any]):
    """The judge of `eval.judge` when grading or the safety suites use it (else None), and with `eval.judge.grade`
    its scores of both systems' golden answers, added to `summary`. Returns (judge, counts for scores.json: {}
    when it did not grade)."""
    if not (ecfg.judge and (ecfg.judge.grade or (ecfg.suites and ecfg.suites.safety_judge))):
        return None, {}
    from tunegate.evals import suites as suite_runs
    from tunegate.evals.judge import build_judge

    judge = build_judge(ecfg.judge)
    if not ecfg.judge.grade:
        return judge, {}
    judged = _judge_golden(judge, golden, base_out, cand_out)
    summary.update(suite_runs.bootstrap_summary(judged, ecfg.bootstrap_samples, ecfg.seed))
    return judge, {"judge": judge.name, "rows_rated_for_both": len(judged["judge_score"]["candidate"]), "rows": len(golden)}


def _run_suites(ecfg, systems, judge, summary: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The standard suites of `eval.suites` (IFEval, safety, lm-eval tasks) for both systems; their bootstrap summaries are added
    to `summary`. Returns (per suite: its details, metrics and wall time; the suites' sample rows)."""
    import time

    from tunegate.evals import suites as suite_runs

    details_by_suite: dict[str, Any] = {}
    suite_samples: list[dict[str, Any]] = []
    if not ecfg.suites:
        return details_by_suite, suite_samples
    sc = ecfg.suites
    runs = []
    if sc.ifeval:
        runs.append(("ifeval", lambda: suite_runs.run_ifeval(systems, sc.data_root, sc.limit, sc.ifeval_max_new_tokens)))
    if sc.safety:
        runs.append(("safety", lambda: suite_runs.run_safety(systems, sc.data_root, sc.safety, sc.limit, sc.safety_max_new_tokens,
                                                             judge if sc.safety_judge else None)))
    if sc.lm_eval:
        from tunegate.evals.harness import run_lm_eval

        runs.append(("lm_eval", lambda: run_lm_eval(systems, sc.lm_eval, ecfg.gate)))
    for name, go in runs:
        t0 = time.perf_counter()
        rows, details, samples = go()
        metrics = suite_runs.bootstrap_summary(rows, ecfg.bootstrap_samples, ecfg.seed)
        summary.update(metrics)
        details_by_suite[name] = {**details, "metrics": metrics, "wall_s": round(time.perf_counter() - t0, 1)}
        suite_samples += samples
    return details_by_suite, suite_samples


def _samples(golden, refs, base_out, cand_out, per_row, cand_stopped: list[bool] | None = None,
             cand_prob: list[float] | None = None, cand_conf: list[float] | None = None,
             generated: list[str] | None = None) -> list[dict[str, Any]]:
    """Per golden row: prompt, reference, both systems' outputs and per-row scores, (answered in-process)
    `candidate_stopped`: whether the candidate's answer ended at a stop token rather than at max_new_tokens,
    (method classify) `candidate_probability`: the head's probability of its label, and (eval.abstain)
    `candidate_confidence`: its answer's confidence, with `candidate_generated`: what it generated before the
    abstain rule replaced it."""
    samples = []
    for i, (g, ref, bo, co) in enumerate(zip(golden, refs, base_out, cand_out)):
        row = {"id": g["id"], "prompt": prompt_text(g), "reference": ref, "baseline_output": bo, "candidate_output": co}
        if cand_stopped:
            row["candidate_stopped"] = cand_stopped[i]
        if cand_prob:
            row["candidate_probability"] = cand_prob[i]
        if cand_conf:
            row["candidate_confidence"] = cand_conf[i]
            row["candidate_generated"] = generated[i]
        for name, scores in per_row.items():
            row[f"baseline_{name}"] = scores["baseline"][i]
            row[f"candidate_{name}"] = scores["candidate"][i]
        samples.append(row)
    return samples


MAX_ABSTAIN_VAL_ROWS = 2000  # in-scope validation rows answered to tune eval.abstain's threshold


def _abstain_rule(project, candidate, tokenizer, data_dir: Path) -> dict[str, Any]:
    """eval.abstain's rule for the candidate: {abstain_label, threshold, rule, confidence, val_rows (when tuned)}.
    The threshold is eval.abstain.threshold, or the val_abstain_rate quantile of the candidate's confidences on the
    in-scope validation rows (data stage's val.jsonl, at most MAX_ABSTAIN_VAL_ROWS; tunegate.evals.abstain.tune_threshold),
    never the golden set.

    Raises:
        TunegateError: a candidate that does not generate in-process, or no in-scope validation row to tune on.
    """
    from tunegate.core.io import read_jsonl
    from tunegate.evals.backends import LocalChat

    if not isinstance(candidate, LocalChat):
        raise TunegateError("eval.abstain: the candidate must generate in-process (its token probabilities give the confidence)")

    def confidences_of(rows: list) -> list[float]:
        conf: list[float] = []
        answer_golden(candidate, tokenizer, rows, project.eval.max_new_tokens, "candidate: validation rows (abstain threshold)",
                      confidences=conf)
        return conf

    return abstain.tuned_rule(project.eval.abstain, project.task.abstain_label, read_jsonl(data_dir / "val.jsonl"),
                              confidences_of, "validation rows (val.jsonl)", MAX_ABSTAIN_VAL_ROWS)


def _print_results(summary: dict[str, Any], rules: list[dict[str, Any]]) -> None:
    for name, s in summary.items():
        b, c, d = s["baseline"], s["candidate"], s["delta"]
        console.print(
            f"{name}: base {b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}], "
            f"candidate {c['mean']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}], "
            f"difference {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        )
    for r in rules:
        note = f" ({r['note']})" if r.get("note") else ""
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        console.print(f"  {'[green]PASS[/green]' if r['passed'] else '[red]FAIL[/red]'} {r['description']}: {value}{note}", highlight=False)


def inputs(project) -> dict[str, Path]:
    """Suite files, project-defined metric files, the judge's calibration (a new one changes what the gate may count) and, with
    `eval.baseline: production`, the promoted adapter (a newly promoted version is a new baseline)."""
    files = project.eval.suites.files() if project.eval.suites else {}
    files.update(metric_files(project))  # project-defined metrics (eval.custom_metrics): their code decides scores
    judge = project.eval.judge
    if judge and judge.calibration_file.is_file():
        files["judge_calibration"] = judge.calibration_file
    if project.eval.baseline == "production":
        from tunegate.registry import production

        entry = production(project.registry, project.name)
        if entry is not None:
            files["production_adapter"] = Path(entry["adapter_dir"]) / "adapter_model.safetensors"
    return files


SPEC = StageSpec(name="eval", run=run, upstream=("data", "train"), config=config_sections("base_model", "task", "eval"), inputs=inputs)
