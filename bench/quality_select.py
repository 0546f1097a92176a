"""IFD and DEITA-style selection on real data: banking77 with the embedded base model (SmolLM2-135M-Instruct).

Data: 200 rows of ../shared/data/banking77/train.csv, a seeded sample (seed 0), read as examples/banking77 reads
them: user = `text`, assistant = `category`, system instruction "Banking intent label?" (kept: the SmolLM2
template has a system role). Never committed; read in place.

Measures, on CPU (fp32):
    ifd           `ifd_scores` (batch 8, max_length 128): rows/s (wall and per process-CPU second: the 2 shared
                  cores are often busy, so the load average is recorded too), IFD min / median / max, the 3
                  highest- and 3 lowest-IFD rows verbatim
    quality       `heuristic_quality` of each row; `combined_score` = quality x clip(IFD, 0, 1)
    selection     `filter_ifd` (IFD > 1 dropped), then `select_diverse` (MiniLM, threshold 0.9) on the combined
                  score: how many rows are selected, and why the others are not

    nice -n 19 python bench/quality_select.py            # writes bench/results/quality_select.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TUNEGATE_SHARED_DATA", REPO.parent / "shared" / "data")) / "banking77" / "train.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality_select.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    from tunegate.config import SourceConfig
    from tunegate.data.format import apply_system_policy, supports_system_role
    from tunegate.data.quality import (
        _ifd_sequences,
        combined_score,
        filter_ifd,
        heuristic_quality,
        ifd_scores,
        select_diverse,
    )
    from tunegate.data.records import read_source
    from tunegate.models import load_model, load_tokenizer, resolve_base_model

    src = SourceConfig(path=DATA, format="csv", prompt_column="text", completion_column="category",
                       instruction="Banking intent label?", sample=args.rows, seed=0)
    records, rejected = read_source(src)
    assert not rejected, rejected[:3]
    base = resolve_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base)
    has_system = supports_system_role(tokenizer)
    for r in records:
        r["messages"] = apply_system_policy(r["messages"], "auto", has_system)
    model = load_model(base)

    ifd_scores(records[:4], model, tokenizer, batch_size=args.batch_size, max_length=128)  # warm-up
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    scored = ifd_scores(records, model, tokenizer, batch_size=args.batch_size, max_length=128, progress=False)
    ifd_s, ifd_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    load_after = os.getloadavg()[0]
    seqs = set()  # the distinct sequences ifd_scores runs (it runs a repeated one once)
    for r in records:
        cond, a, alone, b = _ifd_sequences(tokenizer, r, 128)
        seqs |= {(*cond, a), (*alone, b)}
    n_tokens = sum(len(k) - 1 for k in seqs)
    ok = [s for s in scored if s["ifd"] is not None]
    ifds = sorted(s["ifd"] for s in ok)

    def show(s):
        rec = next(r for r in records if r["id"] == s["id"])
        return {"id": s["id"], "user": rec["messages"][-2]["content"], "answer": rec["messages"][-1]["content"],
                "ifd": round(s["ifd"], 4), "loss_conditional": round(s["loss_conditional"], 4),
                "loss_answer": round(s["loss_answer"], 4), "quality": heuristic_quality(rec)}

    by_ifd = sorted(ok, key=lambda s: s["ifd"])
    quality = [heuristic_quality(r) for r in records]
    combined = [combined_score(q, s["ifd"]) for q, s in zip(quality, scored)]

    kept, above = filter_ifd(records, [s["ifd"] for s in scored])
    score_of = {r["id"]: c for r, c in zip(records, combined)}
    t0 = time.perf_counter()
    selected, unselected = select_diverse(kept, [score_of[r["id"]] for r in kept], threshold=args.threshold)
    sel_s = time.perf_counter() - t0
    n_labels = len({r["messages"][-1]["content"] for r in records})
    n_labels_sel = len({r["messages"][-1]["content"] for r in selected})

    result = {
        "bench": "quality_select",
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "data": {"file": "../shared/data/banking77/train.csv" if DATA.is_relative_to(REPO.parent / "shared") else DATA.name, "rows": len(records), "sample_seed": 0, "instruction": "Banking intent label?",
                 "distinct_labels": n_labels},
        "model": "smollm2-135m-instruct (fp32, CPU)",
        "ifd": {
            "batch_size": args.batch_size, "max_length": 128, "seconds": round(ifd_s, 2),
            "rows_per_s": round(len(records) / ifd_s, 2), "process_cpu_s": round(ifd_cpu_s, 2),
            "rows_per_cpu_s": round(len(records) / ifd_cpu_s, 2),
            "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            "distinct_sequences": len(seqs), "tokens": n_tokens, "tokens_per_s": round(n_tokens / ifd_s, 1),
            "scored": len(ok),
            "not_scored": dict(Counter(s["reason"].split(":")[0] for s in scored if s["reason"])),
            "min": round(ifds[0], 4), "median": round(statistics.median(ifds), 4), "max": round(ifds[-1], 4),
            "p10": round(ifds[len(ifds) // 10], 4), "p90": round(ifds[(9 * len(ifds)) // 10], 4),
            "above_1": sum(1 for v in ifds if v > 1.0),
            "mean_n_answer_tokens": round(statistics.mean(s["n_answer_tokens"] for s in ok), 2),
            "highest": [show(s) for s in by_ifd[-3:][::-1]],
            "lowest": [show(s) for s in by_ifd[:3]],
        },
        "quality": {"min": min(quality), "median": statistics.median(quality), "max": max(quality)},
        "selection": {
            "score": "combined_score = heuristic_quality x clip(IFD, 0, 1)",
            "ifd_above_max_dropped": len(above), "threshold": args.threshold,
            "candidates": len(kept), "selected": len(selected),
            "unselected": dict(Counter(u.reason for u in unselected)),
            "distinct_labels_selected": n_labels_sel, "seconds_with_minilm": round(sel_s, 2),
            "too_similar_examples": [u.to_json() | {"text": next(r["messages"][-2]["content"] for r in records if r["id"] == u.id),
                                                     "similar_text": next(r["messages"][-2]["content"] for r in records if r["id"] == u.similar_to)}
                                     for u in unselected if u.reason == "too_similar"][:5],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
