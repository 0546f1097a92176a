"""One huge row through the data stage (issue 23, kind 3): is it rejected fast, without memory growing with it?

The quickstart project (the embedded SmolLM2 tokenizer, max_length 192, 360 training rows) is copied to a
temporary folder and its data stage is run as a subprocess twice, in the same run:

    baseline   the project as it is
    huge       the same project with one more training line: a chat row whose user turn is `--mb` MB of text
               (a 50 MB row took 169 s and 7.7 GB before it was rejected as overlength, before the row byte limit)

Each run's wall time and peak resident memory (the child's ru_maxrss) are measured; the huge row must end in
rejected.jsonl with its rule, and every other row must be kept as in the baseline. Targets: the huge run adds
under 2 s and under 500 MB of peak memory to the baseline.

    python bench/huge_row.py                 # writes bench/results/huge_row.json
    python bench/huge_row.py --mb 50 --format csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_data(project: Path) -> dict:
    """`tunegate data` in a fresh process: wall seconds, the child's peak RSS in MB, rows kept and rejected."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    # a wrapper process per run so ru_maxrss is this run's alone (RUSAGE_CHILDREN keeps the maximum of all children)
    code = ("import resource, subprocess, sys, json;"
            "r = subprocess.run([sys.executable, '-m', 'tunegate.cli', 'data', sys.argv[1], '--force'], capture_output=True, text=True);"
            "print(json.dumps({'rc': r.returncode, 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'err': r.stderr[-3000:]}))")
    out = subprocess.run([sys.executable, "-c", code, str(project / "tunegate.yaml")], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    del before
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"tunegate data failed:\n{res['err']}")
    data = project / "runs" / "default" / "data"
    rejected = [json.loads(line) for line in (data / "rejected.jsonl").read_text().splitlines() if line.strip()]
    kept = sum(1 for split in ("train", "val") for line in (data / f"{split}.jsonl").open() if line.strip())
    return {"seconds": round(wall, 2), "peak_rss_mb": round(res["rss_kb"] / 1024, 1), "rows_kept": kept,
            "rejected": [{k: r[k] for k in ("line", "rule", "detail") if k in r} for r in rejected]}


def huge_line(mb: int, fmt: str) -> str:
    text = ("lorem ipsum dolor sit amet " * (mb * 2**20 // 27 + 1))[: mb * 2**20]
    if fmt == "csv":
        return f"\"{text}\",alpha\n"
    return json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "alpha"}]}) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=50, help="size of the huge row's text in MiB (default 50)")
    ap.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="the source file's format")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "huge_row.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="tunegate-huge-row-") as tmp:
        project = Path(tmp) / "quickstart"
        shutil.copytree(REPO / "examples" / "quickstart", project, ignore=shutil.ignore_patterns("runs"))
        if args.format == "csv":
            rows = [json.loads(line) for line in (project / "data" / "train.jsonl").open()]
            import csv
            with open(project / "data" / "train.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["prompt", "completion"])
                for r in rows:
                    w.writerow([r["messages"][-2]["content"], r["messages"][-1]["content"]])
            cfg = (project / "tunegate.yaml").read_text().replace("path: data/train.jsonl\n      format: chat",
                                                                  "path: data/train.csv\n      format: csv")
            (project / "tunegate.yaml").write_text(cfg)
            source = project / "data" / "train.csv"
        else:
            source = project / "data" / "train.jsonl"
        baseline = run_data(project)
        with open(source, "a", encoding="utf-8") as f:
            f.write(huge_line(args.mb, args.format))
        huge = run_data(project)

    result = {
        "benchmark": "huge_row",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "row_mb": args.mb, "format": args.format,
        "baseline": baseline, "huge": huge,
        "extra_seconds": round(huge["seconds"] - baseline["seconds"], 2),
        "extra_peak_rss_mb": round(huge["peak_rss_mb"] - baseline["peak_rss_mb"], 1),
        "same_rows_kept": huge["rows_kept"] == baseline["rows_kept"],
        "targets": {"extra_seconds_lt": 2.0, "extra_peak_rss_mb_lt": 500},
    }
    result["passed"] = (result["extra_seconds"] < 2.0 and result["extra_peak_rss_mb"] < 500 and result["same_rows_kept"]
                        and len(huge["rejected"]) == len(baseline["rejected"]) + 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("row_mb", "format", "extra_seconds", "extra_peak_rss_mb", "same_rows_kept", "passed")}))
    print("huge row:", huge["rejected"][-1] if huge["rejected"] else None)


if __name__ == "__main__":
    sys.exit(main())
