"""Audit stage: before any training spend, what do the cheap options score on the frozen golden set?

Every candidate answers the same golden rows and gets the headline metric with a bootstrap 95% CI, seconds
per request (batched, amortised), tokens per request, and a cost per 1,000 requests from the price table:

    zero_shot            the base model with the project's own prompt (what the eval gate calls the baseline)
    prompt_optimization  instruction variants x few-shot counts, picked on dev rows taken from the training
                         split (never the golden set); only the winner is scored on the golden set
    knn_fewshot          the `fewshot_k` most similar training rows (MiniLM) as in-context examples
    knn_classifier       labelled tasks: a similarity-weighted kNN vote over MiniLM embeddings, no LLM at all
                         (task.kind multilabel: label voting, a label kept when its weighted share of the k
                         neighbours reaches a threshold; k and the threshold picked on dev rows)
    knn_classifier_abstain
                         task.abstain_label: the kNN vote, abstaining when the nearest training row's similarity
                         is under a threshold tuned on dev rows (tunegate.stages.audit._tune_abstain)
    rag_bm25, rag_dense, rag_hybrid
                         with `audit.corpus`: the `top_k` passages from bm25s, MiniLM, or both fused by
                         reciprocal rank, put before the question; retrieval recall@k where gold passages are known
    lora_probe           a short, budgeted LoRA fine-tune on a sample of the training rows: a lower bound of
                         what training buys (its cost is extrapolated to a full run); for train.method classify
                         the classification head, its abstain threshold tuned on the dev rows, answering the
                         golden rows in one forward pass
    lora_probe+rag       the probe's adapter with the hybrid RAG prompt

`tunegate.decide.recommend` turns the numbers into one method through the same tree as `tunegate decide`
(the numbers answer the questions they can, and overrule the user's answers when they disagree). The verdict
is TRAIN or NO_TRAIN; `tunegate run` stops before training on NO_TRAIN unless told `--train-anyway`.

Writes: audit.json (everything, machine-readable, with the project checked against the anti-pattern table of
`tunegate.preflight`), samples.jsonl (per golden row: each candidate's output and score), prompt_search.json,
audit.png, audit.html.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunegate import TunegateError
from tunegate.core.console import console, progress
from tunegate.core.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from tunegate.core.stage import Stage, StageResult, StageSpec
from tunegate.data.format import apply_system_policy, generation_prompt, supports_system_role
from tunegate.data.golden import check_golden
from tunegate.data.records import prompt_text, reference_answer
from tunegate.evals import abstain
from tunegate.evals.answer import golden_prompts
from tunegate.evals.bootstrap import bootstrap_ci
from tunegate.evals.custom import metric_files, metric_functions, score_rows
from tunegate.evals.gate import corpus_scores
from tunegate.evals.labels import MULTILABEL_ROW, canonical_labels, closed_label_set, label_set
from tunegate.evals.metrics import ROW_METRICS, normalize_answer
from tunegate.preflight import anti_pattern_table, instruct_tuned
from tunegate.prices import load_prices

# The eval settings the audit reads: changing suites, the judge, the server or the baseline must not rerun it.
AUDIT_EVAL_KEYS = ("metrics", "custom_metrics", "json_schema", "max_new_tokens", "batch_size", "bootstrap_samples", "seed", "gate", "abstain")
# The train settings the audit's probe does not train with (it drops these and sets its own steps, logging and
# budget; `_train_probe`): they only scale the audit's projection of a full run's cost, so changing them must not
# rerun a 15-minute audit. The projection records the settings it assumed (audit.json probe.full_run_assumes).
AUDIT_IGNORED_TRL_KEYS = ("max_steps", "num_train_epochs", "eval_steps", "save_steps", "logging_steps")
PASSAGE_WORDS = 200  # each retrieved passage is cut to this many words before it goes into the prompt
# Out-of-scope dev rows when the training rows have none (held-out intents): this share of the training labels is
# hidden from the kNN pool, and the dev rows of those labels are treated as out of scope (_tune_abstain).
SIMULATED_OOS_SHARE = 0.2
MULTILABEL_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)  # label-share thresholds the multi-label kNN picks from on dev rows


def headline_metric(project) -> str:
    """The audit's metric: eval.metrics[0] if it is a row metric (per-row scores are needed; a project-defined one
    is, and set_match / jaccard of a multi-label task are), else exact_match."""
    first = project.eval.metrics[0]
    lower = any(r.metric == first and r.lower_is_better for r in project.eval.gate)  # the audit ranks higher-is-better
    return first if first in ROW_METRICS or first in MULTILABEL_ROW or (first in project.eval.custom_metrics and not lower) else "exact_match"


def quality_bar(project, metric: str) -> float | None:
    """audit.bar, else the gate's `min` on the headline metric, else None."""
    if project.audit.bar is not None:
        return project.audit.bar
    mins = [r.min for r in project.eval.gate if r.metric == metric and r.min is not None]
    return max(mins) if mins else None


def task_labels(train: list[dict[str, Any]], golden: list[dict[str, Any]], task=None) -> list[str] | None:
    """The labels of a classification or multi-label task: `task.labels`, else those of the training answers (with
    the abstain label). Without a task section: few distinct short answers that cover the golden set, else None."""
    if task is not None and task.kind == "multilabel":
        return task.labels or sorted(set().union(*(label_set(reference_answer(r), task) for r in train)))
    if task is not None and task.kind == "classification":
        labels = task.labels or sorted({reference_answer(r) for r in train})
        return labels + [task.abstain_label] if task.abstain_label and task.abstain_label not in labels else labels
    return closed_label_set([reference_answer(r) for r in train], [reference_answer(g) for g in golden])


def instruction_of(record: dict[str, Any]) -> str | None:
    msgs = record.get("messages") or []
    return msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None


def chat_prompt(tokenizer, has_system: bool, instruction: str | None, shots: list[dict[str, Any]], query: str) -> str:
    """A rendered generation prompt: optional system instruction, few-shot turns, then the query."""
    messages = [{"role": "system", "content": instruction}] if instruction else []
    for s in shots:
        messages += [{"role": "user", "content": prompt_text(s)}, {"role": "assistant", "content": reference_answer(s)}]
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
    return generation_prompt(tokenizer, {"messages": apply_system_policy(messages, "auto", has_system)})


def rag_query(query: str, passages: list[str]) -> str:
    cut = [" ".join(p.split()[:PASSAGE_WORDS]) for p in passages]
    context = "\n\n".join(f"[{i}] {p}" for i, p in enumerate(cut, start=1))
    return f"Context:\n{context}\n\nQuestion: {query}"


class _Scorer:
    """Scores one candidate's answers on the golden rows and records its cost figures."""

    def __init__(self, metric: str, refs: list[str], n_samples: int, seed: int, tokenizer, prices: dict[str, Any],
                 also: tuple[str, ...] = (), custom: dict[str, Any] | None = None, task=None):
        self.metric, self.refs, self.custom, self.task = metric, refs, custom or {}, task
        known = set(ROW_METRICS) | set(self.custom) | (set(MULTILABEL_ROW) if task is not None and task.kind == "multilabel" else set())
        self.also = [m for m in also if m in known and m != metric]  # the project's other row metrics, reported too
        self.corpus = [m for m in also if m not in known]  # macro_f1 and the label metrics (corpus_scores)
        self.n_samples, self.seed, self.tokenizer, self.prices = n_samples, seed, tokenizer, prices
        self.results: list[dict[str, Any]] = []
        self.outputs: dict[str, list[str]] = {}

    def rows(self, metric: str, outputs: list[str], refs: list[str] | None = None) -> list[float]:
        """Per row, `metric` of `outputs` against `refs` (default: the golden references); a project-defined metric
        goes through tunegate.evals.custom.score_rows."""
        refs = self.refs if refs is None else refs
        if metric in self.custom:
            return score_rows(metric, self.custom[metric], outputs, refs)
        if metric in MULTILABEL_ROW:
            return [MULTILABEL_ROW[metric](o, r, self.task) for o, r in zip(outputs, refs)]
        return [ROW_METRICS[metric](o, r) for o, r in zip(outputs, refs)]

    def add(self, name: str, outputs: list[str], wall_s: float, prompts: list[str] | None, trains: bool, **extra) -> dict:
        rows = self.rows(self.metric, outputs)
        ci = bootstrap_ci(rows, self.n_samples, self.seed)
        n = len(outputs)
        tok = (lambda t: len(self.tokenizer(t, add_special_tokens=False)["input_ids"]))
        prompt_tokens = sum(tok(p) for p in prompts) / n if prompts else 0.0
        new_tokens = sum(tok(o) for o in outputs) / n if prompts else 0.0
        s_per_req = wall_s / n
        usd_hour = self.prices["machines"][self.prices["serving_machine"]]["usd_per_hour"]
        result = {
            "name": name, "trains": trains, "metric": self.metric, **ci.as_dict(), "rows": rows,
            "seconds_per_request": round(s_per_req, 4),
            "prompt_tokens_per_request": round(prompt_tokens, 1), "new_tokens_per_request": round(new_tokens, 1),
            "usd_per_1k_requests": round(s_per_req * 1000 / 3600 * usd_hour, 5),
            "other_metrics": {**{m: bootstrap_ci(self.rows(m, outputs), self.n_samples, self.seed).as_dict() for m in self.also},
                              **corpus_scores(self.corpus, outputs, self.refs, self.n_samples, self.seed, self.task)},
            **extra,
        }
        self.results.append(result)
        self.outputs[name] = outputs
        console.print(f"  {name:<20} {self.metric} {ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}]  "
                      f"{s_per_req * 1000:.0f} ms/request, {prompt_tokens + new_tokens:.0f} tokens/request")
        return result


def read_corpus(cfg) -> tuple[list[str], list[str]]:
    """(ids, texts) of the corpus JSONL. Raises TunegateError naming the line of a bad document."""
    from tunegate.core.io import iter_jsonl

    ids, texts = [], []
    if not cfg.path.is_file():
        raise TunegateError(f"{cfg.path}: corpus file not found (audit.corpus.path)")
    for lineno, doc, error in iter_jsonl(cfg.path):
        try:
            if error is not None:
                raise error
            ids.append(str(doc[cfg.id_field]))
            texts.append(str(doc[cfg.text_field]))
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise TunegateError(f"{cfg.path}:{lineno}: not a document with '{cfg.id_field}' and '{cfg.text_field}' ({exc})") from None
    if not texts:
        raise TunegateError(f"{cfg.path}: the corpus is empty")
    return ids, texts


@dataclass
class _Audit:
    """What every candidate family works with: the golden rows, the training split cut into dev and pool rows, the
    base model and tokenizer, and the scorer the candidates are added to (in the order they ran)."""

    project: Any
    metric: str
    golden: list[dict[str, Any]]
    queries: list[str]  # the golden rows' user prompts
    prompts: list[str]  # the golden rows rendered as the eval gate renders them (evals.answer.golden_prompts)
    dev: list[dict[str, Any]]  # training rows the prompt search and the kNN k are picked on
    pool: list[dict[str, Any]]  # the other training rows: few-shot examples, kNN neighbours, probe rows
    n_train: int
    labels: list[str] | None
    base_instruction: str | None
    tokenizer: Any
    has_system: bool
    model: Any  # the base model; the probe's PeftModel once the probe trained
    scorer: _Scorer
    want: Callable[[str], bool]  # is this candidate selected (audit.candidates; empty: all)

    def generate(self, prompts: list[str], desc: str, confidences: list[float] | None = None) -> list[str]:
        from tunegate.evals.generate import generate

        acfg = self.project.audit
        max_new = acfg.max_new_tokens or self.project.eval.max_new_tokens
        return generate(self.model, self.tokenizer, prompts, max_new, acfg.batch_size or self.project.eval.batch_size, desc=desc,
                        confidences=confidences)

    def timed_generate(self, prompts: list[str], desc: str, extra_s: float = 0.0,
                       confidences: list[float] | None = None) -> tuple[list[str], float]:
        """(outputs, seconds): generation wall time plus `extra_s` (a retrieval's search time). `confidences`: filled
        with each answer's confidence (tunegate.evals.abstain)."""
        t0 = time.perf_counter()
        out = self.generate(prompts, desc, confidences)
        return out, time.perf_counter() - t0 + extra_s


def run(st: Stage) -> StageResult:
    project = st.project
    prices = load_prices(project.audit.prices)
    metric = headline_metric(project)
    bar = quality_bar(project, metric)
    a = _prepare(st, metric, bar, prices)

    # one bar over the four families of candidates (each family's generation shows its own bar inside it)
    with progress("audit candidates", 4) as advance:
        search = _prompt_candidates(a)  # zero_shot, prompt_optimization
        atomic_write_json(st.dir / "prompt_search.json", search)
        advance(info=_best_so_far(a))
        _knn_candidates(a)  # knn_fewshot, knn_classifier
        advance(info=_best_so_far(a))
        retrieval, rag_prompts = _rag_candidates(a)  # rag_bm25, rag_dense, rag_hybrid
        advance(info=_best_so_far(a))
        probe = _probe_candidates(st, a, prices, rag_prompts)  # lora_probe, lora_probe+rag
        advance(info=_best_so_far(a))
    if not a.scorer.results:
        raise TunegateError(f"{project.source_file}: audit.candidates selects nothing that applies to this project")

    rec = _recommend(a, bar, probe, prices)
    answers_used = {**{q: m["answer"] for q, m in rec["measured"].items()}, **project.audit.answers, **rec["assumed"]}
    report = {
        "project": project.name,
        "metric": metric,
        "bar": bar,
        "min_gain": project.audit.min_gain,
        "golden_rows": len(a.golden),
        "task": a.project.task.kind if a.project.task else "classification" if a.labels else "generation",
        "labels": len(a.labels) if a.labels else None,
        "candidates": [{k: v for k, v in c.items() if k != "rows"} for c in a.scorer.results],
        "retrieval": retrieval,
        "probe": {k: v for k, v in probe.items() if k != "adapter"} if probe else None,
        "recommendation": rec,
        "anti_patterns": [f.to_json() for f in anti_pattern_table(project, a.n_train, instruct_tuned(a.tokenizer), answers_used)],
        "prices": prices,
    }
    atomic_write_json(st.dir / "audit.json", report)
    atomic_write_jsonl(st.dir / "samples.jsonl", _samples(a))
    from tunegate.report.audit import render

    render(report, st.dir)
    _print_recommendation(rec)
    console.print(f"audit written: {st.final_dir / 'audit.html'}")
    return StageResult(metrics={"recommendation": rec["decision"]["method"], "best": rec["best_no_training"], "gap": rec["gap"]},
                       verdict=rec["verdict"])


def _best_so_far(a: _Audit) -> str:
    """`best zero_shot 0.417`: the progress bar's note after each family of candidates."""
    if not a.scorer.results:
        return ""
    best = max(a.scorer.results, key=lambda c: c["mean"])
    return f"best {best['name']} {best['mean']:.3f}"


def _prepare(st: Stage, metric: str, bar: float | None, prices: dict[str, Any]) -> _Audit:
    """The checked golden rows (sampled to audit.golden_rows), the demonstration rows split into dev and pool, the
    base model and tokenizer. Raises TunegateError when the golden set fails its checks or there are no
    demonstration rows."""
    import torch

    from tunegate.models import fit_embeddings, load_model, load_tokenizer, resolve_base_model

    project, acfg = st.project, st.project.audit
    data_dir = st.upstream_dir("data")
    base_path = resolve_base_model(project.base_model)
    tokenizer = load_tokenizer(base_path, project.train.added_tokens)  # the data stage's, as the probe trains with
    golden = check_golden(project, data_dir, tokenizer)
    if acfg.golden_rows and acfg.golden_rows < len(golden):
        keep = sorted(random.Random(acfg.seed).sample(range(len(golden)), acfg.golden_rows))
        golden = [golden[i] for i in keep]
    # Demonstrations for few-shot, dev rows and the probe: preference rows with their chosen answer, KTO rows
    # labelled desirable. Raw text (continued pretraining) has none: the audit is skipped for it (`skip`).
    train = [r for r in read_jsonl(data_dir / "train.jsonl") if "messages" in r or "prompt" in r]
    train = [{k: v for k, v in r.items() if k not in ("rejected", "label")} for r in train if r.get("label", True)]
    if not train:
        raise TunegateError(f"{data_dir / 'train.jsonl'}: no demonstration rows; the audit needs them for few-shot and dev rows")
    rng = random.Random(acfg.seed)
    dev_idx = set(rng.sample(range(len(train)), min(acfg.dev_rows, max(len(train) // 2, 1))))
    dev = [r for i, r in enumerate(train) if i in dev_idx]
    pool = [r for i, r in enumerate(train) if i not in dev_idx]
    labels = task_labels(train, golden, project.task)
    wanted = set(acfg.candidates or [])
    kind = project.task.kind if project.task else "classification" if labels else "generation"
    console.print(f"audit on {len(golden)} golden rows, metric {metric}, bar {bar if bar is not None else 'none'}; "
                  f"task: {kind}{', ' + str(len(labels)) + ' labels' if labels else ''}; "
                  f"{len(dev)} dev rows, {len(pool)} pool rows")

    torch.manual_seed(acfg.seed)
    model = load_model(base_path)
    fit_embeddings(model, tokenizer, project.train.added_tokens)  # rows for the added tokens, as training starts from
    refs = [reference_answer(r) for r in golden]
    return _Audit(
        project=project, metric=metric, golden=golden, queries=[prompt_text(r) for r in golden],
        prompts=golden_prompts(tokenizer, golden),
        dev=dev, pool=pool, n_train=len(train), labels=labels, base_instruction=instruction_of(golden[0]) if golden else None,
        tokenizer=tokenizer, has_system=supports_system_role(tokenizer), model=model,
        scorer=_Scorer(metric, refs, project.eval.bootstrap_samples, project.eval.seed, tokenizer, prices, tuple(project.eval.metrics),
                       metric_functions(project), project.task),
        want=lambda name: not wanted or name in wanted,
    )


def _prompt_candidates(a: _Audit) -> list[dict[str, Any]]:
    """zero_shot (the golden prompts exactly as the eval gate shows them to the base model) and
    prompt_optimization (instruction variants x few-shot counts scored on dev rows; the winner on the golden
    set). Returns the prompt search: one entry per variant tried, with its dev score."""
    acfg, scorer = a.project.audit, a.scorer
    if a.want("zero_shot"):
        out, wall = a.timed_generate(a.prompts, "zero_shot")
        scorer.add("zero_shot", out, wall, a.prompts, trains=False, method="prompt_optimization",
                   detail="the base model with the project's own prompt")
    search: list[dict[str, Any]] = []
    if not a.want("prompt_optimization"):
        return search
    variants = [a.base_instruction, *acfg.instructions]
    if a.labels:
        variants.append(_label_instruction(a))
    variants = list(dict.fromkeys(variants))
    shots_for = _shot_picker(a.pool, a.labels, acfg.seed)
    dev_refs = [reference_answer(r) for r in a.dev]
    for vi, instr in enumerate(variants):
        for k in acfg.shots:
            shots = shots_for(k)
            prompts = [chat_prompt(a.tokenizer, a.has_system, instr, shots, prompt_text(r)) for r in a.dev]
            out = a.generate(prompts, f"prompt search {vi + 1}/{len(variants)}, {k}-shot")
            score = sum(scorer.rows(a.metric, out, dev_refs)) / len(a.dev)
            search.append({"instruction": instr, "shots": k, "shot_ids": [s["id"] for s in shots], "dev_score": score})
            console.print(f"  prompt search: instruction {vi + 1}, {k}-shot: {a.metric} {score:.3f} on {len(a.dev)} dev rows")
    best = max(search, key=lambda s: s["dev_score"])  # the first of equals: fewer shots and the project's own wording first
    by_id = {r["id"]: r for r in a.pool}
    shots = [by_id[i] for i in best["shot_ids"]]
    prompts = [chat_prompt(a.tokenizer, a.has_system, best["instruction"], shots, q) for q in a.queries]
    if "zero_shot" in scorer.outputs and prompts == a.prompts:  # the search kept the project's own prompt
        out, wall = scorer.outputs["zero_shot"], scorer.results[0]["seconds_per_request"] * len(a.queries)
    else:
        out, wall = a.timed_generate(prompts, "prompt_optimization")
    scorer.add("prompt_optimization", out, wall, prompts, trains=False, method="prompt_optimization",
               detail=f"best of {len(search)} prompts on {len(a.dev)} dev rows: instruction {variants.index(best['instruction']) + 1}, {best['shots']}-shot",
               chosen={k: best[k] for k in ("instruction", "shots", "shot_ids", "dev_score")})
    return search


def _label_instruction(a: _Audit) -> str:
    """The prompt-search variant that lists the labels, worded for the task kind."""
    lead, task = a.base_instruction or "Classify the message.", a.project.task
    if task is not None and task.kind == "multilabel":
        return (f"{lead} Answer with every label that applies, separated by {task.separator!r}, from: {', '.join(a.labels)}; "
                f"answer {task.none_label} if none applies.")
    text = f"{lead} Answer with exactly one of these labels and nothing else: {', '.join(a.labels)}."
    if task is not None and task.abstain_label:
        text += f" Answer {task.abstain_label} if none of the others fits."
    return text


def _knn_candidates(a: _Audit) -> None:
    """Retrieval of labelled examples: knn_fewshot (the `fewshot_k` most similar training rows as in-context
    examples) and, for labelled tasks, knn_classifier (a similarity-weighted vote, k picked on dev rows; no LLM)."""
    acfg, scorer = a.project.audit, a.scorer
    abstain = a.project.task.abstain_label if a.project.task is not None else None
    classifier = bool(a.labels) and (a.want("knn_classifier") or bool(abstain and a.want("knn_classifier_abstain")))
    if not (a.want("knn_fewshot") or classifier):
        return
    from tunegate.retrieval import DenseIndex, knn_classify

    t0 = time.perf_counter()
    pool_index = DenseIndex([prompt_text(r) for r in a.pool])
    index_s = time.perf_counter() - t0
    depth = max([acfg.fewshot_k, *acfg.knn_k])
    t0 = time.perf_counter()
    ids, sims = pool_index.search(a.queries, depth)
    search_s = time.perf_counter() - t0
    if a.want("knn_fewshot"):
        prompts = [chat_prompt(a.tokenizer, a.has_system, a.base_instruction, [a.pool[j] for j in reversed(row[: acfg.fewshot_k])], q)
                   for row, q in zip(ids, a.queries)]  # the most similar example sits next to the query
        out, wall = a.timed_generate(prompts, "knn_fewshot", extra_s=search_s)
        scorer.add("knn_fewshot", out, wall, prompts, trains=False, method="prompt_optimization",
                   detail=f"the {acfg.fewshot_k} most similar training rows (MiniLM) as few-shot examples")
    if not classifier:
        return
    dev_ids, dev_sims = pool_index.search([prompt_text(r) for r in a.dev], depth)
    if a.project.task is not None and a.project.task.kind == "multilabel":
        _knn_multilabel(a, (ids, sims, search_s), (dev_ids, dev_sims), index_s)
        return
    pool_labels = [reference_answer(r) for r in a.pool]
    dev_refs = [reference_answer(r) for r in a.dev]
    dev_scores = {}
    for k in acfg.knn_k:
        pred = knn_classify([[pool_labels[j] for j in row] for row in dev_ids], dev_sims, k)
        dev_scores[k] = sum(scorer.rows(a.metric, pred, dev_refs)) / len(a.dev)
    k_best = max(acfg.knn_k, key=lambda k: dev_scores[k])
    if a.want("knn_classifier"):
        t0 = time.perf_counter()
        out = knn_classify([[pool_labels[j] for j in row] for row in ids], sims, k_best)
        wall = time.perf_counter() - t0 + search_s
        scorer.add("knn_classifier", out, wall, None, trains=False, method="prompt_optimization",
                   detail=f"MiniLM embeddings, similarity-weighted vote of k={k_best} neighbours (k picked on dev rows: "
                          + ", ".join(f"k={k} {v:.3f}" for k, v in dev_scores.items()) + "); no LLM",
                   index_s=round(index_s, 1))
    tuned = _tune_abstain(a, pool_index, pool_labels, k_best, abstain) if abstain and a.want("knn_classifier_abstain") else None
    if tuned is not None:
        t0 = time.perf_counter()
        out = knn_classify([[pool_labels[j] for j in row] for row in ids], sims, k_best, tuned["threshold"], abstain)
        wall = time.perf_counter() - t0 + search_s
        scorer.add("knn_classifier_abstain", out, wall, None, trains=False, method="prompt_optimization",
                   detail=f"knn_classifier (k={k_best}) answering {abstain} when the nearest training row's cosine is under "
                          + (f"{tuned['threshold']:.3f}" if tuned["threshold"] is not None else "no threshold (never abstaining scored best)")
                          + f", tuned on {tuned['dev_rows']} dev rows ({tuned['protocol']}); no LLM",
                   abstain=tuned, index_s=round(index_s, 1))


def _tune_abstain(a: _Audit, pool_index, pool_labels: list[str], k: int, abstain: str) -> dict[str, Any] | None:
    """The similarity threshold under which the kNN classifier abstains, picked on dev rows (never golden rows):
    the threshold with the best headline metric among the dev rows' own nearest-neighbour similarities.

    When the training rows hold out-of-scope examples (answers equal to `abstain`), the dev rows are used as they
    are. When they hold none (the held-out-intents protocol: out-of-scope queries are intents never trained on),
    out-of-scope dev rows are simulated the same way: a seeded SIMULATED_OOS_SHARE of the training labels is hidden
    from the neighbour pool and their dev rows are relabelled `abstain`.
    Returns {threshold (None: never abstaining scored best), protocol, dev_rows, dev_oos_rows, hidden_labels,
    dev_score, dev_score_without}, or None when out-of-scope cannot be simulated (fewer than 2 training labels)."""
    import numpy as np

    from tunegate.retrieval import knn_classify

    dev_refs = [reference_answer(r) for r in a.dev]
    oos = normalize_answer(abstain)
    hidden: set[str] = set()
    if not any(normalize_answer(label) == oos for label in pool_labels):
        in_scope = sorted(set(pool_labels))
        if len(in_scope) < 2:
            console.print(f"  knn_classifier_abstain: skipped, {len(in_scope)} training label(s): no out-of-scope rows to tune on")
            return None
        n_hidden = max(1, round(len(in_scope) * SIMULATED_OOS_SHARE))
        hidden = set(random.Random(a.project.audit.seed).sample(in_scope, n_hidden))
        dev_refs = [abstain if r in hidden else r for r in dev_refs]
    keep = np.array([label not in hidden for label in pool_labels])
    depth = min(len(pool_labels), max(k, 1) * 4 + 32)  # deep enough that k visible neighbours remain after hiding
    ids, sims = pool_index.search([prompt_text(r) for r in a.dev], depth)
    labels, kept_sims = [], []
    for row, row_sims in zip(ids, sims):
        visible = [(pool_labels[j], s) for j, s in zip(row, row_sims) if keep[j]][:k]
        labels.append([lab for lab, _ in visible])
        kept_sims.append([s for _, s in visible] or [0.0])
    top = sorted({float(s[0]) for s in kept_sims})
    candidates = [None, *[t + 1e-6 for t in top]]  # never abstain, or abstain below each dev row's own similarity

    def score(threshold: float | None) -> float:
        pred = knn_classify(labels, kept_sims, k, threshold, abstain)
        return sum(a.scorer.rows(a.metric, pred, dev_refs)) / len(dev_refs)

    scores = [score(t) for t in candidates]
    best = int(np.argmax(scores))  # the first of equals: never, else the lowest threshold, abstaining least
    return {"threshold": None if candidates[best] is None else round(candidates[best], 6), "protocol": f"{len(hidden)} training labels hidden as simulated out-of-scope"
            if hidden else "out-of-scope rows of the training data", "dev_rows": len(dev_refs),
            "dev_oos_rows": sum(normalize_answer(r) == oos for r in dev_refs), "hidden_labels": sorted(hidden),
            "dev_score": round(scores[best], 4), "dev_score_without": round(scores[0], 4)}


def _knn_multilabel(a: _Audit, golden_hits, dev_hits, index_s: float) -> None:
    """knn_classifier for a multi-label task: label voting over the k nearest training rows, k and the label-share
    threshold picked on dev rows by the headline metric (tunegate.retrieval.knn_multilabel)."""
    from tunegate.retrieval import knn_multilabel

    task, acfg = a.project.task, a.project.audit
    pool_sets = [label_set(reference_answer(r), task) for r in a.pool]
    dev_refs = [reference_answer(r) for r in a.dev]

    def answers(ids, sims, k, threshold) -> list[str]:
        return [canonical_labels(s, task) for s in knn_multilabel([[pool_sets[j] for j in row] for row in ids], sims, k, threshold)]

    dev_ids, dev_sims = dev_hits
    dev_scores = {(k, t): sum(a.scorer.rows(a.metric, answers(dev_ids, dev_sims, k, t), dev_refs)) / len(a.dev)
                  for k in acfg.knn_k for t in MULTILABEL_THRESHOLDS}
    k_best, t_best = max(dev_scores, key=dev_scores.get)
    ids, sims, search_s = golden_hits
    t0 = time.perf_counter()
    out = answers(ids, sims, k_best, t_best)
    wall = time.perf_counter() - t0 + search_s
    a.scorer.add("knn_classifier", out, wall, None, trains=False, method="prompt_optimization",
                 detail=f"MiniLM embeddings, labels held by >= {t_best:.0%} of the similarity-weighted k={k_best} neighbours "
                        f"(k and the share picked on {len(a.dev)} dev rows, {a.metric} {dev_scores[(k_best, t_best)]:.3f}); no LLM",
                 index_s=round(index_s, 1))


def _rag_candidates(a: _Audit) -> tuple[dict[str, Any], list[str] | None]:
    """With `audit.corpus`: rag_bm25, rag_dense and rag_hybrid (the `top_k` passages from bm25s, MiniLM, or both
    fused by reciprocal rank, before the question), with recall@k where gold passages are known.
    Returns (the retrieval figures for audit.json, the hybrid RAG prompts the probe is also scored with; None
    without a corpus)."""
    acfg, scorer = a.project.audit, a.scorer
    if acfg.corpus is None or not any(a.want(n) for n in ("rag_bm25", "rag_dense", "rag_hybrid", "lora_probe+rag")):
        return {}, None
    from tunegate.retrieval import Bm25Index, DenseIndex, recall_at_k, reciprocal_rank_fusion

    doc_ids, docs = read_corpus(acfg.corpus)
    depth = max(10, acfg.top_k)
    t0 = time.perf_counter()
    bm25 = Bm25Index(docs)
    dense = DenseIndex(docs)
    index_s = time.perf_counter() - t0
    rankings, search_s = {}, {}
    for name, index in (("rag_bm25", bm25), ("rag_dense", dense)):
        t0 = time.perf_counter()
        rankings[name] = index.search(a.queries, depth)[0]
        search_s[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rankings["rag_hybrid"] = reciprocal_rank_fusion([rankings["rag_bm25"], rankings["rag_dense"]], depth)
    search_s["rag_hybrid"] = search_s["rag_bm25"] + search_s["rag_dense"] + time.perf_counter() - t0
    gold_field = acfg.corpus.gold_field
    position = {d: i for i, d in enumerate(doc_ids)}
    gold = [position.get(str(r.get("meta", {}).get(gold_field))) for r in a.golden] if gold_field else []
    known = [i for i, x in enumerate(gold) if x is not None]
    retrieval: dict[str, Any] = {"documents": len(docs), "index_s": round(index_s, 1), "gold_known": len(known), "recall": {}}
    rag_prompts = None
    for name, ranking in rankings.items():
        if known:
            retrieval["recall"][name] = {
                f"@{k}": sum(recall_at_k(ranking[known], [gold[i] for i in known], k)) / len(known)
                for k in sorted({1, acfg.top_k, 10})
            }
        prompts = [chat_prompt(a.tokenizer, a.has_system, a.base_instruction, [], rag_query(q, [docs[j] for j in row[: acfg.top_k]]))
                   for row, q in zip(ranking, a.queries)]
        if name == "rag_hybrid":
            rag_prompts = prompts  # the probe's adapter is scored with these too
        if a.want(name):
            out, wall = a.timed_generate(prompts, name, extra_s=search_s[name])
            recall = retrieval["recall"].get(name, {}).get(f"@{acfg.top_k}")
            scorer.add(name, out, wall, prompts, trains=False, method="rag",
                       detail=f"top {acfg.top_k} of {len(docs)} passages" + (f"; recall@{acfg.top_k} {recall:.3f}" if recall is not None else ""))
    if known:
        for name, r in retrieval["recall"].items():
            console.print(f"  retrieval {name}: " + ", ".join(f"recall{k} {v:.3f}" for k, v in r.items()))
    return retrieval, rag_prompts


def _probe_candidates(st: Stage, a: _Audit, prices: dict[str, Any], rag_prompts: list[str] | None) -> dict[str, Any] | None:
    """With `audit.probe`: trains the quick LoRA probe (`_train_probe`), then scores lora_probe (the golden
    prompts) and lora_probe+rag (the hybrid RAG prompts). Returns the probe's summary and cost (None: no probe)."""
    if st.project.audit.probe is None or not (a.want("lora_probe") or (rag_prompts and a.want("lora_probe+rag"))):
        return None
    from peft import PeftModel

    usd_per_hour = prices["machines"][prices["training_machine"]]["usd_per_hour"]
    if st.project.train.method == "classify":
        return _classify_probe(st, a, usd_per_hour)
    probe = _train_probe(st, a.pool, a.n_train, st.project.audit.seed, usd_per_hour)
    from tunegate.models import fit_to_adapter
    from tunegate.recipes.lean_adapter import use_lean_forward

    a.model = PeftModel.from_pretrained(fit_to_adapter(a.model, probe["adapter"]), str(probe["adapter"]))
    use_lean_forward(a.model)  # DoRA's weight norm once, not at every decoding step
    training_cost = probe["full_run_usd"]
    if a.want("lora_probe"):
        # eval.abstain: the probe abstains as the eval gate will measure the candidate, its threshold from the dev rows
        rule = _probe_abstain_rule(a) if st.project.eval.abstain else None
        conf: list[float] | None = [] if rule else None
        out, wall = a.timed_generate(a.prompts, "lora_probe", confidences=conf)
        detail = f"LoRA probe: {probe['steps']} steps on {probe['rows']} rows in {probe['train_wall_s']:.0f} s"
        if rule:
            out = abstain.apply(out, conf, rule)
            detail += f"; abstains under a confidence of {rule['threshold']:g} ({rule['rule']})"
        a.scorer.add("lora_probe", out, wall, a.prompts, trains=True, method="lora", detail=detail, training_usd=training_cost)
    if rag_prompts and a.want("lora_probe+rag"):
        out, wall = a.timed_generate(rag_prompts, "lora_probe+rag")
        detail = "the probe's adapter with the hybrid RAG prompt"
        if st.project.eval.abstain:  # a threshold tuned on plain dev prompts would not hold for retrieval prompts
            detail += " (does not abstain: eval.abstain's threshold is tuned on prompts without retrieval)"
        a.scorer.add("lora_probe+rag", out, wall, rag_prompts, trains=True, method="lora", detail=detail,
                     training_usd=training_cost)
    return probe


def _probe_abstain_rule(a: _Audit) -> dict[str, Any]:
    """eval.abstain for the probe's adapter: eval.abstain.threshold, or the val_abstain_rate quantile of its confidences
    on the in-scope dev rows (training rows the probe did not train on; tunegate.evals.abstain), as the eval stage
    tunes it on the validation rows. Never the golden set."""
    def confidences_of(rows: list) -> list[float]:
        conf: list[float] = []
        a.generate(golden_prompts(a.tokenizer, rows), "lora_probe: dev rows (abstain threshold)", conf)
        return conf

    return abstain.tuned_rule(a.project.eval.abstain, a.project.task.abstain_label, a.dev, confidences_of, "dev rows")


def _classify_probe(st: Stage, a: _Audit, usd_per_hour: float) -> dict[str, Any] | None:
    """train.method classify: the probe trains the classification head (tunegate.recipes.classify) on the sampled
    pool rows, its abstain threshold tuned on the dev rows, and `lora_probe` is scored on the golden rows with one
    forward pass per batch (no generation). No lora_probe+rag: the head reads the golden prompt as the eval does."""
    if not a.want("lora_probe"):
        return None
    from tunegate.evals.backends import LocalClassifier
    from tunegate.models import resolve_base_model
    from tunegate.recipes.classify import load_trained

    probe = _train_probe(st, a.pool, a.n_train, st.project.audit.seed, usd_per_hour, val_rows=a.dev)
    model, head = load_trained(resolve_base_model(st.project.base_model), probe["adapter"], a.tokenizer)
    t0 = time.perf_counter()
    out, _ = LocalClassifier(model, a.tokenizer, head, st.project.audit.batch_size or st.project.eval.batch_size).classify(a.golden, "lora_probe")
    a.scorer.add("lora_probe", out, time.perf_counter() - t0, a.prompts, trains=True, method="classify",
                 detail=f"classification-head probe: {probe['steps']} steps on {probe['rows']} rows in {probe['train_wall_s']:.0f} s, "
                        f"abstain threshold {head['abstain_threshold']:g} ({head['threshold_rule']})",
                 training_usd=probe["full_run_usd"])
    return probe


def _recommend(a: _Audit, bar: float | None, probe: dict[str, Any] | None, prices: dict[str, Any]) -> dict[str, Any]:
    """`tunegate.decide.recommend` on the scored candidates, with the cost of being wrong both ways and, when
    training does not pay, the candidate to deploy instead (`use`)."""
    from tunegate.decide import recommend

    project, results = a.project, a.scorer.results
    acfg = project.audit
    rec = recommend(results, bar, acfg.min_gain, dict(acfg.answers), project.eval.bootstrap_samples, project.eval.seed)
    rec["cost_of_being_wrong"] = _cost_of_being_wrong(rec, results, probe, prices)
    rec["use"] = None  # what to deploy instead of training, when training does not pay
    if rec["verdict"] == "NO_TRAIN":
        best = next(c for c in results if c["name"] == rec["best_no_training"]["name"])
        rec["use"] = {"name": best["name"], "mean": best["mean"], "detail": best["detail"]}
    return rec


def _samples(a: _Audit) -> list[dict[str, Any]]:
    """Per golden row: its prompt and reference, and each candidate's output and score."""
    metric, results, outputs = a.metric, a.scorer.results, a.scorer.outputs
    samples = []
    for i, row in enumerate(a.golden):
        sample = {"id": row["id"], "prompt": a.queries[i], "reference": a.scorer.refs[i]}
        for c in results:
            sample[c["name"]] = outputs[c["name"]][i]
            sample[f"{c['name']}_{metric}"] = c["rows"][i]
        samples.append(sample)
    return samples


def _shot_picker(pool: list[dict[str, Any]], labels: list[str] | None, seed: int) -> Callable[[int], list[dict[str, Any]]]:
    """k seeded few-shot examples from the pool; for labelled tasks, from k different labels."""
    def pick(k: int) -> list[dict[str, Any]]:
        rng = random.Random(seed + k)
        order = rng.sample(range(len(pool)), len(pool))
        if not labels:
            return [pool[i] for i in order[:k]]
        seen, out = set(), []
        for i in order:
            if len(out) == k:
                break
            lab = reference_answer(pool[i])
            if lab not in seen:
                seen.add(lab)
                out.append(pool[i])
        return out

    return pick


def _sft_keys() -> set[str]:
    import dataclasses

    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


def _train_probe(st: Stage, pool: list[dict[str, Any]], n_train: int, seed: int, usd_per_hour: float,
                 val_rows: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """A short LoRA run through the train stage's own body (`recipes.run.run_training`), in <audit>/probe/: SFT,
    or for train.method classify the classification head, with `val_rows` as its validation rows (its abstain
    threshold is tuned on them). Returns its summary and cost."""
    from tunegate.recipes.run import run_training

    pcfg = st.project.audit.probe
    rows = random.Random(seed).sample(pool, min(pcfg.rows, len(pool)))
    probe_dir = st.dir / "probe"
    (probe_dir / "data").mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(probe_dir / "data" / "train.jsonl", rows)
    classify = st.project.train.method == "classify"
    atomic_write_jsonl(probe_dir / "data" / "val.jsonl", list(val_rows) if classify else [])
    project = st.project.model_copy(deep=True)
    # The probe is SFT with the default adapter whatever train.method is, or the classification head for classify:
    # a lower bound of what training buys.
    project.train.method, project.train.grpo, project.train.distillation, project.train.init_adapter = \
        ("classify" if classify else "sft"), None, None, None
    if project.train.adapter in ("full", "qlora"):
        project.train.adapter, project.train.lora = "dora", {}
    trl = {k: v for k, v in project.train.trl.items() if k in _sft_keys() and k not in AUDIT_IGNORED_TRL_KEYS}
    trl.update(max_steps=pcfg.max_steps, save_steps=10 * pcfg.max_steps, logging_steps=max(1, pcfg.max_steps // 10))
    project.train.trl = trl
    project.train.budget_minutes = pcfg.budget_minutes
    probe_stage = Stage(project, probe_dir, "train")
    probe_stage.dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]quick LoRA probe[/bold]: {pcfg.max_steps} steps on {len(rows)} rows, budget {pcfg.budget_minutes:g} min")
    summary = run_training(probe_stage, probe_dir / "data")

    # What a full run of train.* on the whole training split would take, at the probe's measured tokens/s.
    # These settings are not part of the audit's fingerprint (AUDIT_IGNORED_TRL_KEYS), so the projection
    # names the ones it assumed: a cached audit may predate a change of them.
    full = st.project.train.trl
    tokens_per_row = summary["train_tokens_per_epoch"] / max(summary["train_rows"], 1)
    if "max_steps" in full and int(full["max_steps"]) > 0:
        batch = int(full.get("per_device_train_batch_size", 8)) * int(full.get("gradient_accumulation_steps", 1))
        full_tokens = int(full["max_steps"]) * batch * tokens_per_row
        assumes = {"max_steps": int(full["max_steps"])}
    else:
        full_tokens = float(full.get("num_train_epochs", 3)) * n_train * tokens_per_row
        assumes = {"num_train_epochs": float(full.get("num_train_epochs", 3))}
    assumes["budget_minutes"] = st.project.train.budget_minutes
    full_s = full_tokens / summary["train_tokens_per_s"] if summary.get("train_tokens_per_s") else None
    if full_s is not None and st.project.train.budget_minutes:
        full_s = min(full_s, st.project.train.budget_minutes * 60)
    return {
        "adapter": probe_stage.dir / "adapter",
        "rows": len(rows),
        "steps": summary["steps"],
        "train_wall_s": summary["train_wall_s"],
        "train_tokens_per_s": summary["train_tokens_per_s"],
        "final_train_loss": summary["final_train_loss"],
        "full_run_estimated_s": round(full_s, 1) if full_s else None,
        "full_run_usd": round(full_s / 3600 * usd_per_hour, 6) if full_s else None,
        "full_run_assumes": assumes,  # train.trl.max_steps (or num_train_epochs) and train.budget_minutes
    }


def _cost_of_being_wrong(rec: dict[str, Any], results: list[dict[str, Any]], probe, prices) -> dict[str, str]:
    """Both ways, in the units a team budgets in: money and answers per 1,000 requests."""
    gap = rec["gap"]
    by_name = {c["name"]: c for c in results}
    best_nt = by_name[rec["best_no_training"]["name"]]
    out = {}
    if probe and probe.get("full_run_usd") is not None:
        assumed = ", ".join(f"{k} {v}" for k, v in probe["full_run_assumes"].items() if v is not None)
        spend = (f"a full training run (~{probe['full_run_estimated_s'] / 60:.0f} min, ${probe['full_run_usd']:.2f} at the price "
                 f"table's rate; for train {assumed})")
    else:
        spend = "a full training run (no probe ran, so its cost was not estimated)"
    if gap is not None:
        best_ft = by_name[rec["best_training"]["name"]]
        serve_delta = (best_ft["usd_per_1k_requests"] - best_nt["usd_per_1k_requests"])
        out["train_when_it_does_not_pay"] = (
            f"{spend}, plus serving an adapter ({serve_delta:+.4f} USD per 1,000 requests against {best_nt['name']}); "
            f"quality could be as much as {-gap['ci_low'] * 1000:.0f} correct answers per 1,000 requests worse than {best_nt['name']} "
            "(the lower end of the gap's CI)" if gap["ci_low"] < 0 else
            f"{spend}; the measured gap's CI lies above zero, so the quality risk is small"
        )
        out["skip_training_when_it_would_pay"] = (
            f"up to {gap['ci_high'] * 1000:.0f} more correct answers per 1,000 requests forgone "
            f"(the upper end of the gap's CI; the probe is a lower bound of a full run)" if gap["ci_high"] > 0 else
            "nothing measurable: no fine-tune estimate beat the best no-training candidate"
        )
    else:
        out["train_when_it_does_not_pay"] = f"{spend}; no fine-tune estimate was measured (audit.probe is off)"
        out["skip_training_when_it_would_pay"] = "unknown: no fine-tune estimate was measured (audit.probe is off)"
    return out


def _print_recommendation(rec: dict[str, Any]) -> None:
    d = rec["decision"]
    colour = "green" if rec["verdict"] == "NO_TRAIN" else "yellow"
    console.print(f"[bold {colour}]Audit: {rec['verdict']}[/bold {colour}], recommended method: [bold]{d['method'].upper()}[/bold]")
    console.print(f"  why: {d['why']}")
    if rec["use"]:
        console.print(f"  use: {rec['use']['name']} ({rec['use']['mean']:.3f}): {rec['use']['detail']}")
    g = rec["gap"]
    if g is not None:
        console.print(f"  gap (best fine-tune {rec['best_training']['name']} - best no-training {rec['best_no_training']['name']}): "
                      f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]")
    for o in rec["overruled"]:
        console.print(f"  [yellow]overruled[/yellow] your answer {o['question']}={o['given']}: {o['why']}")
    for n in rec["notes"]:
        console.print(f"  note: {n}")


def config(project) -> dict[str, Any]:
    """What the audit depends on: the base model, the audit section, the eval settings it scores with (metric,
    bar, generation), and the train settings its probe trains with (not the full run's length or budget)."""
    dumped = project.model_dump(mode="json")
    train = {k: v for k, v in dumped["train"].items() if k != "budget_minutes"}
    train["trl"] = {k: v for k, v in train["trl"].items() if k not in AUDIT_IGNORED_TRL_KEYS}
    out = {"base_model": dumped["base_model"], "audit": dumped["audit"],
           "eval": {k: v for k, v in dumped["eval"].items() if k in AUDIT_EVAL_KEYS}, "train": train}
    if dumped["task"] is not None:  # left out when unset: the runs of projects without it keep their fingerprints
        out["task"] = dumped["task"]
    return out


def skip(project) -> str | None:
    if not project.audit.enabled:
        return "audit.enabled: false"
    if project.train.method == "cpt":
        return "continued pretraining: raw text has no answers to few-shot or probe with"
    return None


def inputs(project) -> dict[str, Path]:
    """Project-defined metric files (eval.custom_metrics): their code scores every candidate."""
    return metric_files(project)


SPEC = StageSpec(name="audit", run=run, upstream=("data",), config=config, skip=skip, inputs=inputs)
