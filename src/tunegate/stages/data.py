"""Data stage: read every source, validate every row, freeze the golden set, split train/val.

Order matters: structural validation of every row happens before the base model's tokenizer is
resolved, and no model weights are ever loaded here. Then each row is rendered through the real chat
template with its loss mask and over-length policy; rows that cannot be are rejected with their rule.

With `data.pii` set, every turn is redacted (tunegate.data.pii) before the template checks, and rows the
re-scan still finds PII in are rejected; the golden set is compared with the rows before redaction too.

Writes: train.jsonl, val.jsonl, golden.jsonl (the frozen golden rows), rejected.jsonl (file, line, id,
rule, detail), stats.json (with `steps`: rows in and out of each step, removals by rule), data_card.md, and
data_card.html with token_lengths.png (tunegate.report.data_card).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.data import golden as golden_lock
from tunegate.data.engine import default_num_proc
from tunegate.data.format import apply_system_policy, supports_system_role
from tunegate.data.records import dedupe_ids, read_source, Rejection, RowError
from tunegate.core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from tunegate.core.console import console
from tunegate.core.stage import Stage, StageResult, StageSpec, config_sections


def split_train_val(records: list[dict[str, Any]], val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split by a seeded hash of each row id: the same rows land in val on every machine."""
    if val_fraction <= 0 or len(records) < 2:
        return records, []
    keyed = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    n_val = max(1, round(len(records) * val_fraction))
    val_ids = {r["id"] for r in keyed[:n_val]}
    return [r for r in records if r["id"] not in val_ids], [r for r in records if r["id"] in val_ids]


def _row_text(rec: dict[str, Any]) -> str:
    """What duplicate detection compares: every turn's text (system turns excluded; a rejected answer and a
    KTO label included, so opposite labels are not duplicates), prompt + completion, or raw text."""
    if "text" in rec:
        return rec["text"]
    if "messages" in rec:
        extra = ([rec["rejected"]] if "rejected" in rec else []) + ([f"label: {rec['label']}"] if "label" in rec else [])
        return "\n".join([m["content"] for m in rec["messages"] if m["role"] != "system"] + extra)
    return rec["prompt"] + "\n" + rec["completion"]


def _quality(rec: dict[str, Any]) -> float:
    """A row's quality score, which picks the row kept from a group of duplicates: the source row's own `quality`
    (or `meta.quality`) when it has one, else tunegate.data.quality.heuristic_quality (0..1, deterministic)."""
    from tunegate.data.quality import heuristic_quality

    meta = rec.get("meta", {})
    q = meta.get("quality", meta.get("meta", {}).get("quality") if isinstance(meta.get("meta"), dict) else None)
    return float(q) if isinstance(q, (int, float)) and not isinstance(q, bool) else heuristic_quality(rec)


def run(st: Stage) -> StageResult:
    from tunegate.models import load_tokenizer, resolve_base_model

    cfg = st.project.data
    redactor = None
    if cfg.pii is not None:  # built first: a missing key or an unknown entity type fails before any work
        from tunegate.data.pii import redactor_from_config

        redactor = redactor_from_config(cfg.pii)
    records: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    per_source: dict[str, dict[str, int]] = {}
    steps: list[dict[str, Any]] = []  # the data card's "rows in / out per step"

    step_seconds: list[float] = []  # wall time per step, in timings.json (stats.json stays the same on a rerun)
    t_mark = time.perf_counter()
    num_proc = cfg.num_proc or default_num_proc()

    def step(name: str, rows_in: int, rows_out: int, first_rejection: int) -> None:
        nonlocal t_mark
        removed = Counter(r.rule for r in rejected[first_rejection:])
        steps.append({"step": name, "rows_in": rows_in, "rows_out": rows_out, "removed_by_rule": dict(sorted(removed.items()))})
        now = time.perf_counter()
        step_seconds.append(round(now - t_mark, 2))
        t_mark = now

    # 1. Structural validation: no tokenizer, no model.
    for src in cfg.sources:
        recs, rej = read_source(src)
        per_source[src.name] = {"rows_read": len(recs) + len(rej), "rejected_structure": len(rej)}
        records += recs
        rejected += rej
    dedupe_ids(records)
    step("read and validate structure", sum(c["rows_read"] for c in per_source.values()), len(records), 0)
    golden, golden_rej = read_source(cfg.golden, role="golden")
    if golden_rej:
        shown = "\n  ".join(str(r) for r in golden_rej[:10])
        raise TunegateError(f"{cfg.golden.path}: {len(golden_rej)} golden row(s) are invalid; a golden set must be clean:\n  {shown}")
    if not golden:
        raise TunegateError(f"{cfg.golden.path}: the golden set is empty")
    lock, new_lock = golden_lock.freeze(cfg.golden, golden, cfg.golden_lock)
    console.print(
        f"golden set: {len(golden)} rows, "
        + (f"frozen now into {cfg.golden_lock}" if new_lock else f"matches its lock {cfg.golden_lock.name}")
    )
    t_mark = time.perf_counter()  # reading and checking the golden set is not a step of the training rows

    # 1b. PII (case C21): redact every turn, then re-scan; rows still holding PII are rejected. Before the
    # template checks, so lengths are those of the redacted text that is trained on.
    pii_report, raw_overlap = None, []
    if redactor is not None:
        raw_overlap = golden_lock.overlap(records, golden)  # a masked value must not hide a golden copy
        for r in rejected:  # rows that failed validation were never scanned: keep file and line, not content
            r.raw = None
        by_id = {r["id"]: r for r in records}
        n_in, mark = len(records), len(rejected)
        records, drops, pii_report = redactor.redact_records(records, progress=True, engine=cfg.engine, num_proc=num_proc)
        for d in drops:
            rec = by_id[d.id]
            rejected.append(Rejection(rec["meta"]["file"], rec["meta"]["line"], d.id, d.rule, d.detail))
        step(f"PII ({cfg.pii.mode})", n_in, len(records), mark)
        seconds, rows_per_s = pii_report.pop("seconds"), pii_report.pop("rows_per_s")  # stats.json stays deterministic
        # The golden set is frozen (hash-locked) and never trained on: scanned and reported, not redacted.
        golden_hits = redactor.analyze([_row_text(g) for g in golden])
        pii_report["golden_rows_with_pii"] = sum(1 for h in golden_hits if h)
        if pii_report["golden_rows_with_pii"]:
            console.print(
                f"[yellow]the golden set has PII in {pii_report['golden_rows_with_pii']} of {len(golden)} rows; it is "
                f"frozen and not trained on, so it is not redacted: it stays in golden.jsonl and eval outputs[/yellow]"
            )
        found = ", ".join(f"{k} {v}" for k, v in pii_report["found_by_type"].items()) or "none"
        console.print(
            f"PII ({cfg.pii.mode}): found {found} in {pii_report['rows_with_pii']} of {pii_report['rows_scanned']} rows; "
            f"rejected {pii_report['rows_dropped_pii']} (pii), {pii_report['rows_dropped_rescan']} (pii_rescan); "
            f"{seconds} s, {rows_per_s} rows/s"
        )

    # 2. Template, loss-mask and length checks with the real tokenizer (no weights loaded), on every core.
    from functools import partial

    from tunegate.data.engine import map_batches
    from tunegate.data.format import encode_batch_fn

    base = str(resolve_base_model(st.project.base_model))  # converted once here, before any worker starts
    tokenizer = load_tokenizer(base)
    has_system = supports_system_role(tokenizer)
    kept, length_of, truncated = [], {}, set()
    mark = len(rejected)
    encoded = map_batches(partial(encode_batch_fn, base, cfg.system_role, cfg.max_length, cfg.overlength), records,
                          engine=cfg.engine, num_proc=num_proc, batch_size=512, desc="chat template")
    for rec, res in zip(records, encoded):
        if res[0] == "rejected":
            rejected.append(Rejection(rec["meta"]["file"], rec["meta"]["line"], rec["id"], res[1], res[2]))
            continue
        _, rec, n_tokens, was_truncated = res
        if was_truncated:
            truncated.add(rec["id"])
        length_of[rec["id"]] = n_tokens
        kept.append(rec)
    step(f"chat template, loss mask, max_length {cfg.max_length} ({cfg.overlength})", len(records), len(kept), mark)
    near = [r["id"] for r in kept if "near_identical" in r["meta"]]
    if near:  # case C08: identical pairs were rejected at read time; near-identical ones carry little signal
        console.print(f"[yellow]{len(near)} preference pair(s) have near-identical chosen and rejected answers "
                      f"(similarity >= 0.95): {', '.join(near[:10])}[/yellow]")
    for rec in golden:  # the golden prompts go through the same policy (case C04: identical in train and eval)
        if "messages" in rec:
            try:
                rec["messages"] = apply_system_policy(rec["messages"], cfg.system_role, has_system)
            except RowError as exc:
                raise TunegateError(f"{cfg.golden.path}:{rec['meta']['line']} (id {rec['id']}): {exc.rule}: {exc.detail}") from None

    # 3. Duplicates: exact after normalisation, then near-duplicates (MinHash LSH, verified by Jaccard), then
    # (data.dedup.semantic) SemDeDup over MiniLM embeddings.
    n_dup = {"exact": 0, "near": 0}
    dup_examples: list[dict[str, Any]] = []
    if cfg.dedup is not None:
        from tunegate.data.dedup import dedup

        by_id = {r["id"]: r for r in kept}
        mark = len(rejected)
        # The kept row of a group is the best (highest quality), then the first seen: rows go in that order.
        position = {r["id"]: i for i, r in enumerate(kept)}
        quality = {r["id"]: _quality(r) for r in kept}
        best_first = sorted(kept, key=lambda r: (-quality[r["id"]], position[r["id"]]))
        kept, dups = dedup(best_first, _row_text, cfg.dedup.near, cfg.dedup.threshold, cfg.dedup.num_perm, cfg.dedup.shingle_words)
        kept.sort(key=lambda r: position[r["id"]])
        dups.sort(key=lambda d: position[d.id])
        for d in dups:
            rec = by_id[d.id]
            n_dup[d.kind] += 1
            if sum(e["kind"] == d.kind for e in dup_examples) < 5:  # the card shows a few, with both texts
                dup_examples.append({"kind": d.kind, "id": d.id, "duplicate_of": d.duplicate_of, "similarity": d.jaccard,
                                     "text": _clip(_row_text(rec)), "kept_text": _clip(_row_text(by_id[d.duplicate_of]))})
            detail = f"{d.kind} duplicate of {d.duplicate_of}" + (f" (Jaccard {d.jaccard})" if d.kind == "near" else "")
            rejected.append(Rejection(rec["meta"]["file"], rec["meta"]["line"], d.id, "duplicate", detail))
        step("duplicates" + (" (exact and near)" if cfg.dedup.near else " (exact)"), len(by_id), len(kept), mark)
        console.print(f"duplicates removed: {n_dup['exact']} exact, {n_dup['near']} near")
        if cfg.dedup.semantic is not None:

            from tunegate.data.dedup import semantic_dedup

            sem, mark, n_in, t0 = cfg.dedup.semantic, len(rejected), len(kept), time.perf_counter()
            kept, sdups = semantic_dedup(kept, _row_text, sem.threshold, sem.clusters, sem.seed, quality=_quality)
            n_dup["semantic"] = len(sdups)
            for d in sdups:
                rec = by_id[d.id]
                if sum(e["kind"] == "semantic" for e in dup_examples) < 5:
                    dup_examples.append({"kind": "semantic", "id": d.id, "duplicate_of": d.duplicate_of, "similarity": d.jaccard,
                                         "text": _clip(_row_text(rec)), "kept_text": _clip(_row_text(by_id[d.duplicate_of]))})
                rejected.append(Rejection(rec["meta"]["file"], rec["meta"]["line"], d.id, "semantic_duplicate",
                                          f"semantic duplicate of {d.duplicate_of} (cosine {d.jaccard})"))
            step(f"semantic duplicates (SemDeDup, cosine >= {sem.threshold})", n_in, len(kept), mark)
            console.print(f"semantic duplicates removed: {len(sdups)} of {n_in} rows (cosine >= {sem.threshold}); "
                          f"{time.perf_counter() - t0:.1f} s")

    # 4. Decontamination against the golden set (case C23): overlapping training rows are removed and listed.
    by_id = {r["id"]: r for r in kept}
    mark = len(rejected)
    pairs = golden_lock.overlap(kept, golden)
    seen = {tid for tid, _ in pairs}
    pairs += [(tid, gid) for tid, gid in raw_overlap if tid in by_id and tid not in seen]
    for tid, gid in pairs:
        rec = by_id[tid]
        rejected.append(Rejection(rec["meta"]["file"], rec["meta"]["line"], tid, "golden_overlap", f"same prompt as golden row {gid} after normalisation"))
    overlapping = {tid for tid, _ in pairs}
    kept = [r for r in kept if r["id"] not in overlapping]
    step("golden-set overlap", len(by_id), len(kept), mark)
    if pairs:
        console.print(f"[yellow]removed {len(pairs)} training row(s) that overlap the golden set: {', '.join(t for t, _ in pairs[:10])}[/yellow]")
    # 4b. n-gram decontamination (data.decontaminate): a prompt sharing a word n-gram with a golden prompt,
    # after lower-casing and stripping punctuation, so padded and re-punctuated copies go too.
    ngram_hits: list[tuple[str, str, str]] = []
    if cfg.decontaminate is not None:
        n_in, mark = len(kept), len(rejected)
        ngram_hits = golden_lock.ngram_overlap(kept, golden, cfg.decontaminate.ngram)
        for tid, gid, shared in ngram_hits:
            rec = by_id[tid]
            rejected.append(Rejection(rec["meta"]["file"], rec["meta"]["line"], tid, "golden_ngram_overlap",
                                      f"shares a {cfg.decontaminate.ngram}-word n-gram with golden row {gid}: \"{shared}\""))
        dirty = {tid for tid, _, _ in ngram_hits}
        kept = [r for r in kept if r["id"] not in dirty]
        step(f"golden-set n-gram overlap ({cfg.decontaminate.ngram}-word)", n_in, len(kept), mark)
        if ngram_hits:
            console.print(f"[yellow]removed {len(ngram_hits)} training row(s) sharing a {cfg.decontaminate.ngram}-word n-gram "
                          f"with the golden set: {', '.join(t for t, _, _ in ngram_hits[:10])}[/yellow]")

    # 4c. Quality scoring and diversity-aware selection (data.select, DEITA): deliberate choices, not faults, so
    # they do not count towards max_rejected_fraction, which is checked first (no model loads for a refused run).
    selection = None
    _check_rejected_fraction(st, kept, rejected)
    if cfg.select is not None:
        kept, selection = _select(st, kept, length_of, rejected)
        step(selection["step"], selection["rows_in"], len(kept), selection["mark"])

    # 5. Rejections: written first, so a refused run still shows why.
    atomic_write_jsonl(st.dir / "rejected.jsonl", [r.to_json() for r in rejected])
    total = len(kept) + len(rejected)
    by_rule = Counter(r.rule for r in rejected)
    for r in rejected[:5]:
        console.print(f"[yellow]rejected[/yellow] {r}")
    if len(rejected) > 5:
        console.print(f"[yellow]... {len(rejected) - 5} more in {st.dir / 'rejected.jsonl'}[/yellow]")
    _check_rejected_fraction(st, kept, rejected)

    # 6. Deterministic split and outputs.
    lengths = [length_of[r["id"]] for r in kept]
    n_truncated = sum(r["id"] in truncated for r in kept)
    train, val = split_train_val(kept, cfg.val_fraction, cfg.seed)
    atomic_write_jsonl(st.dir / "train.jsonl", train)
    atomic_write_jsonl(st.dir / "val.jsonl", val)
    atomic_write_jsonl(st.dir / "golden.jsonl", golden)
    for path, counts in per_source.items():
        counts["rejected"] = sum(1 for r in rejected if r.file == path)
        counts["kept"] = sum(1 for r in kept if r["meta"]["file"] == path)
        counts["train"] = sum(1 for r in train if r["meta"]["file"] == path)
        counts["val"] = counts["kept"] - counts["train"]
    stats = {
        "rows_read": total,
        "rows_kept": len(kept),
        "rows_rejected": len(rejected),
        "rejected_by_rule": dict(by_rule),
        "train_rows": len(train),
        "val_rows": len(val),
        "golden_rows": len(golden),
        "golden_sha256": lock["file_sha256"],
        "golden_overlap_removed": len(pairs) + len(ngram_hits),
        "golden_ngram_overlap_removed": len(ngram_hits),
        "duplicates_removed": n_dup,
        "duplicate_examples": dup_examples,
        "pii": pii_report,
        "truncated_rows": n_truncated,
        "tokens_total": sum(lengths),
        "tokens_per_row_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_per_row_max": max(lengths),
        "template_has_system_role": has_system,
        "near_identical_pairs": sum(1 for r in kept if "near_identical" in r["meta"]),
        "selection": None if selection is None else {k: v for k, v in selection.items() if k not in ("mark", "step")},
        "steps": steps,
        "per_source": per_source,
        "licenses": sorted({s.license for s in cfg.sources if s.license}),
    }
    step("split and write", len(kept), len(kept), len(rejected))
    steps.pop()  # timed, not a filter: its rows in and out are the same
    timings = {"engine": cfg.engine, "num_proc": num_proc, "total_seconds": round(sum(step_seconds), 2),
               "steps": [{"step": name, "seconds": sec, "rows_in": rows_in,
                          "rows_per_s": round(rows_in / sec, 1) if sec > 0 else None}
                         for name, sec, rows_in in zip([x["step"] for x in steps] + ["split and write"], step_seconds,
                                                       [x["rows_in"] for x in steps] + [len(kept)])]}
    atomic_write_json(st.dir / "stats.json", stats)
    atomic_write_json(st.dir / "timings.json", timings)
    atomic_write_text(st.dir / "data_card.md", _data_card(st, stats, timings))
    from tunegate.report.data_card import write_data_card_html

    write_data_card_html(st.dir, st.project, stats, [r.to_json() for r in rejected], lengths, timings)
    console.print(
        f"rows: {len(kept)} kept ({len(train)} train / {len(val)} val), {len(rejected)} rejected {dict(by_rule)}; "
        f"{len(golden)} golden"
    )
    return StageResult(metrics=stats, inputs={"golden_lock": Path(cfg.golden_lock)})


SELECTION_RULES = ("ifd_above_max", "too_similar", "over_budget")


def _check_rejected_fraction(st: Stage, kept: list[dict[str, Any]], rejected: list[Rejection]) -> None:
    """Raises TunegateError when no row is left, or when rows rejected for faults (not selection) are more than
    data.max_rejected_fraction of the rows read. rejected.jsonl is written first, so the refusal shows why."""
    cfg = st.project.data
    total = len(kept) + len(rejected)
    by_rule = Counter(r.rule for r in rejected)
    faults = [r for r in rejected if r.rule not in SELECTION_RULES]
    frac = len(faults) / total if total else 1.0
    if kept and frac <= cfg.max_rejected_fraction:
        return
    atomic_write_jsonl(st.dir / "rejected.jsonl", [r.to_json() for r in rejected])
    if not kept:
        raise TunegateError(f"no usable training rows ({dict(by_rule)}); see {st.dir / 'rejected.jsonl'}")
    raise TunegateError(
        f"{len(faults)} of {total} rows rejected ({frac:.1%}) > data.max_rejected_fraction "
        f"{cfg.max_rejected_fraction:.1%}; by rule: {dict(by_rule)}; see {st.dir / 'rejected.jsonl'}"
    )


def _select(st: Stage, kept: list[dict[str, Any]], length_of: dict[str, int], rejected: list[Rejection]) -> tuple[list, dict]:
    """data.select: score every row (heuristic quality; with `complexity: ifd` also the base model's IFD), drop
    rows above `max_ifd`, then DEITA's diverse selection to the budget. Scores go into each kept row's meta."""
    from tunegate.data import quality as q

    sel, cfg = st.project.data.select, st.project.data
    by_id = {r["id"]: r for r in kept}
    mark, n_in = len(rejected), len(kept)
    quality = {r["id"]: _quality(r) for r in kept}
    ifd: dict[str, float | None] = {}
    if sel.complexity == "ifd":
        from tunegate.models import load_model, load_tokenizer, resolve_base_model

        base = resolve_base_model(st.project.base_model)
        console.print(f"data.select: scoring instruction-following difficulty of {len(kept)} rows with the base model")
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(base).to(device)
        scores = q.ifd_scores(kept, model, load_tokenizer(base), batch_size=sel.batch_size, max_length=cfg.max_length,
                              device=device, bf16=device == "cuda", progress=True)
        del model
        ifd = {s["id"]: s["ifd"] for s in scores}
    dropped: list[q.Unselected] = []
    if sel.max_ifd is not None and ifd:
        kept, dropped = q.filter_ifd(kept, [ifd[r["id"]] for r in kept], sel.max_ifd)
    score = {r["id"]: (q.combined_score(quality[r["id"]], ifd.get(r["id"]), sel.max_ifd or q.DEFAULT_MAX_IFD) if ifd else quality[r["id"]])
             for r in kept}
    kept, unselected = q.select_diverse(
        kept, [score[r["id"]] for r in kept], threshold=sel.diversity_threshold, budget_rows=sel.budget_rows,
        budget_tokens=sel.budget_tokens, token_counts=[length_of[r["id"]] for r in kept])
    for u in [*dropped, *unselected]:
        rec = by_id[u.id]
        rejected.append(Rejection(rec["meta"]["file"], rec["meta"]["line"], u.id, u.reason, u.detail))
    kept = [{**r, "meta": {**r["meta"], "quality": round(quality[r["id"]], 4),
                           **({"ifd": None if ifd[r["id"]] is None else round(ifd[r["id"]], 4)} if ifd else {}),
                           "selection_score": None if score[r["id"]] is None else round(score[r["id"]], 4)}} for r in kept]
    budget = ", ".join(x for x in (f"{sel.budget_rows} rows" if sel.budget_rows else "", f"{sel.budget_tokens} tokens" if sel.budget_tokens else "") if x)
    name = f"quality selection ({'IFD x quality' if ifd else 'quality'}, cosine < {sel.diversity_threshold}" + (f", budget {budget})" if budget else ")")
    ifd_values = sorted(v for v in ifd.values() if v is not None)
    console.print(f"{name}: kept {len(kept)} of {n_in}; " + ", ".join(f"{k} {v}" for k, v in Counter(u.reason for u in [*dropped, *unselected]).items()))
    return kept, {"step": name, "mark": mark, "rows_in": n_in, "rows_selected": len(kept), "complexity": sel.complexity,
                  "tokens_selected": sum(length_of[r["id"]] for r in kept),
                  "ifd_median": ifd_values[len(ifd_values) // 2] if ifd_values else None,
                  "unselected_by_reason": dict(Counter(u.reason for u in [*dropped, *unselected]))}


def _clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _data_card(st: Stage, stats: dict[str, Any], timings: dict[str, Any] | None = None) -> str:
    sec = {t["step"]: t["seconds"] for t in (timings or {}).get("steps", [])}
    lines = [
        f"# Data card: {st.project.name}",
        "",
        f"- rows read: {stats['rows_read']}; kept: {stats['rows_kept']}; rejected: {stats['rows_rejected']}",
        f"- train / val / golden: {stats['train_rows']} / {stats['val_rows']} / {stats['golden_rows']}",
        f"- golden set sha256: `{stats['golden_sha256']}`",
        f"- tokens per row: mean {stats['tokens_per_row_mean']}, max {stats['tokens_per_row_max']}; "
        f"truncated rows: {stats['truncated_rows']} (policy `{st.project.data.overlength}`, max_length {st.project.data.max_length})",
        f"- licences: {', '.join(stats['licenses']) or 'not stated'}",
        (f"- duplicates removed: {stats['duplicates_removed']['exact']} exact, {stats['duplicates_removed']['near']} near"
         + (f", {stats['duplicates_removed']['semantic']} semantic" if "semantic" in stats["duplicates_removed"] else "")
         if st.project.data.dedup is not None else "- duplicates: not checked (`data.dedup` is not set)"),
        "- token lengths (after the over-length policy): ![token-length histogram](token_lengths.png); the same card as a page: data_card.html",
        "",
        "## Rows in and out per step",
        "",
        (f"Wall time on engine `{timings['engine']}`, {timings['num_proc']} process(es); "
         f"total {timings['total_seconds']} s (timings.json)." if timings else ""),
        "",
        "| step | in | out | removed by rule | seconds |",
        "|---|---:|---:|---|---:|",
        *[f"| {s['step']} | {s['rows_in']} | {s['rows_out']} | "
          f"{', '.join(f'{k} {v}' for k, v in s['removed_by_rule'].items()) or '-'} | {sec.get(s['step'], '-')} |" for s in stats["steps"]],
        "",
        *_duplicate_examples(stats.get("duplicate_examples", [])),
        "## Rejected rows by rule",
        "",
        "| rule | rows |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(stats["rejected_by_rule"].items())],
        "",
        *_pii_card(stats["pii"]),
        "## Per source",
        "",
        "| source | read | kept | train | val | rejected |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {Path(k).name} | {v['rows_read']} | {v['kept']} | {v['train']} | {v['val']} | {v['rejected']} |"
          for k, v in stats["per_source"].items()],
        "",
    ]
    return "\n".join(lines)


def _duplicate_examples(examples: list[dict[str, Any]]) -> list[str]:
    if not examples:
        return []
    return [
        "## Duplicate examples",
        "",
        "| kind | removed row | kept row | similarity | removed text | kept text |",
        "|---|---|---|---:|---|---|",
        *[f"| {e['kind']} | {e['id']} | {e['duplicate_of']} | {e['similarity']} | {_md_cell(e['text'])} | {_md_cell(e['kept_text'])} |"
          for e in examples],
        "",
    ]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _pii_card(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["## PII", "", "Not scanned (`data.pii` is not set).", ""]
    types = sorted(set(report["entities"]) | set(report["found_by_type"]))
    return [
        "## PII",
        "",
        (f"- mode `{report['mode']}`; regions {', '.join(report['regions'])}; phone match `{report['phone_match']}`; "
         f"score threshold {report['score_threshold']} (re-scan {report['rescan_score_threshold']})"),
        (f"- rows with PII: {report['rows_with_pii']} of {report['rows_scanned']}; rejected: {report['rows_dropped_pii']} "
         f"(`pii`), {report['rows_dropped_rescan']} still holding PII on re-scan (`pii_rescan`)"),
        f"- golden rows with PII (frozen, not redacted): {report['golden_rows_with_pii']}",
        *([f"- pseudonym key id: `{report['key_id']}`"] if report.get("key_id") else []),
        "",
        "| entity type | found | found again on re-scan |",
        "|---|---:|---:|",
        *[f"| {t} | {report['found_by_type'].get(t, 0)} | {report['rescan_by_type'].get(t, 0)} |" for t in types],
        "",
    ]


def inputs(project) -> dict[str, Path]:
    """Every source file (a folder or glob source is each of its files) and the golden set."""
    from tunegate.data.records import source_files

    files = {f"source{i}" + (f".{j}" if j else ""): f for i, s in enumerate(project.data.sources) for j, f in enumerate(source_files(s))}
    files["golden"] = project.data.golden.path
    return files


SPEC = StageSpec(name="data", run=run, config=config_sections("base_model", "data"), inputs=inputs)
