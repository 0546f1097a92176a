"""PII recall under letter case and neighbouring symbols (issue 20), per entity type, before and after.

Data: ../shared/data/pii_presidio_synth/synth_dataset_v2.json (1,500 sentences, gold character spans; never
committed, read in place). Each sentence is rewritten six ways, gold spans moved with it:

    title      as written (names in Title case)
    lower      text.lower()
    upper      text.upper()
    emoji      "🙂" written right before every gold span, no space ("🙂John Smith")
    zwj        a ZWJ emoji sequence "👩‍💻" right before every gold span
    punct      "#" right before every gold span ("#John")

Recall and precision per entity type use bench/pii_eval.py's lenient overlap matching. "before" is
tunegate.data.pii at commit cf25042 (loaded from git), "after" the working tree's; both analyse with the same
entities, regions and threshold as pii_eval. The re-scan row counts the redacted texts in which the re-scan
still finds something (a re-scan that repeats the first pass finds nothing by construction).

Target: PERSON recall within 0.05 across title, lower and upper; pattern entities (e-mail, phone, card, IBAN,
IP, SSN) at 1.0 in every variant.

    python bench/pii_variants.py          # writes bench/results/pii_variants.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
BEFORE = "cf25042"
PATTERN = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN"]


def _load_before():
    from before import module_at

    return module_at(BEFORE, "src/tunegate/data/pii.py", "pii_before")


def _insert_before_spans(sample: dict, mark: str) -> dict:
    """`mark` put right before every gold span; the spans shifted to match."""
    text, spans = sample["full_text"], sorted(sample["spans"], key=lambda s: s["start_position"])
    out, moved, last, shift = [], [], 0, 0
    for s in spans:
        start = s["start_position"]
        if start < last:  # overlapping gold spans: leave this one where it is
            moved.append({**s, "start_position": start + shift, "end_position": s["end_position"] + shift})
            continue
        out.append(text[last:start] + mark)
        shift += len(mark)
        last = start
        moved.append({**s, "start_position": start + shift, "end_position": s["end_position"] + shift})
    out.append(text[last:])
    return {**sample, "full_text": "".join(out), "spans": moved}


def variants(samples: list[dict]) -> dict[str, list[dict]]:
    def cased(fn):
        return [{**s, "full_text": fn(s["full_text"])} for s in samples if len(fn(s["full_text"])) == len(s["full_text"])]

    return {
        "title": samples,
        "lower": cased(str.lower),
        "upper": cased(str.upper),
        "emoji": [_insert_before_spans(s, "\U0001F642") for s in samples],
        "zwj": [_insert_before_spans(s, "\U0001F469\u200d\U0001F4BB") for s in samples],
        "punct": [_insert_before_spans(s, "#") for s in samples],
    }


def main() -> None:
    from pii_eval import DATA, TYPES, _spans, score

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=None, help="first n samples only (default: all 1,500)")
    ap.add_argument("--only", choices=["before", "after"], default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pii_variants.json")
    args = ap.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} not found: the shared datasets folder (../shared/data) is absent")
    samples = json.loads(DATA.read_text(encoding="utf-8"))[: args.n]
    views = variants(samples)
    import tunegate.data.pii as after

    result = {"bench": "pii_variants", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "samples": {k: len(v) for k, v in views.items()}, "entities": TYPES, "before_commit": BEFORE}
    for name, mod in (("before", _load_before()), ("after", after)):
        if args.only and args.only != name:
            continue
        red = mod.Redactor(mode="mask", entities=TYPES, regions=["US", "GB", "FR", "DE"], score_threshold=0.35)
        table, t0 = {}, time.perf_counter()
        for v, rows in views.items():
            texts = [s["full_text"] for s in rows]
            acc = score(rows, _spans(red.analyze(texts)))["per_type"]
            redacted = red.redact_texts(texts)
            table[v] = {t: {"recall": acc[t]["recall"], "precision": acc[t]["precision"]} for t in TYPES}
            table[v]["rescan_texts_with_findings"] = sum(1 for tr in redacted if tr.rescan)
        person = [table[v]["PERSON"]["recall"] for v in ("title", "lower", "upper")]
        result[name] = {"table": table, "seconds": round(time.perf_counter() - t0, 1),
                        "person_recall_spread_title_lower_upper": round(max(person) - min(person), 4),
                        "pattern_recall_min": min(table[v][t]["recall"] for v in table for t in PATTERN if table[v][t]["recall"] is not None)}
        print(name, "PERSON recall", {v: table[v]["PERSON"]["recall"] for v in table},
              "spread", result[name]["person_recall_spread_title_lower_upper"], "pattern min", result[name]["pattern_recall_min"])
        print(name, "PERSON precision", {v: table[v]["PERSON"]["precision"] for v in table})
        print(name, "LOCATION recall", {v: table[v]["LOCATION"]["recall"] for v in table})
        print(name, "rescan", {v: table[v]["rescan_texts_with_findings"] for v in table})
    if args.out.is_file() and args.only:  # keep the other half of an earlier run
        earlier = json.loads(args.out.read_text())
        result = {**earlier, **{k: v for k, v in result.items() if k in ("date", args.only)}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
