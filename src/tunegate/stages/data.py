"""Data stage: read every source, validate every row, freeze the golden set, split train/val.

Order matters: structural validation of every row happens before the base model's tokenizer is
resolved, and no model weights are ever loaded here. Then each row is rendered through the real chat
template with its loss mask and over-length policy; rows that cannot be are rejected with their rule. A row
whose text spells one of the tokenizer's control tokens (`<|im_end|>`, ...) is rejected as `control_token`, and
a golden set holding one is refused (docs/design.md#control-tokens).

With `data.pii` set, every turn is redacted (tunegate.data.pii) before the template checks, and rows the
re-scan still finds PII in are rejected; the golden set is compared with the rows before redaction too.

Each row step is a function `step(rows, ...) -> (kept rows, rejections, ...)`: a row is kept, or dropped with
its rule and detail (`Rejection`). `run` calls the steps in order; a `StepLog` collects every step's rows in
and out, removals by rule and wall time, and every rejection, and they are written once, at the end.

Writes: train.jsonl, val.jsonl, golden.jsonl (the frozen golden rows), rejected.jsonl (file, line, id,
rule, detail), stats.json (with `steps`: rows in and out of each step, removals by rule), timings.json (wall
time per step), data_card.md, and data_card.html with token_lengths.png (tunegate.report.data_card).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.core.console import console
from tunegate.core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from tunegate.core.stage import Stage, StageResult, StageSpec, config_sections
from tunegate.data import golden as golden_lock
from tunegate.data.engine import default_num_proc
from tunegate.data.format import apply_system_policy, supports_system_role
from tunegate.data.quality import row_quality
from tunegate.data.records import Rejection, RowError, dedupe_ids, read_source, row_text

# Rules of deliberate selection (data.select), not faults: they count towards no limit.
# `dropped_label` is a source's drop_labels (a label held out of training on purpose, e.g. out-of-scope protocols).
SELECTION_RULES = ("ifd_above_max", "too_similar", "over_budget", "dropped_label")
# Rules of the quality gates: good rows removed on purpose. They count towards data.max_removed_fraction, not
# towards data.max_rejected_fraction (invalid input).
REMOVAL_RULES = ("duplicate", "semantic_duplicate", "golden_overlap", "golden_ngram_overlap", "pii", "pii_rescan")


def rejection_kind(rule: str) -> str:
    """"invalid" (the row breaks a rule), "removed" (a quality gate removed it) or "selected_out" (data.select)."""
    return "selected_out" if rule in SELECTION_RULES else "removed" if rule in REMOVAL_RULES else "invalid"
DUPLICATE_EXAMPLES = 5  # per kind of duplicate, shown on the card with both texts


def split_train_val(records: list[dict[str, Any]], val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split by a seeded hash of each row id: the same rows land in val on every machine."""
    if val_fraction <= 0 or len(records) < 2:
        return records, []
    keyed = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    n_val = max(1, round(len(records) * val_fraction))
    val_ids = {r["id"] for r in keyed[:n_val]}
    return [r for r in records if r["id"] not in val_ids], [r for r in records if r["id"] in val_ids]


class StepLog:
    """What the data card's "rows in and out per step" table and timings.json are made of.

    `record` is called after each row step: its rows in and out, its removals by rule (stats.json `steps`), its
    wall time since the previous step (timings.json, so stats.json stays the same on a rerun), and its
    rejections, appended in step order (rejected.jsonl).
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.timed: list[tuple[str, int, float]] = []  # (step, rows in, seconds)
        self.rejected: list[Rejection] = []
        self._mark = time.perf_counter()

    def restart_clock(self) -> None:
        """Work done since the last step belongs to no step (reading the golden set)."""
        self._mark = time.perf_counter()

    def record(self, name: str, rows_in: int, kept: list[dict[str, Any]], rejections: list[Rejection]) -> list[dict[str, Any]]:
        """Log one row step; returns `kept`, the rows the next step reads."""
        removed = Counter(r.rule for r in rejections)
        self.steps.append({"step": name, "rows_in": rows_in, "rows_out": len(kept), "removed_by_rule": dict(sorted(removed.items()))})
        self.rejected += rejections
        self.lap(name, rows_in)
        return kept

    def lap(self, name: str, rows_in: int) -> None:
        """Time a step that removes no row (it is in timings.json, not in stats.json `steps`)."""
        now = time.perf_counter()
        self.timed.append((name, rows_in, round(now - self._mark, 2)))
        self._mark = now

    def timings(self, engine: str, num_proc: int) -> dict[str, Any]:
        """timings.json: wall time per step on this engine and process count."""
        return {"engine": engine, "num_proc": num_proc, "total_seconds": round(sum(sec for _, _, sec in self.timed), 2),
                "steps": [{"step": name, "seconds": sec, "rows_in": rows_in, "rows_per_s": round(rows_in / sec, 1) if sec > 0 else None}
                          for name, rows_in, sec in self.timed]}


def run(st: Stage) -> StageResult:
    """The data stage: the row steps in order, then the refusal check, the split and every output."""
    from tunegate.models import load_tokenizer, resolve_base_model

    cfg = st.project.data
    redactor = _pii_redactor(cfg)  # built first: a missing key or an unknown entity type fails before any work
    num_proc = cfg.num_proc or default_num_proc()
    log = StepLog()

    # 1. Structural validation: no tokenizer, no model. Then the golden set, checked against its lock (and, with
    # the tokenizer, for text that spells a control token: before it is frozen).
    kept, rejections, per_source = read_sources(cfg.sources, keep_raw=redactor is None)
    rows = log.record("read and validate structure", len(kept) + len(rejections), kept, rejections)
    base = str(resolve_base_model(st.project.base_model))  # converted once here, before any worker starts
    added = tuple(st.project.train.added_tokens)  # the project's tokenizer: what training tokenizes with
    tokenizer = load_tokenizer(base, added)  # no weights
    golden, lock = read_golden(cfg, tokenizer, before_freeze=lambda rows: _check_golden_defines_metrics(st.project, rows))
    _check_labels(st.project, kept, golden, rejections)
    log.restart_clock()  # reading and checking the golden set is not a step of the training rows

    # 2. PII: redact every turn, then re-scan; before the template checks, so lengths are those of the redacted
    # text that is trained on. A masked value must not hide a golden copy: overlap is also checked before.
    pii_report, overlap_before_redaction = None, []
    if redactor is not None:
        overlap_before_redaction = golden_lock.overlap(rows, golden)
        kept, rejections, pii_report = redact_pii(rows, golden, redactor, cfg, num_proc)
        rows = log.record(f"PII ({cfg.pii.mode})", len(rows), kept, rejections)

    # 3. Control tokens, template, loss-mask and length checks with the real tokenizer, on every core.
    has_system = supports_system_role(tokenizer)
    kept, rejections, n_tokens, truncated = encode_rows(rows, base, cfg, num_proc, added)
    rows = log.record(f"chat template, loss mask, max_length {cfg.max_length} ({cfg.overlength})", len(rows), kept, rejections)
    _warn_near_identical_pairs(rows)
    apply_system_policy_to_golden(golden, cfg, has_system)

    # 4. Duplicates: exact after normalisation, then near-duplicates (MinHash LSH, verified by Jaccard), then
    # (data.dedup.semantic) SemDeDup over MiniLM embeddings.
    n_dup: dict[str, int] = {"exact": 0, "near": 0}
    dup_examples: list[dict[str, Any]] = []
    if cfg.dedup is not None:
        kept, rejections, n_dup, dup_examples = drop_duplicates(rows, cfg.dedup)
        rows = log.record("duplicates" + (" (exact and near)" if cfg.dedup.near else " (exact)"), len(rows), kept, rejections)
        if cfg.dedup.semantic is not None:
            kept, rejections, examples = drop_semantic_duplicates(rows, cfg.dedup.semantic)
            n_dup["semantic"], dup_examples = len(rejections), dup_examples + examples
            rows = log.record(f"semantic duplicates (SemDeDup, cosine >= {cfg.dedup.semantic.threshold})", len(rows), kept, rejections)

    # 5. Decontamination against the golden set: the same prompt after normalisation, then (data.decontaminate)
    # a shared word n-gram. Overlapping training rows are removed and listed.
    kept, rejections = drop_golden_overlap(rows, golden, overlap_before_redaction)
    n_golden_overlap = len(rejections)
    rows = log.record("golden-set overlap", len(rows), kept, rejections)
    n_ngram_overlap = 0
    if cfg.decontaminate is not None:
        kept, rejections = drop_golden_ngram_overlap(rows, golden, cfg.decontaminate)
        n_ngram_overlap = len(rejections)
        rows = log.record(f"golden-set n-gram overlap ({cfg.decontaminate.ngram}-word)", len(rows), kept, rejections)

    # 6. Quality scoring and diversity-aware selection (data.select, DEITA): deliberate choices, not faults, so
    # they do not count towards max_rejected_fraction, which is checked first (no model loads for a refused run).
    _check_rejected_fraction(st, rows, log.rejected)
    selection = None
    if cfg.select is not None:
        kept, rejections, selection = select_rows(st, rows, n_tokens)
        rows = log.record(selection.pop("step"), len(rows), kept, rejections)

    # 7. Rejections: written first, so a refused run still shows why.
    rejected = log.rejected
    atomic_write_jsonl(st.dir / "rejected.jsonl", [r.to_json() for r in rejected])
    for r in sorted(rejected, key=lambda r: rejection_kind(r.rule) != "invalid")[:5]:  # faults first, then deliberate drops
        console.print(f"[yellow]rejected[/yellow] {r}")
    if len(rejected) > 5:
        console.print(f"[yellow]... {len(rejected) - 5} more in {st.final_dir / 'rejected.jsonl'}[/yellow]")  # where it is published
    _check_rejected_fraction(st, rows, rejected)

    # 8. Deterministic split and outputs.
    lengths = [n_tokens[r["id"]] for r in rows]
    train, val = split_train_val(rows, cfg.val_fraction, cfg.seed)
    atomic_write_jsonl(st.dir / "train.jsonl", train)
    atomic_write_jsonl(st.dir / "val.jsonl", val)
    atomic_write_jsonl(st.dir / "golden.jsonl", golden)
    by_rule = Counter(r.rule for r in rejected)
    for path, counts in per_source.items():
        counts["rejected"] = sum(1 for r in rejected if r.file == path)
        counts["kept"] = sum(1 for r in rows if r["meta"]["file"] == path)
        counts["train"] = sum(1 for r in train if r["meta"]["file"] == path)
        counts["val"] = counts["kept"] - counts["train"]
    stats = {
        "rows_read": len(rows) + len(rejected),
        "rows_kept": len(rows),
        "rows_rejected": len(rejected),
        "rows_invalid": sum(rejection_kind(r.rule) == "invalid" for r in rejected),
        "rows_removed": sum(rejection_kind(r.rule) == "removed" for r in rejected),
        "rows_selected_out": sum(rejection_kind(r.rule) == "selected_out" for r in rejected),
        "rejected_by_rule": dict(by_rule),
        "train_rows": len(train),
        "val_rows": len(val),
        "golden_rows": len(golden),
        "golden_sha256": lock["file_sha256"],
        "golden_overlap_removed": n_golden_overlap + n_ngram_overlap,
        "golden_ngram_overlap_removed": n_ngram_overlap,
        "duplicates_removed": n_dup,
        "duplicate_examples": dup_examples,
        "pii": pii_report,
        "truncated_rows": sum(r["id"] in truncated for r in rows),
        "tokens_total": sum(lengths),
        "tokens_per_row_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_per_row_max": max(lengths),
        "template_has_system_role": has_system,
        "near_identical_pairs": sum(1 for r in rows if "near_identical" in r["meta"]),
        "selection": selection,
        "steps": log.steps,
        "per_source": per_source,
        "licenses": sorted({s.license for s in cfg.sources if s.license}),
        "task": _task_summary(st.project, rows, golden),
    }
    log.lap("split and write", len(rows))
    timings = log.timings(cfg.engine, num_proc)
    _write_stats_and_card(st, stats, timings, rejected, lengths)
    console.print(
        f"rows: {len(rows)} kept ({len(train)} train / {len(val)} val), {len(rejected)} rejected {dict(by_rule)}; "
        f"{len(golden)} golden"
    )
    task = stats["task"]
    console.print(f"task: {task['kind']} ({task['source']}{', ' + str(task['labels']) + ' labels' if task['labels'] else ''})"
                  + (f"; hint: {task['hint']}" if task["hint"] else ""))
    return StageResult(metrics=stats, inputs={"golden_lock": Path(cfg.golden_lock)})


def _check_golden_defines_metrics(project, golden: list[dict[str, Any]]) -> None:
    """Out-of-scope metrics need golden rows on both sides of the abstain label, and metric tool_call a ground truth
    in every golden reference: refused here, before the golden set is frozen and anything trains, rather than after
    the eval stage answered the whole golden set. Raises TunegateError."""
    from tunegate.catalog import ABSTAIN_METRICS
    from tunegate.data.records import reference_answer
    from tunegate.evals.metrics import normalize_answer

    if "tool_call" in project.eval.metrics:  # its reference is a BFCL ground truth: rows with tools, or format bfcl
        from tunegate.evals.toolcall import CallParseError, parse_ground_truth

        for g in golden:
            try:
                parse_ground_truth(reference_answer(g))
            except CallParseError as exc:
                raise TunegateError(f"{project.data.golden.path}: golden row {g['id']}: metric tool_call needs a ground truth as "
                                    f"the reference ({exc}); rule: a tool-call golden set holds rows with tools, or format bfcl") from None
    asked = [m for m in project.eval.metrics if m in ABSTAIN_METRICS]
    if not asked:
        return
    label = project.task.abstain_label
    n_oos = sum(normalize_answer(reference_answer(g)) == normalize_answer(label) for g in golden)
    if n_oos == 0 or n_oos == len(golden):
        side = "no" if n_oos == 0 else "every"
        raise TunegateError(f"{project.data.golden.path}: {side} golden row's reference is the abstain label {label!r} "
                            f"(task.abstain_label); eval.metrics {asked} need both out-of-scope and in-scope golden rows "
                            "(label_map on data.golden relabels held-out labels)")


def _check_labels(project, rows: list[dict[str, Any]], golden: list[dict[str, Any]], rejections: list[Rejection]) -> None:
    """A label task's answers, read: labels the metrics would merge are refused (TunegateError naming both, e.g.
    'C' and 'C++'); a drop_labels entry that matches no row, golden labels no training row has (other than the
    abstain label), and multi-label labels holding another separator ('|', ';', '/') are warned about."""
    from tunegate.data.records import reference_answer
    from tunegate.evals.labels import label_collisions, label_set
    from tunegate.evals.metrics import normalize_answer

    task = project.task
    if task is None or task.kind not in ("classification", "multilabel"):
        return

    def labels_of(answer: str) -> list[str]:
        if task.kind != "multilabel":
            return [answer]
        return [p.strip() for p in answer.split(task.separator.strip()) if label_set(p, task)]

    train = {lab for r in rows if "messages" in r or "completion" in r for lab in labels_of(reference_answer(r))}
    gold = {lab for g in golden for lab in labels_of(reference_answer(g))}
    clash = label_collisions(train | gold)
    if clash:
        a, b = clash[0]
        raise TunegateError(f"{project.source_file}: labels {a!r} and {b!r} are one label to the metrics (they compare answers "
                            "without case, spaces and edge punctuation); rename one in the data, or relabel with label_map")
    keys = {normalize_answer(x) for x in train}
    dropped = {r.detail for r in rejections if r.rule == "dropped_label"}
    for i, src in enumerate(project.data.sources):
        missed = [x for x in src.drop_labels if not any(f"{normalize_answer(x)!r}" in d for d in dropped)]
        if missed:
            console.print(f"[yellow]warning: data.sources[{i}].drop_labels {missed[:5]} matched no row (a typo?)[/yellow]")
    unseen = sorted({x for x in gold if normalize_answer(x) not in keys} - ({task.abstain_label} if task.abstain_label else set()))
    if unseen:
        console.print(f"[yellow]warning: {len(unseen)} golden label(s) no training row has: {unseen[:5]}"
                      + (" (held-out labels belong under label_map on data.golden, e.g. {label: oos})" if task.abstain_label else "")
                      + "[/yellow]")
    if task.kind == "multilabel":
        odd = sorted(x for x in train | gold if any(c in x for c in "|;/") and task.separator.strip() not in "|;/")
        if odd:
            console.print(f"[yellow]warning: label(s) {odd[:3]} hold '|', ';' or '/': written with another separator than "
                          f"task.separator {task.separator!r}?[/yellow]")


def _task_summary(project, rows: list[dict[str, Any]], golden: list[dict[str, Any]]) -> dict[str, Any]:
    """The task kind of the project file, or inferred from the answers (tunegate.evals.labels.task_summary)."""
    from tunegate.data.records import reference_answer
    from tunegate.evals.labels import task_summary

    demos = [r for r in rows if "messages" in r or "completion" in r]
    return task_summary(project.task, [reference_answer(r) for r in demos], [reference_answer(g) for g in golden])


def _write_stats_and_card(st: Stage, stats: dict[str, Any], timings: dict[str, Any], rejected: list[Rejection],
                          lengths: list[int]) -> None:
    """stats.json, timings.json, data_card.md, and data_card.html with token_lengths.png."""
    from tunegate.report.data_card import data_card_markdown, write_data_card_html

    atomic_write_json(st.dir / "stats.json", stats)
    atomic_write_json(st.dir / "timings.json", timings)
    atomic_write_text(st.dir / "data_card.md", data_card_markdown(st.project, stats, timings))
    write_data_card_html(st.dir, st.project, stats, [r.to_json() for r in rejected], lengths, timings)


# ---------------------------------------------------------------------------------------------- row steps


def read_sources(sources, keep_raw: bool = True) -> tuple[list[dict[str, Any]], list[Rejection], dict[str, dict[str, int]]]:
    """Every source read and structurally validated (tunegate.data.records.read_source), ids made unique across
    sources. Returns (rows, rejections, per-source counts: rows_read, rejected_structure).

    keep_raw: False drops a rejected row's raw content and keeps its file and line (with data.pii set: a row that
    failed validation is never scanned for PII, so its text must not reach rejected.jsonl).
    """
    rows: list[dict[str, Any]] = []
    rejections: list[Rejection] = []
    per_source: dict[str, dict[str, int]] = {}
    for src in sources:
        recs, rej = read_source(src)
        per_source[src.name] = {"rows_read": len(recs) + len(rej), "rejected_structure": sum(rejection_kind(r.rule) == "invalid" for r in rej)}
        rows += recs
        rejections += rej
    dedupe_ids(rows)
    if not keep_raw:
        for r in rejections:
            r.raw = None
    return rows, rejections, per_source


def read_golden(cfg, tokenizer=None, before_freeze=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The golden set (`data.golden`), frozen into its lock on first use and checked against it after.

    Returns (golden rows, the lock). Raises TunegateError when a golden row is invalid (a golden set must be
    clean; with `tokenizer`, a row whose text spells one of its control tokens is invalid too, rule
    `control_token`), when it is empty, when `before_freeze(rows)` raises, or when it no longer matches its lock.
    Invalid rows are refused before the lock is written.
    """
    golden, rejections = read_source(cfg.golden, role="golden")
    if tokenizer is not None:
        rejections += golden_lock.control_token_rows(golden, tokenizer)
    if rejections:
        shown = "\n  ".join(str(r) for r in rejections[:10])
        raise TunegateError(f"{cfg.golden.path}: {len(rejections)} golden row(s) are invalid; a golden set must be clean:\n  {shown}")
    if not golden:
        raise TunegateError(f"{cfg.golden.path}: the golden set is empty")
    if before_freeze is not None:  # a golden set the project cannot use is refused before it is frozen
        before_freeze(golden)
    lock, new_lock = golden_lock.freeze(cfg.golden, golden, cfg.golden_lock)
    console.print(
        f"golden set: {len(golden)} rows, "
        + (f"frozen now into {cfg.golden_lock}" if new_lock else f"matches its lock {cfg.golden_lock.name}")
    )
    return golden, lock


def _pii_redactor(cfg):
    """The redactor `data.pii` asks for (tunegate.data.pii), or None when it is not set."""
    if cfg.pii is None:
        return None
    from tunegate.data.pii import redactor_from_config

    return redactor_from_config(cfg.pii)


def redact_pii(rows: list[dict[str, Any]], golden: list[dict[str, Any]], redactor, cfg,
               num_proc: int) -> tuple[list[dict[str, Any]], list[Rejection], dict[str, Any]]:
    """Every turn redacted, then re-scanned: a row still holding PII is rejected (`pii_rescan`; `pii` in drop mode).

    The golden set is frozen (hash-locked) and never trained on: it is scanned and reported, not redacted.
    Returns (kept rows, rejections, stats.json's `pii` report, without its wall-clock fields).
    """
    by_id = {r["id"]: r for r in rows}
    kept, drops, report = redactor.redact_records(rows, progress=True, engine=cfg.engine, num_proc=num_proc)
    rejections = [Rejection.of_row(by_id[d.id], d.rule, d.detail) for d in drops]
    seconds, rows_per_s = report.pop("seconds"), report.pop("rows_per_s")  # stats.json stays deterministic
    golden_texts = [row_text(g) for g in golden]
    golden_hits = redactor.analyze(golden_texts)
    report["golden_rows_with_pii"] = sum(1 for h in golden_hits if h)
    report["golden_rows_unscanned"] = sum(len(t) > redactor.max_chars for t in golden_texts)
    if report["golden_rows_with_pii"]:
        console.print(
            f"[yellow]the golden set has PII in {report['golden_rows_with_pii']} of {len(golden)} rows; it is "
            f"frozen and not trained on, so it is not redacted: it stays in golden.jsonl and eval outputs[/yellow]"
        )
    found = ", ".join(f"{k} {v}" for k, v in report["found_by_type"].items()) or "none"
    console.print(
        f"PII ({cfg.pii.mode}): found {found} in {report['rows_with_pii']} of {report['rows_scanned']} rows; "
        f"rejected {report['rows_dropped_pii']} (pii), {report['rows_dropped_rescan']} (pii_rescan), "
        f"{report['rows_dropped_unscannable']} (pii_unscannable); "
        f"{seconds} s, {rows_per_s} rows/s"
    )
    return kept, rejections, report


def encode_rows(rows: list[dict[str, Any]], base: str, cfg, num_proc: int,
                added_tokens: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], list[Rejection], dict[str, int], set[str]]:
    """Each row through the system-message policy, the chat template with its loss mask, and the over-length
    policy (tunegate.data.format.encode_batch_fn), on `num_proc` processes of `data.engine`.

    base: the base model's local folder (only its tokenizer is loaded, with `added_tokens`: train.added_tokens). Returns (kept rows with the system policy
    applied, rejections, tokens per kept row id, ids of kept rows the policy truncated).
    """
    from functools import partial

    from tunegate.data.engine import map_batches
    from tunegate.data.format import encode_batch_fn

    kept, rejections, n_tokens, truncated = [], [], {}, set()
    encoded = map_batches(partial(encode_batch_fn, base, cfg.system_role, cfg.max_length, cfg.overlength, added_tokens), rows,
                          engine=cfg.engine, num_proc=num_proc, batch_size=512, desc="chat template")
    for rec, res in zip(rows, encoded):
        if res[0] == "rejected":
            rejections.append(Rejection.of_row(rec, res[1], res[2]))
            continue
        _, rec, n, was_truncated = res
        if was_truncated:
            truncated.add(rec["id"])
        n_tokens[rec["id"]] = n
        kept.append(rec)
    return kept, rejections, n_tokens, truncated


def _warn_near_identical_pairs(rows: list[dict[str, Any]]) -> None:
    """Identical preference pairs were rejected at read time; near-identical ones carry little signal."""
    near = [r["id"] for r in rows if "near_identical" in r["meta"]]
    if near:
        console.print(f"[yellow]{len(near)} preference pair(s) have near-identical chosen and rejected answers "
                      f"(similarity >= 0.95): {', '.join(near[:10])}[/yellow]")


def apply_system_policy_to_golden(golden: list[dict[str, Any]], cfg, has_system: bool) -> None:
    """The golden prompts go through the training rows' system-message policy, in place, so a prompt is the same
    in train and eval. Raises TunegateError for a golden row the policy rejects."""
    for rec in golden:
        if "messages" in rec:
            try:
                rec["messages"] = apply_system_policy(rec["messages"], cfg.system_role, has_system)
            except RowError as exc:
                raise TunegateError(f"{cfg.golden.path}:{rec['meta']['line']} (id {rec['id']}): {exc.rule}: {exc.detail}") from None


def _duplicate_example(kind: str, d, by_id: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A removed duplicate and the row kept in its place, both texts clipped for the card."""
    return {"kind": kind, "id": d.id, "duplicate_of": d.duplicate_of, "similarity": d.jaccard,
            "text": _clip(row_text(by_id[d.id])), "kept_text": _clip(row_text(by_id[d.duplicate_of]))}


def drop_duplicates(rows: list[dict[str, Any]], dedup_cfg) -> tuple[list[dict[str, Any]], list[Rejection], dict[str, int], list[dict[str, Any]]]:
    """Exact duplicates after normalisation and, with `data.dedup.near`, MinHash-LSH near duplicates verified by
    Jaccard (tunegate.data.dedup.dedup), compared on `row_text`. The kept row of a group is the best
    (highest `row_quality`), then the first seen.

    Returns (kept rows in input order, rejections (`duplicate`), removals per kind {"exact", "near"}, up to
    DUPLICATE_EXAMPLES examples per kind for the card).
    """
    from tunegate.data.dedup import dedup

    by_id = {r["id"]: r for r in rows}
    position = {r["id"]: i for i, r in enumerate(rows)}
    quality = {r["id"]: row_quality(r) for r in rows}
    best_first = sorted(rows, key=lambda r: (-quality[r["id"]], position[r["id"]]))
    kept, dups = dedup(best_first, row_text, dedup_cfg.near, dedup_cfg.threshold, dedup_cfg.num_perm, dedup_cfg.shingle_words,
                       one_word_variants=dedup_cfg.one_word_variants)
    kept.sort(key=lambda r: position[r["id"]])
    dups.sort(key=lambda d: position[d.id])
    counts, examples, rejections = {"exact": 0, "near": 0}, [], []
    for d in dups:
        counts[d.kind] += 1
        if counts[d.kind] <= DUPLICATE_EXAMPLES:
            examples.append(_duplicate_example(d.kind, d, by_id))
        detail = f"{d.kind} duplicate of {d.duplicate_of}" + (f" (Jaccard {d.jaccard})" if d.kind == "near" else "")
        rejections.append(Rejection.of_row(by_id[d.id], "duplicate", detail))
    console.print(f"duplicates removed: {counts['exact']} exact, {counts['near']} near")
    return kept, rejections, counts, examples


def drop_semantic_duplicates(rows: list[dict[str, Any]], sem) -> tuple[list[dict[str, Any]], list[Rejection], list[dict[str, Any]]]:
    """SemDeDup (`data.dedup.semantic`, tunegate.data.dedup.semantic_dedup) over MiniLM embeddings of `row_text`;
    the kept row of a group is the one with the highest `row_quality`.

    Returns (kept rows, rejections (`semantic_duplicate`), up to DUPLICATE_EXAMPLES examples for the card).
    """
    from tunegate.data.dedup import semantic_dedup

    by_id = {r["id"]: r for r in rows}
    t0 = time.perf_counter()
    kept, dups = semantic_dedup(rows, row_text, sem.threshold, sem.clusters, sem.seed, quality=row_quality)
    examples = [_duplicate_example("semantic", d, by_id) for d in dups[:DUPLICATE_EXAMPLES]]
    rejections = [Rejection.of_row(by_id[d.id], "semantic_duplicate", f"semantic duplicate of {d.duplicate_of} (cosine {d.jaccard})")
                  for d in dups]
    console.print(f"semantic duplicates removed: {len(dups)} of {len(rows)} rows (cosine >= {sem.threshold}); "
                  f"{time.perf_counter() - t0:.1f} s")
    return kept, rejections, examples


def drop_golden_overlap(rows: list[dict[str, Any]], golden: list[dict[str, Any]],
                        before_redaction: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Training rows whose prompt equals a golden prompt after normalisation (tunegate.data.golden.overlap), and
    those `before_redaction` found (train id, golden id) on the rows before PII redaction. Rejected as
    `golden_overlap`, one rejection per (row, golden row) pair."""
    by_id = {r["id"]: r for r in rows}
    pairs = golden_lock.overlap(rows, golden)
    seen = {tid for tid, _ in pairs}
    pairs += [(tid, gid) for tid, gid in before_redaction if tid in by_id and tid not in seen]
    rejections = [Rejection.of_row(by_id[tid], "golden_overlap", f"same prompt as golden row {gid} after normalisation")
                  for tid, gid in pairs]
    overlapping = {tid for tid, _ in pairs}
    if pairs:
        console.print(f"[yellow]removed {len(pairs)} training row(s) that overlap the golden set: {', '.join(t for t, _ in pairs[:10])}[/yellow]")
    return [r for r in rows if r["id"] not in overlapping], rejections


def drop_golden_ngram_overlap(rows: list[dict[str, Any]], golden: list[dict[str, Any]],
                              cfg) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Training rows any turn of which (answers included) holds a golden prompt or answer: a shared word n-gram,
    or a short golden text contained whole, after lower-casing and stripping punctuation, so padded, quoted and
    re-punctuated copies go too (tunegate.data.golden.ngram_overlap, the rule the eval gate applies). `cfg`:
    data.decontaminate. Rejected as `golden_ngram_overlap`, one rejection per row."""
    by_id = {r["id"]: r for r in rows}
    hits = golden_lock.ngram_overlap(rows, golden, cfg.ngram, cfg.min_words)
    rejections = [Rejection.of_row(by_id[tid], "golden_ngram_overlap", what) for tid, gid, what in hits]
    dirty = {tid for tid, _, _ in hits}
    if hits:
        console.print(f"[yellow]removed {len(hits)} training row(s) holding a golden prompt or answer "
                      f"({cfg.ngram}-word n-grams; whole if {cfg.min_words} to {cfg.ngram - 1} words): "
                      f"{', '.join(t for t, _, _ in hits[:10])}[/yellow]")
    return [r for r in rows if r["id"] not in dirty], rejections


def select_rows(st: Stage, rows: list[dict[str, Any]],
                n_tokens: dict[str, int]) -> tuple[list[dict[str, Any]], list[Rejection], dict[str, Any]]:
    """data.select: score every row (`row_quality`; with `complexity: ifd` also the base model's IFD), drop rows
    above `max_ifd`, then DEITA's diverse selection to the budget (tunegate.data.quality). Scores go into each
    kept row's meta.

    n_tokens: tokens per row id (after the chat template), for a token budget. Returns (kept rows, rejections
    (`ifd_above_max`, `too_similar`, `over_budget`), stats.json's `selection` with the step's name under "step").
    """
    from tunegate.data import quality as q

    sel, cfg = st.project.data.select, st.project.data
    by_id = {r["id"]: r for r in rows}
    quality = {r["id"]: row_quality(r) for r in rows}
    ifd: dict[str, float | None] = {}
    if sel.complexity == "ifd":
        from tunegate.models import fit_embeddings, load_model, load_project_tokenizer, resolve_base_model

        base = resolve_base_model(st.project.base_model)
        console.print(f"data.select: scoring instruction-following difficulty of {len(rows)} rows with the base model")
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = load_project_tokenizer(st.project)
        model = load_model(base)
        fit_embeddings(model, tokenizer, st.project.train.added_tokens)  # rows for the added tokens, as training starts from
        model = model.to(device)
        scores = q.ifd_scores(rows, model, tokenizer, batch_size=sel.batch_size, max_length=cfg.max_length,
                              device=device, bf16=device == "cuda", progress=True)
        del model
        ifd = {s["id"]: s["ifd"] for s in scores}
    kept, dropped = rows, []
    if sel.max_ifd is not None and ifd:
        kept, dropped = q.filter_ifd(kept, [ifd[r["id"]] for r in kept], sel.max_ifd)
    score = {r["id"]: (q.combined_score(quality[r["id"]], ifd.get(r["id"]), sel.max_ifd or q.DEFAULT_MAX_IFD) if ifd else quality[r["id"]])
             for r in kept}
    kept, unselected = q.select_diverse(
        kept, [score[r["id"]] for r in kept], threshold=sel.diversity_threshold, budget_rows=sel.budget_rows,
        budget_tokens=sel.budget_tokens, token_counts=[n_tokens[r["id"]] for r in kept])
    rejections = [Rejection.of_row(by_id[u.id], u.reason, u.detail) for u in [*dropped, *unselected]]
    kept = [{**r, "meta": {**r["meta"], "quality": round(quality[r["id"]], 4),
                           **({"ifd": None if ifd[r["id"]] is None else round(ifd[r["id"]], 4)} if ifd else {}),
                           "selection_score": None if score[r["id"]] is None else round(score[r["id"]], 4)}} for r in kept]
    budget = ", ".join(x for x in (f"{sel.budget_rows} rows" if sel.budget_rows else "", f"{sel.budget_tokens} tokens" if sel.budget_tokens else "") if x)
    name = f"quality selection ({'IFD x quality' if ifd else 'quality'}, cosine < {sel.diversity_threshold}" + (f", budget {budget})" if budget else ")")
    ifd_values = sorted(v for v in ifd.values() if v is not None)
    by_reason = Counter(r.rule for r in rejections)
    console.print(f"{name}: kept {len(kept)} of {len(rows)}; " + ", ".join(f"{k} {v}" for k, v in by_reason.items()))
    return kept, rejections, {"step": name, "rows_in": len(rows), "rows_selected": len(kept), "complexity": sel.complexity,
                              "tokens_selected": sum(n_tokens[r["id"]] for r in kept),
                              "ifd_median": ifd_values[len(ifd_values) // 2] if ifd_values else None,
                              "unselected_by_reason": dict(by_reason)}


def _check_rejected_fraction(st: Stage, kept: list[dict[str, Any]], rejected: list[Rejection]) -> None:
    """Raises TunegateError when no row is left, when invalid rows are more than data.max_rejected_fraction of the
    rows read, or when rows the quality gates removed (REMOVAL_RULES) are more than data.max_removed_fraction.
    rejected.jsonl is written first, so the refusal shows why."""
    cfg = st.project.data
    total = len(kept) + len(rejected)
    by_rule = Counter(r.rule for r in rejected)
    kinds = Counter(rejection_kind(r.rule) for r in rejected)
    invalid = kinds["invalid"] / total if total else 1.0
    removed = kinds["removed"] / total if total else 0.0
    if kept and invalid <= cfg.max_rejected_fraction and removed <= cfg.max_removed_fraction:
        return
    atomic_write_jsonl(st.dir / "rejected.jsonl", [r.to_json() for r in rejected])
    if not kept:
        raise TunegateError(f"no usable training rows ({dict(by_rule)}); see {st.dir / 'rejected.jsonl'}")
    if invalid > cfg.max_rejected_fraction:
        rules = {k: v for k, v in by_rule.items() if rejection_kind(k) == "invalid"}
        raise TunegateError(
            f"{kinds['invalid']} of {total} rows rejected ({invalid:.1%}) > data.max_rejected_fraction "
            f"{cfg.max_rejected_fraction:.1%}; by rule: {rules}; see {st.dir / 'rejected.jsonl'}"
        )
    rules = {k: v for k, v in by_rule.items() if rejection_kind(k) == "removed"}
    raise TunegateError(
        f"{kinds['removed']} of {total} rows removed by the quality gates ({removed:.1%}) > data.max_removed_fraction "
        f"{cfg.max_removed_fraction:.1%}; by rule: {rules}; raise the limit if that many duplicates or overlaps are "
        f"expected; see {st.dir / 'rejected.jsonl'}"
    )


def _clip(text: str, n: int = 160) -> str:
    """One line of at most `n` characters for the card: whitespace collapsed, a cut marked with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def inputs(project) -> dict[str, Path]:
    """Every source file (a folder or glob source is each of its files) and the golden set."""
    from tunegate.data.records import source_files

    files = {f"source{i}" + (f".{j}" if j else ""): f for i, s in enumerate(project.data.sources) for j, f in enumerate(source_files(s))}
    golden = source_files(project.data.golden)  # one file; BFCL: its question and ground-truth files
    files |= {"golden" + (f".{j}" if j else ""): f for j, f in enumerate(golden)}
    return files


def prepare(project) -> None:
    """A `feedback:` source whose file `tunegate data feedback` has not written yet (nothing served, or the pipeline
    called from Python rather than through `tunegate run`, which exports it first) is an empty file: no rows."""
    from tunegate.core.io import atomic_write_jsonl
    from tunegate.core.paths import inside

    for src in project.data.sources:
        if src.feedback is not None and not src.path.exists():
            atomic_write_jsonl(inside(project.root, src.path, f"feedback/{src.path.name}"), [])


def config(project) -> dict[str, Any]:
    """The settings the data stage depends on: base_model and data, train.added_tokens when set (they change
    how rows tokenize: lengths, the over-length policy), and how a `task` reads answers as labels when it does
    (TaskConfig.reading: not its metrics)."""
    view = config_sections("base_model", "data")(project)
    reading = project.task.reading() if project.task is not None else None
    if reading is not None:
        view["task"] = reading
    if project.train.added_tokens:
        view["added_tokens"] = list(project.train.added_tokens)
    return view


SPEC = StageSpec(name="data", run=run, config=config, inputs=inputs, prepare=prepare)
