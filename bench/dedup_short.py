"""Near-duplicates of short texts (issue 20): recall on planted one-word variants of banking77 rows.

banking77's train.csv (10,003 customer messages, 12 words on average) as chat rows (message, intent label),
compared on `records.row_text` (message and label) as the data stage does. 1,000 seeded rows get a planted
variant with one word replaced (a digit changed, or a word swapped for another word of the corpus), put after
all originals. For each rule set it reports the share of planted variants dropped as duplicates of their
original, by the original's length in words, and how many of the 10,003 original rows it drops (banking77 has
paraphrases and templated rows of its own: these are not errors, but show how aggressive the rule is).

    before   tunegate.data.dedup at commit cf25042: 5-word shingles, datasketch's banding for threshold 0.8
    after    tunegate.data.dedup now: adaptive shingles, bands chosen for the threshold, one-word variants

    python bench/dedup_short.py          # writes bench/results/dedup_short.json
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNEGATE_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
BEFORE = "cf25042"


def load_before():
    """tunegate.data.dedup as it was at BEFORE (it depends only on records)."""
    from before import module_at

    return module_at(BEFORE, "src/tunegate/data/dedup.py", "dedup_before")


def variant(text: str, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    digits = [i for i, w in enumerate(words) if any(c.isdigit() for c in w)]
    i = rng.choice(digits) if digits else rng.randrange(len(words))
    if digits:
        words[i] = "".join(str((int(c) + 1) % 10) if c.isdigit() else c for c in words[i])
    else:
        words[i] = rng.choice([v for v in vocab if v.lower() != words[i].lower()])
    return " ".join(words)


def main() -> None:
    from tunegate.data import dedup as after
    from tunegate.data.records import row_text

    with open(SHARED / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        data = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    rows = [{"id": f"t{i}", "messages": [{"role": "user", "content": t}, {"role": "assistant", "content": c}]}
            for i, (t, c) in enumerate(data)]
    rng = random.Random(0)
    vocab = sorted({w for t, _ in data for w in t.split() if w.isalpha()})
    picked = rng.sample(range(len(rows)), 1000)
    planted = [{"id": f"v{i}", "of": f"t{i}", "messages": [{"role": "user", "content": variant(data[i][0], rng, vocab)},
                                                             {"role": "assistant", "content": data[i][1]}]} for i in picked]
    length = {f"v{i}": len(data[i][0].split()) for i in picked}
    buckets = [(1, 5), (6, 8), (9, 12), (13, 20), (21, 1000)]

    def bucket(n: int) -> str:
        return next(f"{lo}-{hi}" if hi < 1000 else f"{lo}+" for lo, hi in buckets if lo <= n <= hi)

    result = {"benchmark": "dedup_short", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "rows": len(rows), "planted": len(planted), "threshold": 0.8, "num_perm": 128}
    for name, fn, kwargs in (("before", load_before().dedup, {}), ("after", after.dedup, {})):
        t0 = time.perf_counter()
        _, dropped_clean = fn(rows, row_text, True, 0.8, 128, 5, **kwargs)
        _, dropped = fn(rows + planted, row_text, True, 0.8, 128, 5, **kwargs)
        seconds = round(time.perf_counter() - t0, 2)
        caught = {d.id for d in dropped if d.id.startswith("v")}
        per, total = Counter(), Counter()
        for v in planted:
            total[bucket(length[v["id"]])] += 1
            per[bucket(length[v["id"]])] += v["id"] in caught
        result[name] = {
            "recall": round(len(caught) / len(planted), 3),
            "recall_by_words": {b: f"{per[b]}/{total[b]} ({per[b] / total[b]:.2f})" for b in sorted(total, key=lambda b: int(b.split('-')[0].rstrip('+')))},
            "original_rows_dropped": len(dropped_clean),
            "original_rows_dropped_by_kind": dict(Counter(d.kind for d in dropped_clean)),
            "seconds_both_runs": seconds,
        }
        print(name, json.dumps(result[name]))
    result["after_params"] = {"lsh_bands_rows": after.lsh_params(0.8, 128), "one_word_words": [after.ONE_WORD_MIN, after.ONE_WORD_MAX],
                              "shingles": "words and word pairs under 20 words, else 5-word shingles",
                              "miss_probability_at_threshold": round((1 - 0.8 ** after.lsh_params(0.8, 128)[1]) ** after.lsh_params(0.8, 128)[0], 4)}
    (REPO / "bench" / "results" / "dedup_short.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
