"""Freezing the golden set, and refusing a changed one or one that overlaps training data.

`check_golden` is the check every stage that scores the golden set runs first (eval, audit, drift).

The lock file (`data.golden_lock`, next to the project file by default) records the golden source's
sha256, how it was sampled, and one sha256 per row id. Once written, every run compares the golden set
against it: a changed file is refused with the ids of the rows that changed, were added or were removed.
To accept a deliberate change, delete the lock (or run `tunegate golden freeze PROJECT --force`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.core.io import atomic_write_json, read_jsonl
from tunegate.data.records import Rejection, normalize_text, prompt_text, read_source, reference_answer, row_hash, source_files
from tunegate.core.manifest import sha256_file


def _repeated_ids(records: list[dict[str, Any]]) -> list[str]:
    from collections import Counter

    return sorted(k for k, n in Counter(r["id"] for r in records).items() if n > 1)


def source_sha256(src) -> str:
    """The sha256 of a local source's bytes: its file's, or for a source of several files (BFCL questions with
    their ground truth, records.source_files) the sha256 of its `<sha256>  <relative path>` lines."""
    import hashlib

    files = source_files(src)
    if files == [Path(src.path)]:
        return sha256_file(src.path)
    root = Path(src.path) if Path(src.path).is_dir() else Path(src.path).parent
    lines = "".join(f"{sha256_file(f)}  {f.relative_to(root).as_posix()}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def build_lock(golden_cfg, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The lock of a golden set: a hash per row id, the row count and the file's hash.

    Raises:
        TunegateError: two rows share an id (the lock could not tell them apart).
    """
    repeated = _repeated_ids(records)
    if repeated:
        raise TunegateError(f"{golden_cfg.path}: {len(repeated)} id(s) used by more than one golden row ({', '.join(repeated[:10])}); "
                            "rule: every golden row has its own id, so the lock can tell each row apart")
    return {
        "file": Path(golden_cfg.path).name,
        "file_sha256": source_sha256(golden_cfg),
        "format": golden_cfg.format,
        "sample": golden_cfg.sample,
        "seed": golden_cfg.seed,
        "n_rows": len(records),
        "rows": {r["id"]: row_hash(r) for r in records},
        "frozen_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def freeze(golden_cfg, records: list[dict[str, Any]], lock_path: Path, force: bool = False) -> tuple[dict[str, Any], bool]:
    """Check the golden set against its lock, writing the lock if there is none (or force).

    Returns (lock, newly_written).
    Raises:
        TunegateError: the golden set differs from the lock; the message lists the changed row ids.
    """
    lock_path = Path(lock_path)
    if force or not lock_path.is_file():
        lock = build_lock(golden_cfg, records)
        atomic_write_json(lock_path, lock)
        return lock, True
    lock = read_lock(lock_path)
    check(golden_cfg, records, lock, lock_path)
    return lock, False


def read_lock(lock_path: Path) -> dict[str, Any]:
    """The golden lock at `lock_path`. Raises TunegateError naming the file when it is not a lock tunegate wrote
    (not JSON, e.g. git conflict markers, or without its `rows`), instead of a traceback."""
    try:
        lock = json.loads(Path(lock_path).read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TunegateError(f"{lock_path}: not a golden lock ({str(exc)[:120]}); resolve the edit or merge conflict, or "
                            "delete it and freeze again: tunegate golden freeze PROJECT") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("rows"), dict):
        raise TunegateError(f"{lock_path}: not a golden lock (no 'rows' mapping); delete it and freeze again: "
                            "tunegate golden freeze PROJECT")
    return lock


def check(golden_cfg, records: list[dict[str, Any]], lock: dict[str, Any], lock_path: Path) -> None:
    """Raises TunegateError when the golden rows differ from the lock: a row changed, added or removed (by id),
    an id used by two rows (a changed copy beside the original), a different row count, or other sampling."""
    current = {r["id"]: row_hash(r) for r in records}
    frozen = lock["rows"]
    changed = sorted(k for k in current.keys() & frozen.keys() if current[k] != frozen[k])
    added = sorted(current.keys() - frozen.keys())
    removed = sorted(frozen.keys() - current.keys())
    repeated = _repeated_ids(records)
    count_differs = isinstance(lock.get("n_rows"), int) and lock["n_rows"] != len(records)
    same_sampling = (lock.get("sample"), lock.get("seed")) == (golden_cfg.sample, golden_cfg.seed)
    if changed or added or removed or repeated or count_differs or not same_sampling:
        parts = [f"{len(repeated)} id(s) on more than one row: {', '.join(repeated[:10])}"] if repeated else []
        if count_differs:
            parts.append(f"{len(records)} rows, {lock['n_rows']} frozen")
        for label, ids in (("changed", changed), ("added", added), ("removed", removed)):
            if ids:
                shown = ", ".join(ids[:10]) + (f" ... (+{len(ids) - 10} more)" if len(ids) > 10 else "")
                parts.append(f"{len(ids)} {label}: {shown}")
        if not same_sampling:
            parts.append(f"sampling changed from sample={lock.get('sample')} seed={lock.get('seed')}")
        raise TunegateError(
            f"{golden_cfg.path}: golden set changed since it was frozen in {lock_path} ({'; '.join(parts)}); "
            "rule: a frozen golden set is immutable. Delete the lock or run `tunegate golden freeze --force` "
            "to freeze the new version on purpose."
        )


def overlap(train: list[dict[str, Any]], golden: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(train id, golden id) pairs whose prompts are equal after case and whitespace normalisation (case C23 in docs/cases.md).

    Catches verbatim copies and re-wrapped or re-spaced ones. Near-duplicates by n-gram similarity are the
    data pipeline's decontamination step.
    """
    index: dict[str, str] = {}
    for g in golden:
        index.setdefault(normalize_text(prompt_text(g)), g["id"])
    pairs = []
    for t in train:
        gid = index.get(normalize_text(prompt_text(t)))
        if gid is not None:
            pairs.append((t["id"], gid))
    return pairs


_PUNCT = re.compile(r"[^\w\s]+")
DEFAULT_NGRAM = 13  # words; the GPT-3 (Brown et al. 2020, app. C) and Llama 2 (Touvron et al. 2023) convention


def ngram_words(text: str) -> list[str]:
    """The words decontamination compares: `records.normalize_text` (NFKC, invisible characters removed, lower
    case), then punctuation stripped and whitespace collapsed."""
    return _PUNCT.sub(" ", normalize_text(text)).split()


MIN_CONTAINED_WORDS = 5  # a golden text this long or longer is looked for inside training text (bench/decontamination.py)


def _needles(golden: list[dict[str, Any]], n: int, min_words: int):
    """The golden texts to look for: each row's prompt and its reference answer, as normalised words.

    Returns (n-gram -> (golden id, "prompt"|"answer")) for texts of at least n words, and (words -> (golden id,
    part)) for texts of min_words to n-1 words, looked for whole inside training text (containment)."""
    grams: dict[tuple[str, ...], tuple[str, str]] = {}
    short: dict[tuple[str, ...], tuple[str, str]] = {}
    for g in golden:
        for part, text in (("prompt", prompt_text(g)), ("answer", reference_answer(g) if "text" not in g else "")):
            words = ngram_words(text)
            if len(words) >= n:
                for i in range(len(words) - n + 1):
                    grams.setdefault(tuple(words[i : i + n]), (g["id"], part))
            elif len(words) >= min_words:
                short.setdefault(tuple(words), (g["id"], part))
    return grams, short


def _turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, text) of every part of a training row a golden text could hide in: each turn but the system
    message (answers included), a rejected answer, or prompt and completion, or raw text."""
    if "text" in record:
        return [("text", record["text"])]
    if "messages" not in record:
        return [("prompt", record["prompt"]), ("completion", record["completion"])]
    out = [(f"turn {i} ({m['role']})", m["content"]) for i, m in enumerate(record["messages"]) if m["role"] != "system"]
    return out + ([("rejected answer", record["rejected"])] if "rejected" in record else [])


def ngram_overlap(train: list[dict[str, Any]], golden: list[dict[str, Any]], n: int = DEFAULT_NGRAM,
                  min_words: int = MIN_CONTAINED_WORDS) -> list[tuple[str, str, str]]:
    """(train id, golden id, what was found) for training rows that hold a golden prompt or answer (case C23).

    Every turn of a training row (answers included, the system message not) is compared with every golden
    prompt and every golden reference answer, both normalised by `ngram_words` (lower case, punctuation
    stripped, whitespace collapsed), so re-wrapped, re-spaced, re-cased, re-punctuated and padded copies match,
    and so does a golden prompt quoted in an answer:
      - a golden text of `n` words or more: any shared word `n`-gram (the GPT-3 / Llama 2 rule);
      - a golden text of `min_words` to n-1 words: its whole word sequence inside a training turn (containment);
      - a golden prompt shorter than that: a training prompt equal to it (an exact copy after normalisation).
    Golden answers shorter than `min_words` (a class label, a number) are never looked for: every training row
    of the task holds them. One hit per training row: the first turn, then the first position, that matches.
    """
    grams, short = _needles(golden, n, min_words)
    whole: dict[tuple[str, ...], str] = {}
    for g in golden:
        words = tuple(ngram_words(prompt_text(g)))
        if words and len(words) < min_words:
            whole.setdefault(words, g["id"])
    lengths = sorted({len(k) for k in short})
    hits = []
    for t in train:
        hit = None
        prompt = tuple(ngram_words(prompt_text(t)))
        if prompt in whole:
            hit = (t["id"], whole[prompt], f"its prompt is golden row {whole[prompt]}'s prompt: \"{' '.join(prompt)}\"")
        for where, text in _turns(t) if hit is None else ():
            words = tuple(ngram_words(text))
            for i in range(len(words)):
                found = grams.get(words[i : i + n]) if i + n <= len(words) else None
                size = n
                for size in lengths if found is None else ():
                    if i + size > len(words):
                        break
                    found = short.get(words[i : i + size])
                    if found is not None:
                        break
                if found is not None:
                    gid, part = found
                    shared = " ".join(words[i : i + size])
                    how = f"a {n}-word n-gram of" if size == n and words[i : i + n] in grams else "the whole"
                    hit = (t["id"], gid, f"{where} holds {how} golden row {gid}'s {part}: \"{shared}\"")
                    break
            if hit is not None:
                break
        if hit is not None:
            hits.append(hit)
    return hits


def control_token_rows(records: list[dict[str, Any]], tokenizer_or_specials) -> list[Rejection]:
    """A rejection (rule `control_token`) for each golden row with a text that spells one of the tokenizer's
    control tokens (tunegate.data.format.control_token_problem). A golden set is frozen and must be clean, so
    such a row is never dropped quietly: the data stage and the eval gate refuse the whole set, naming the row."""
    from tunegate.data.format import (
        CONTROL_TOKEN_RULE,
        record_control_token_problem,
        special_tokens,
    )

    specials = special_tokens(tokenizer_or_specials)  # once for all rows
    out = []
    for r in records:
        problem = record_control_token_problem(specials, r)
        if problem:
            out.append(Rejection.of_row(r, CONTROL_TOKEN_RULE, problem))
    return out


def check_golden(project, data_dir: Path, tokenizer=None) -> list[dict[str, Any]]:
    """The golden rows to score, after checking the lock and the train/golden overlap.

    project: a `tunegate.config.Project`. data_dir: a data stage's folder (golden.jsonl, train.jsonl, val.jsonl).
    tokenizer: the base model's; given, a golden row that spells one of its control tokens is refused too.
    Returns the rows of data_dir/golden.jsonl, in file order.

    Raises:
        TunegateError: the golden source has a bad row; the lock is missing; the golden set changed since it was
            frozen; a golden row spells a control token (with `tokenizer`; the data stage refuses such a set
            too, so only a data folder from before that rule has one); or training/validation rows overlap it
            (same normalised prompt, or with `data.decontaminate` a shared word n-gram: the rule the data stage
            applied).
    """
    cfg = project.data
    raw, rejected = read_source(cfg.golden, role="golden")
    if rejected:
        raise TunegateError(f"{cfg.golden.path}: {rejected[0]}")
    if not cfg.golden_lock.is_file():
        raise TunegateError(f"{cfg.golden_lock}: golden lock missing; the eval gate only scores a frozen golden set (rerun the data stage)")
    check(cfg.golden, raw, read_lock(cfg.golden_lock), cfg.golden_lock)
    data_dir = Path(data_dir)
    golden = read_jsonl(data_dir / "golden.jsonl")
    if tokenizer is not None:
        bad = control_token_rows(golden, tokenizer)
        if bad:
            raise TunegateError(f"{bad[0]}; rule: a golden set must be clean: fix the row, then freeze the set again "
                                "(tunegate golden freeze PROJECT --force) and rerun the data stage")
    trained = read_jsonl(data_dir / "train.jsonl") + read_jsonl(data_dir / "val.jsonl")
    pairs = overlap(trained, golden)
    if cfg.decontaminate is not None:  # the same n-gram rule the data stage applied
        seen = {t for t, _ in pairs}
        pairs += [(t, g) for t, g, _ in ngram_overlap(trained, golden, cfg.decontaminate.ngram, cfg.decontaminate.min_words)
                  if t not in seen]
    if pairs:
        shown = ", ".join(f"{t}~{g}" for t, g in pairs[:10])
        raise TunegateError(
            f"{data_dir / 'train.jsonl'}: {len(pairs)} training row(s) overlap the golden set (train~golden: {shown}); "
            "rule: the gate refuses to score a golden set the candidate was trained on"
        )
    return golden
