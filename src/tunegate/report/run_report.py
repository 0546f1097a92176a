"""The run report: one page that says what ran, what the data looked like, how training went, and the verdict.

`write_run_report` writes report.html (plots embedded, readable offline), report.md and scores.png; the report
stage (tunegate.stages.report) calls it. The page opens with the run's header (report.header); answers are shown
whole (or cut with a visible "…"), and every bar and point of scores.png carries its value inside the axes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunegate.core.io import atomic_write_text, read_jsonl
from tunegate.core.manifest import read_manifest
from tunegate.report.header import run_header
from tunegate.report.render import LABEL_BOX, environment, error_bar, keep_labels_inside, png_data_uri, pyplot


def plot_scores(scores: dict[str, Any], path: Path) -> None:
    """Per metric: base model and candidate with 95% CIs (left), and the paired difference with its CI (right).
    Every bar and point carries its value, inside the axes."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    names = list(scores["metrics"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 1.0 + 0.9 * len(names)), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    for i, name in enumerate(names):
        s = scores["metrics"][name]
        for j, (system, colour) in enumerate((("baseline", "#9aa5b1"), ("candidate", "#2f80ed"))):
            v = s[system]
            y = i + (0.2 if j == 0 else -0.2)
            a1.barh(y, v["mean"], height=0.38, color=colour, xerr=error_bar(v),
                    capsize=4, label=("base model" if j == 0 else "candidate") if i == 0 else None)
            right = v["ci_high"] < 0.85  # the label right of the CI, else left of it (over the bar)
            a1.annotate(f"{v['mean']:.3f}", (v["ci_high"] if right else v["ci_low"], y), xytext=(4 if right else -4, 0),
                        textcoords="offset points", va="center", ha="left" if right else "right", fontsize=8, bbox=LABEL_BOX)
        d = s["delta"]
        a2.errorbar([d["mean"]], [i], xerr=error_bar(d), fmt="o", capsize=5,
                    color="#27ae60" if d["ci_low"] > 0 else ("#c0392b" if d["ci_high"] < 0 else "#7f8c8d"))
        a2.annotate(f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", (d["mean"], i), xytext=(0, 8),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7, bbox=LABEL_BOX)
    for ax in (a1, a2):
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
    a1.set_xlim(0, 1)
    a1.set_xlabel("score (95% CI)")
    a1.legend(loc="lower right", bbox_to_anchor=(1, 1), ncol=2, fontsize=8, frameon=False)  # above the axes, clear of the bars
    a2.axvline(0, color="k", lw=0.8)
    a2.set_yticklabels([])
    a2.set_xlabel("candidate - base (paired 95% CI)")
    a2.xaxis.set_major_locator(MaxNLocator(4))
    a2.margins(y=0.35)
    fig.tight_layout()
    for ax in (a1, a2):
        keep_labels_inside(ax)
    fig.savefig(path)
    plt.close(fig)


def gather(run_dir: Path) -> dict[str, Any]:
    ctx: dict[str, Any] = {"stages": []}
    for name in ("data", "audit", "train", "eval"):
        m = read_manifest(run_dir / name)
        if m is not None:
            ctx["stages"].append({"name": name, "wall_s": m.wall_s, "started_at": m.started_at, "verdict": m.verdict})
    ctx["data"] = json.loads((run_dir / "data" / "stats.json").read_text())
    ctx["train"] = json.loads((run_dir / "train" / "train_summary.json").read_text())
    ctx["scores"] = json.loads((run_dir / "eval" / "scores.json").read_text())
    ctx["verdict"] = json.loads((run_dir / "eval" / "verdict.json").read_text())
    samples = read_jsonl(run_dir / "eval" / "samples.jsonl")
    head = ctx["scores"]["headline"]
    key = f"candidate_{head}"
    ctx["diffs"] = [s for s in samples if key in s and s[f"baseline_{head}"] != s[key]][:20]
    ctx["packages"] = read_manifest(run_dir / "eval").packages
    audit = run_dir / "audit" / "audit.json"
    ctx["audit"] = json.loads(audit.read_text()) if audit.is_file() else None
    ctx["overrides"] = read_manifest(run_dir / "train").overrides
    return ctx


def write_run_report(run_dir: Path, out_dir: Path, project) -> dict[str, Any]:
    """Write report.html, report.md and scores.png into `out_dir` from the finished stages of `run_dir`.

    Returns the eval verdict (`verdict.json`). Raises FileNotFoundError when the data, train or eval stage has
    not finished.
    """
    ctx = gather(run_dir)
    plot_scores(ctx["scores"], out_dir / "scores.png")
    ctx["project"] = project
    ctx["loss_png"] = png_data_uri(run_dir / "train" / "loss.png")
    ctx["scores_png"] = png_data_uri(out_dir / "scores.png")
    ctx["header"] = run_header(project.name, run_dir, out_dir)
    env = environment()
    atomic_write_text(out_dir / "report.html", env.get_template("run_report.html.j2").render(**ctx))
    atomic_write_text(out_dir / "report.md", env.get_template("run_report.md.j2").render(**ctx))
    return ctx["verdict"]
