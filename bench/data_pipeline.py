"""The data stage at scale: rows/s per step on banking77 and on a 100k-row synthetic corpus, PII redaction
batched vs a per-row Presidio loop, and MinHash dedup of 100k short rows.

Parts (all by default; `--part` picks some):
    banking77   the data stage on ../shared/data/banking77/train.csv (10,003 rows; golden: 500 seeded test
                rows) with PII masking (default entity types), exact + MinHash near dedup and 13-gram
                decontamination, on every core: rows in/out and rows/s per step, the duplicates found (with
                examples), what the PII re-scan still finds.
    synthetic   the same stage on a seeded 100,000-row synthetic corpus of short banking-style requests with
                known exact duplicates (case/whitespace variants), near duplicates (one word put in front) and
                e-mail/phone PII.
    pii         PII speed on the 10,003 banking77 customer messages, in one run: a per-row
                `AnalyzerEngine.analyze` loop (Presidio's default spaCy pipeline, same recognizers, entities
                and threshold) against tunegate's batched redaction (analysis + masking + the re-scan) in one
                process and on every core. The target: batched >= 3x the per-row loop's rows/s.
    minhash     `tunegate.data.dedup.dedup` (exact + MinHash LSH, 5-word shingles, 128 permutations, Jaccard
                0.8, candidates verified) alone on the 100k synthetic rows. The target: under 2 minutes.

    python bench/data_pipeline.py                      # writes bench/results/data_pipeline.json
    python bench/data_pipeline.py --part minhash --rows 20000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNEGATE_SHARED_DATA", REPO.parent / "shared" / "data"))
BANKING = SHARED / "banking77"
PII_TYPES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "PERSON"]

VERBS = ["check", "cancel", "block", "activate", "top up", "transfer", "verify", "change", "close", "open", "refund", "dispute"]
THINGS = ["card", "account", "payment", "transfer", "pin", "balance", "statement", "fee", "refund", "exchange rate", "limit", "direct debit"]
WHEN = ["today", "yesterday", "last week", "this morning", "right now", "on monday", "after the trip", "before friday"]
WORDS = ("please help me understand why the app shows an error when i try to use my new virtual card abroad for the first "
         "time and whether there is anything i can do about the pending amount that still has not cleared").split()


def synthetic_rows(n: int, seed: int = 0) -> tuple[list[dict], dict]:
    """n short chat rows: ~90% distinct templated requests, 5% exact duplicates (changed case and spacing),
    5% near duplicates (one word put in front), 2% with an e-mail or a phone number."""
    rng = random.Random(seed)
    rows, originals, kinds = [], [], {"exact": 0, "near": 0, "pii": 0}
    for i in range(n):
        r = rng.random()
        if originals and r < 0.05:
            text, label = rng.choice(originals)
            text = text.upper().replace(" ", "  ")
            kinds["exact"] += 1
        elif originals and r < 0.10:
            text, label = rng.choice(originals)
            text = rng.choice(["hi", "hello", "please", "urgent:"]) + " " + text
            kinds["near"] += 1
        else:
            thing = rng.choice(THINGS)
            text = f"i want to {rng.choice(VERBS)} my {thing} {rng.choice(WHEN)} {' '.join(rng.sample(WORDS, 6))} ref {i}"
            if r > 0.98:
                text += rng.choice([f" mail me at user{i}@example.com", f" call me on +44 20 7946 {i % 10000:04d}"])
                kinds["pii"] += 1
            label = thing.replace(" ", "_")
            originals.append((text, label))
        rows.append({"id": f"s{i}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]})
    return rows, kinds


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_stage(project_yaml: str, workdir: Path) -> dict:
    """Run `tunegate data` in a fresh process (as a user would) and collect stats and timings."""
    (workdir / "tunegate.yaml").write_text(project_yaml)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunegate.cli", "data", str(workdir / "tunegate.yaml")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tunegate data failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = workdir / "runs" / "default" / "data"
    stats = json.loads((out / "stats.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    return {
        "wall_s_process": round(wall, 1),
        "rows_read": stats["rows_read"], "rows_kept": stats["rows_kept"], "rejected_by_rule": stats["rejected_by_rule"],
        "steps": [{**t, "rows_out": s["rows_out"], "removed_by_rule": s["removed_by_rule"]}
                  for t, s in zip(timings["steps"], stats["steps"])] + timings["steps"][len(stats["steps"]):],
        "stage_seconds": timings["total_seconds"], "num_proc": timings["num_proc"],
        "duplicates_removed": stats["duplicates_removed"], "duplicate_examples": stats["duplicate_examples"],
        "pii": {k: stats["pii"][k] for k in ("rows_scanned", "rows_with_pii", "found_by_type", "rescan_by_type",
                                             "rows_dropped_rescan")} if stats.get("pii") else None,
    }


def part_banking77() -> dict:
    if not (BANKING / "train.csv").is_file():
        return {"skipped": f"{BANKING} not found"}
    with tempfile.TemporaryDirectory() as tmp:
        return run_stage(f"""
name: banking77-bench
data:
  sources: [{{path: {BANKING / 'train.csv'}, format: csv, prompt_column: text, completion_column: category,
             instruction: "Banking intent label?", license: CC-BY-4.0}}]
  golden: {{path: {BANKING / 'test.csv'}, format: csv, prompt_column: text, completion_column: category,
            instruction: "Banking intent label?", sample: 500, seed: 0}}
  max_length: 128
  dedup: {{}}
  pii: {{mode: mask}}
  max_rejected_fraction: 0.2
train: {{method: sft}}
""", Path(tmp))


def part_synthetic(n: int) -> dict:
    rows, kinds = synthetic_rows(n)
    golden, _ = synthetic_rows(100, seed=99)
    golden = [{**g, "id": f"g{i}"} for i, g in enumerate(golden)]
    with tempfile.TemporaryDirectory() as tmp:
        _write_jsonl(Path(tmp) / "train.jsonl", rows)
        _write_jsonl(Path(tmp) / "golden.jsonl", golden)
        res = run_stage("""
name: synthetic-bench
data:
  sources: [{path: train.jsonl, format: chat, license: synthetic (bench/data_pipeline.py)}]
  golden: {path: golden.jsonl, format: chat}
  max_length: 128
  dedup: {}
  pii: {mode: mask, entities: [EMAIL_ADDRESS, PHONE_NUMBER]}
  decontaminate: null
  max_rejected_fraction: 0.2
train: {method: sft}
""", Path(tmp))
    return {"rows": n, "planted": kinds, **res}


def part_pii(n: int | None) -> dict:
    import csv

    from tunegate.data.engine import default_num_proc
    from tunegate.data.pii import Redactor, build_analyzer

    if not (BANKING / "train.csv").is_file():
        return {"skipped": f"{BANKING} not found"}
    with open(BANKING / "train.csv", newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)][:n]
    records = [{"id": str(i), "source": "bench", "messages": [{"role": "user", "content": t}], "meta": {}} for i, t in enumerate(texts)]
    regions = ["US", "GB", "FR", "DE"]
    default = build_analyzer(regions, PII_TYPES, full_pipeline=True)
    redactor = Redactor(mode="mask", entities=PII_TYPES, regions=regions)
    for t in texts[:32]:  # warm both
        default.analyze(t, language="en", entities=PII_TYPES, score_threshold=0.35)
    redactor.analyze(texts[:32])
    out = {"rows": len(texts), "entities": PII_TYPES}
    t0 = time.perf_counter()
    per_row = [default.analyze(t, language="en", entities=PII_TYPES, score_threshold=0.35) for t in texts]
    out["per_row_analyze_default"] = _rate(len(texts), time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, _, one = redactor.redact_records(records, num_proc=1)
    out["batched_redact_1_process"] = _rate(len(texts), time.perf_counter() - t0)
    cores = default_num_proc()
    t0 = time.perf_counter()
    _, _, many = redactor.redact_records(records, num_proc=cores, chunk=512)
    out[f"batched_redact_{cores}_processes"] = _rate(len(texts), time.perf_counter() - t0)
    base = out["per_row_analyze_default"]["rows_per_s"]
    for k in ("batched_redact_1_process", f"batched_redact_{cores}_processes"):
        out[k]["speedup_vs_per_row_analyze"] = round(out[k]["rows_per_s"] / base, 2)
    out["target_3x_met"] = out[f"batched_redact_{cores}_processes"]["speedup_vs_per_row_analyze"] >= 3.0
    out["same_findings"] = {"per_row_rows_with_pii": sum(1 for r in per_row if r), "batched_rows_with_pii": one["rows_with_pii"],
                            "batched_processes_rows_with_pii": many["rows_with_pii"],
                            "found_by_type_1_vs_processes_equal": one["found_by_type"] == many["found_by_type"]}
    return out


def part_minhash(n: int) -> dict:
    from tunegate.data.dedup import dedup

    rows, kinds = synthetic_rows(n)
    text = lambda r: "\n".join(m["content"] for m in r["messages"])  # noqa: E731
    t0 = time.perf_counter()
    kept, dropped = dedup(rows, text, near=True, threshold=0.8, num_perm=128, shingle_words=5)
    sec = time.perf_counter() - t0
    return {"rows": n, "planted": kinds, "seconds": round(sec, 1), "rows_per_s": round(n / sec, 1),
            "exact_removed": sum(d.kind == "exact" for d in dropped), "near_removed": sum(d.kind == "near" for d in dropped),
            "kept": len(kept), "target_under_120_s_met": sec < 120}


def _rate(n: int, sec: float) -> dict:
    return {"seconds": round(sec, 2), "rows_per_s": round(n / sec, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", action="append", choices=["banking77", "synthetic", "pii", "minhash"],
                    help="run only these parts (repeatable); default: all")
    ap.add_argument("--rows", type=int, default=100_000, help="synthetic corpus size")
    ap.add_argument("--pii-rows", type=int, default=None, help="banking77 messages for the PII speed part (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_pipeline.json")
    args = ap.parse_args()
    parts = args.part or ["minhash", "pii", "banking77", "synthetic"]
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result = {**old, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for part in parts:
        print(f"== {part}", flush=True)
        t0 = time.perf_counter()
        result[part] = {"banking77": part_banking77, "synthetic": lambda: part_synthetic(args.rows),
                        "pii": lambda: part_pii(args.pii_rows), "minhash": lambda: part_minhash(args.rows)}[part]()
        result[part]["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result[part], indent=1)[:3000], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every part: nothing lost on a crash
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
