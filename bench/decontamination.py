"""Decontamination against the golden set (issue 20): recall on planted copies, and the flag rate on clean rows.

Golden set: the banking77 example's (500 seeded rows of ../shared/data/banking77/test.csv; labels as answers).
Training rows: banking77's train.csv (10,003 rows), plus copies of 200 golden prompts planted five ways:

    padded       filler words before and after the prompt ("Hi, quick one: ... Thanks a lot, Sam")
    rewrapped    line breaks and double spaces between the words
    recased      UPPER CASE, punctuation changed (commas after words, "?" to "!!")
    quoted       the prompt quoted inside an assistant answer to an unrelated user turn
    exact        the prompt as it is (the old rule caught only these, and re-wrapped/re-cased ones)

For each rule (the old one: a shared 13-gram, or the whole normalised prompt when shorter, prompts only; the new
one: `tunegate.data.golden.ngram_overlap`, every turn, containment from `min_words`) it reports recall per plant
type and the share of banking77's own train rows flagged (rows that are not planted copies: a flag there is a
false positive, or a real train/test duplicate of banking77, shown with examples), for min_words 4 to 8.

    python bench/decontamination.py        # writes bench/results/decontamination.json
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNEGATE_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))


def chat(user: str, answer: str, rid: str) -> dict:
    return {"id": rid, "source": "bench", "meta": {},
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def old_rule(train: list[dict], golden: list[dict], n: int = 13) -> set[str]:
    """The rule before issue 20: a shared n-gram between prompts, or the whole prompt when it is shorter."""
    from tunegate.data.golden import ngram_words
    from tunegate.data.records import prompt_text

    grams, whole = {}, {}
    for g in golden:
        w = ngram_words(prompt_text(g))
        if len(w) < n:
            whole.setdefault(tuple(w), g["id"])
        for i in range(len(w) - n + 1):
            grams.setdefault(tuple(w[i:i + n]), g["id"])
    out = set()
    for t in train:
        w = tuple(ngram_words(prompt_text(t)))
        if w in whole or any(w[i:i + n] in grams for i in range(len(w) - n + 1)):
            out.add(t["id"])
    return out


def plants(golden: list[dict], k: int, seed: int = 0) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for i, g in enumerate(rng.sample(golden, k)):
        p = g["messages"][-2]["content"]
        out += [
            ("padded", chat(f"Hi, quick one: {p} Thanks a lot, Sam", g["messages"][-1]["content"], f"padded{i}")),
            ("rewrapped", chat("\n".join(p.split(" ")).replace("\n", "  \n", 2), "x", f"rewrapped{i}")),
            ("recased", chat(p.upper().replace(" ", ", ", 2).replace("?", "!!"), "x", f"recased{i}")),
            ("quoted", chat("What did the last customer write?", f'They wrote: "{p}" and then hung up.', f"quoted{i}")),
            ("exact", chat(p, "x", f"exact{i}")),
        ]
    return out


def main() -> None:
    from tunegate.data.golden import ngram_overlap

    train_rows = read_csv(SHARED / "banking77" / "train.csv")
    test_rows = read_csv(SHARED / "banking77" / "test.csv")
    rng = random.Random(0)
    golden = [chat(t, c, f"g{i}") for i, (t, c) in enumerate(rng.sample(test_rows, 500))]
    clean = [chat(t, c, f"t{i}") for i, (t, c) in enumerate(train_rows)]
    planted = plants(golden, 200)
    train = clean + [r for _, r in planted]
    kinds = {r["id"]: kind for kind, r in planted}

    def score(flagged: set[str]) -> dict:
        per = {}
        for kind in ("padded", "rewrapped", "recased", "quoted", "exact"):
            ids = [rid for rid, k in kinds.items() if k == kind]
            per[kind] = round(sum(rid in flagged for rid in ids) / len(ids), 3)
        fp = [r for r in clean if r["id"] in flagged]
        return {"recall": per, "clean_rows_flagged": len(fp), "clean_flag_rate": round(len(fp) / len(clean), 4),
                "clean_flag_examples": [r["messages"][0]["content"] for r in fp[:5]]}

    t0 = time.perf_counter()
    result = {"benchmark": "decontamination", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "golden_rows": len(golden), "clean_train_rows": len(clean), "planted_per_kind": 200,
              "old_rule_13gram": score(old_rule(train, golden))}
    exact_dupes = {" ".join(r["messages"][0]["content"].lower().split()) for r in clean} & \
                  {" ".join(g["messages"][0]["content"].lower().split()) for g in golden}
    result["banking77_exact_train_test_duplicates_in_golden"] = len(exact_dupes)
    for m in (4, 5, 6, 7, 8):
        t1 = time.perf_counter()
        hits = ngram_overlap(train, golden, 13, m)
        result[f"new_rule_min_words_{m}"] = {**score({t for t, _, _ in hits}), "seconds": round(time.perf_counter() - t1, 2)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = REPO / "bench" / "results" / "decontamination.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        if isinstance(v, dict):
            print(k, v["recall"], "clean flagged", v["clean_rows_flagged"], v["clean_flag_rate"])
    print("exact train/test duplicates among the golden rows:", len(exact_dupes))


if __name__ == "__main__":
    main()
