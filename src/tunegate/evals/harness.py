"""lm-evaluation-harness tasks as a tunegate suite (`eval.suites.lm_eval`), scored per row so every task metric
gets the same paired-bootstrap CI and gate rules as a golden-set metric.

lm-eval (EleutherAI, https://github.com/EleutherAI/lm-evaluation-harness) loads the tasks, renders their prompts
and few-shot examples, and scores each document; tunegate hands it the models it already loaded for the golden
set (`HFLM(pretrained=<model instance>)`), the base model with its adapter disabled and the candidate with it
merged (backends.LocalChat.answering), and takes the per-document scores from lm-eval's logged samples. lm-eval's
own aggregate (and its bootstrap standard error) is kept in the details; the CIs tunegate gates on are its own.

Metric names: `lm_eval.<task>.<metric>`, with `.<filter>` appended when the task's filter is not lm-eval's
"none" (gsm8k: `lm_eval.gsm8k.exact_match.strict-match`). A group (e.g. `mmlu`) pools the rows of its subtasks
(the micro average). A metric lm-eval scores over the whole corpus rather than per document (f1, bleu, mcc) has
no per-row scores: it is recorded in the details and cannot carry a gate rule.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import time
from typing import TYPE_CHECKING, Any, Mapping

from tunegate import TunegateError
from tunegate.catalog import LM_EVAL_PREFIX
from tunegate.core.console import console

if TYPE_CHECKING:
    from tunegate.config import LmEvalConfig

PerRow = dict[str, dict[str, list[float]]]  # metric -> system -> per-row scores (same row order for every system)


def metric_name(task: str, metric: str, filter_name: str) -> str:
    """`lm_eval.<task>.<metric>`, plus `.<filter>` unless the filter is lm-eval's default "none"."""
    return f"{LM_EVAL_PREFIX}{task}.{metric}" + ("" if filter_name == "none" else f".{filter_name}")


def leaves(name: str, group_subtasks: Mapping[str, list[str]], tags: Mapping[str, list[str]] | None = None) -> list[str]:
    """The leaf tasks under `name`, in lm-eval's order: a group's subtasks (recursively), a tag's member tasks
    (lm-eval expands a tag into its tasks and logs no group for it), else `name` itself. A plain task may be listed
    in `group_subtasks` with no subtasks (lm-eval before 0.4.13 lists every task so)."""
    if group_subtasks.get(name):
        return [leaf for sub in group_subtasks[name] for leaf in leaves(sub, group_subtasks, tags)]
    if tags and tags.get(name):
        return [leaf for sub in tags[name] for leaf in leaves(sub, group_subtasks, tags)]
    return [name]


def task_manager(cfg: LmEvalConfig) -> tuple[Any, dict[str, list[str]]]:
    """lm-eval's TaskManager over its own tasks and `cfg.include` (it indexes every task YAML: about 5 s here, so
    one serves both systems), and {requested tag: its member tasks}. Raises TunegateError naming the task names
    lm-eval does not know."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        manager = TaskManager(include_path=str(cfg.include) if cfg.include is not None else None)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {cfg.include}" if cfg.include else " (set eval.suites.lm_eval.include to a folder of task YAMLs)"
        raise TunegateError(f"eval.suites.lm_eval.tasks: {unknown} not found among lm-eval's tasks{where}")
    tags = {t: sorted(n for n, entry in manager.task_index.items() if t in getattr(entry, "tags", ()))
            for t in cfg.tasks if t in set(getattr(manager, "all_tags", []))}
    return manager, tags


def evaluate(backend, cfg: LmEvalConfig, manager: Any) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on one system (a backends.LocalChat) with its own samples logged, over the tasks
    of `manager` (task_manager).

    The model is the system's as it answers (adapter disabled or merged). Relative `data_files` of the task YAMLs
    are read from `cfg.include` (lm-eval's `datasets` calls resolve them against the working folder, so the call
    runs there). Raises TunegateError when a task's data file is missing.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    include = str(cfg.include) if cfg.include is not None else None
    with _quiet_lm_eval():
        with backend.answering(), (contextlib.chdir(cfg.include) if include else contextlib.nullcontext()):
            lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=cfg.batch_size)
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=list(cfg.tasks), task_manager=manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                    log_samples=True, bootstrap_iters=0, apply_chat_template=cfg.chat_template,
                    fewshot_as_multiturn=cfg.chat_template)
            except FileNotFoundError as e:  # a task's data file is missing
                raise TunegateError(f"eval.suites.lm_eval: lm-eval could not run {cfg.tasks}: {e}") from e
    if out is None:
        raise TunegateError("eval.suites.lm_eval: lm-eval returned no results")
    return out


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's call without its chatter on the console: what it and `datasets` write to stderr (their tqdm bars,
    one line per redraw off a terminal) goes to the run's log file instead (core.console.log_only); its warning
    that a model instance ignores model_args (expected here) is dropped, and so is the `git describe` it runs to
    record a commit hash (which prints "fatal: not a git repository" outside one)."""
    import io
    import re
    from unittest import mock

    import lm_eval.evaluator

    from tunegate.core.console import log_only

    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    err = io.StringIO()
    try:
        with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None), contextlib.redirect_stderr(err):
            yield
    finally:
        log.setLevel(level)
        for line in err.getvalue().splitlines():  # a bar's last redraw is the line worth keeping
            last = re.split(r"\r", line.rstrip("\r"))[-1].strip()
            if last:
                log_only(f"lm-eval: {last}")


def per_row_scores(out: Mapping[str, Any], tasks: list[str], tags: Mapping[str, list[str]] | None = None
                   ) -> tuple[dict[str, dict[tuple, float]], dict[str, list[str]]]:
    """Per tunegate metric, {(leaf task, doc_id): score} from lm-eval's logged samples; and per requested task the
    metrics that have no per-row mean (not gateable).

    A per-row value counts only when its mean over a leaf task's rows is lm-eval's own aggregate for that task
    (a `mean` aggregation): a number logged per row but aggregated otherwise (loglikelihood tasks log each row's
    log-likelihood under `perplexity`, aggregated as exp(-mean); median; corpus f1 or bleu) is not a per-row score.
    Raises TunegateError for a requested name with no logged rows at all.
    """
    groups = out.get("group_subtasks") or {}
    results = out.get("results") or {}
    scores: dict[str, dict[tuple, float]] = {}
    corpus_only: dict[str, list[str]] = {}
    for name in tasks:
        names = leaves(name, groups, tags)
        if not any(out["samples"].get(leaf) for leaf in names):
            raise TunegateError(f"eval.suites.lm_eval: {name!r} logged no rows (tasks looked for: {', '.join(names)})")
        for leaf in names:
            by_metric: dict[tuple[str, str], dict[int, float]] = {}
            for sample in out["samples"].get(leaf, []):
                for metric in sample.get("metrics", []):
                    value = sample.get(metric)
                    filt = sample.get("filter", "none")
                    if isinstance(value, numbers.Real):  # bool included: acc and exact_match come as 0/1
                        by_metric.setdefault((metric, filt), {})[sample["doc_id"]] = float(value)
                    else:
                        by_metric.setdefault((metric, filt), {})
            for (metric, filt), rows in by_metric.items():
                key = metric_name(name, metric, filt)
                agg = results.get(leaf, {}).get(f"{metric},{filt}")
                if rows and isinstance(agg, numbers.Real) and abs(sum(rows.values()) / len(rows) - float(agg)) < 1e-9:
                    scores.setdefault(key, {}).update({(leaf, doc): v for doc, v in rows.items()})
                elif key not in corpus_only.setdefault(name, []):
                    corpus_only[name].append(key)
    for name, keys in corpus_only.items():  # a metric that is a mean in one leaf and not in another is no mean
        for key in keys:
            scores.pop(key, None)
    return scores, corpus_only


def higher_is_better(out: Mapping[str, Any], tasks: list[str], tags: Mapping[str, list[str]] | None = None) -> dict[str, bool]:
    """Per tunegate metric name, lm-eval's `higher_is_better` for it (as its task config or metric registry says),
    where every leaf task under the name agrees."""
    groups, hib = out.get("group_subtasks") or {}, out.get("higher_is_better") or {}
    found: dict[str, set[bool]] = {}
    for name in tasks:
        for leaf in leaves(name, groups, tags):
            for metric, better in (hib.get(leaf) or {}).items():
                if isinstance(better, bool):
                    found.setdefault(f"{LM_EVAL_PREFIX}{name}.{metric}", set()).add(better)
    return {m: v.pop() for m, v in found.items() if len(v) == 1}


def aggregates(out: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's own aggregate per task and group ({"acc,none": 0.61, ...}), numbers only (no "N/A" stderr)."""
    return {task: {k: v for k, v in body.items() if isinstance(v, numbers.Real) and not isinstance(v, bool) and "," in k}
            for task, body in (out.get("results") or {}).items()}


def run_lm_eval(systems: Mapping[str, Any], cfg: LmEvalConfig, rules: list[Any]) -> tuple[PerRow, dict, list[dict]]:
    """The tasks of `cfg` for each system (backends.LocalChat). Returns (per_row, details, samples) as the other
    suites of tunegate.evals.suites do.

    rules: the gate's rules (config.GateRule). After the first system ran (before the second spends its time), a
    rule on an `lm_eval.` metric the tasks do not score per row is refused, naming what they do score, and so is a
    rule whose `lower_is_better` contradicts lm-eval's `higher_is_better` for the metric. Raises TunegateError for
    those, and for a system that is not in-process (an OpenAI-compatible server: lm-eval needs log-likelihoods).
    """
    import lm_eval

    details: dict[str, Any] = {"tasks": list(cfg.tasks), "include": str(cfg.include) if cfg.include else None,
                               "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "chat_template": cfg.chat_template,
                               "lm_eval_version": getattr(lm_eval, "__version__", None)}
    manager, tags = task_manager(cfg)
    by_system: dict[str, dict[str, dict[tuple, float]]] = {}
    samples_by_key: dict[tuple, dict[str, Any]] = {}
    for system, backend in systems.items():
        if not hasattr(backend, "answering"):
            raise TunegateError(f"eval.suites.lm_eval: the {system} is {backend.name}, not an in-process model")
        console.print(f"- lm_eval: {', '.join(cfg.tasks)} for the {system} ({backend.name}) ...", markup=False, highlight=False)
        t0 = time.perf_counter()
        out = evaluate(backend, cfg, manager)
        console.print(f"- lm_eval: {system} done in {time.perf_counter() - t0:.1f} s",
                      markup=False, highlight=False)
        scores, corpus_only = per_row_scores(out, cfg.tasks, tags)
        gated = [r for r in rules if r.metric.startswith(LM_EVAL_PREFIX)]
        missing = [r.metric for r in gated if r.metric not in scores]
        if missing:
            corpus = sorted(m for ms in corpus_only.values() for m in ms)
            raise TunegateError(f"eval.gate: {missing} not scored per row by lm-eval; these are: {', '.join(sorted(scores)) or 'none'}"
                                + (f" (no per-row mean, not gateable: {', '.join(corpus)})" if corpus else ""))
        better = higher_is_better(out, cfg.tasks, tags)
        details["higher_is_better"] = better
        for r in gated:
            base = next((m for m in better if r.metric == m or r.metric.startswith(m + ".")), None)  # without .<filter>
            if base is not None and better[base] == r.lower_is_better:
                raise TunegateError(f"eval.gate: the rule on {r.metric} says lower_is_better: {str(r.lower_is_better).lower()}, "
                                    f"but lm-eval says higher is {'better' if better[base] else 'worse'} for it; set "
                                    f"lower_is_better: {str(not better[base]).lower()}")
        by_system[system] = scores
        details[system] = {"results": aggregates(out), "n_shot": out.get("n-shot"), "corpus_only_metrics": corpus_only}
        details.setdefault("versions", out.get("versions"))
        for leaf, rows in (out.get("samples") or {}).items():
            for s in rows:
                key = (leaf, s["doc_id"], s.get("filter", "none"))
                row = samples_by_key.setdefault(key, {"suite": "lm_eval", "id": f"lm_eval:{leaf}:{s['doc_id']}:{key[2]}",
                                                      "task": leaf, "prompt": _prompt(s), "target": str(s.get("target"))})
                row[f"{system}_output"] = _response(s)
                for metric in s.get("metrics", []):
                    if isinstance(s.get(metric), numbers.Real):
                        row[f"{system}_{metric}"] = float(s[metric])
    per_row: PerRow = {}
    for metric in sorted({m for scores in by_system.values() for m in scores}):
        keys = sorted(set.intersection(*(set(scores.get(metric, {})) for scores in by_system.values())), key=str)
        per_row[metric] = {system: [scores[metric][k] for k in keys] for system, scores in by_system.items()}
    details["n_rows"] = {m: len(next(iter(v.values()))) for m, v in per_row.items()}
    return per_row, details, list(samples_by_key.values())


def _prompt(sample: Mapping[str, Any]) -> str:
    """The rendered prompt of a logged sample (the context of its first request)."""
    args = sample.get("arguments")
    first = args[0] if isinstance(args, (list, tuple)) and args else None
    if isinstance(first, (list, tuple)) and first:  # lm-eval logs each request's args: (context, continuation...)
        return str(first[0])
    return ""


def _response(sample: Mapping[str, Any]) -> Any:
    """What the system answered, after lm-eval's filters: the generated text, or the chosen option's index for
    multiple choice (the option with the highest log-likelihood)."""
    resps = sample.get("filtered_resps")
    if isinstance(resps, list) and resps and all(isinstance(r, (list, tuple)) and r and isinstance(r[0], numbers.Real) for r in resps):
        lls = [float(r[0]) for r in resps]  # (log-likelihood, is_greedy) per option
        return max(range(len(lls)), key=lls.__getitem__)
    if isinstance(resps, list) and len(resps) == 1:
        return resps[0]
    return resps

