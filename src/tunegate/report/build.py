"""Report stage: one page that says what ran, what the data looked like, how training went, and the verdict.

Writes report.html (plots embedded, readable offline) and report.md, plus scores.png.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tunegate.manifest import atomic_write_text, read_manifest
from tunegate.pipeline import Stage, StageResult, console


def _png_data_uri(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def plot_scores(scores: dict[str, Any], path: Path) -> None:
    """Base and candidate score with 95% CIs, and the paired difference with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7.5, 3.0), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    names = ["base model", "candidate"]
    vals = [scores["base"], scores["candidate"]]
    means = [v["mean"] for v in vals]
    err = [[v["mean"] - v["ci_low"] for v in vals], [v["ci_high"] - v["mean"] for v in vals]]
    a1.barh(names, means, xerr=err, color=["#9aa5b1", "#2f80ed"], capsize=5)
    a1.set_xlim(0, 1)
    a1.set_xlabel(f"{scores['metric']} (95% CI)")
    for i, m in enumerate(means):
        inside = m > 0.85  # write the value inside a long bar, after a short one
        a1.text(m - 0.03 if inside else m + 0.03, i + 0.25, f"{m:.3f}", va="center", ha="right" if inside else "left", color="white" if inside else "black")
    d = scores["delta"]
    a2.errorbar([d["mean"]], [0], xerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o", capsize=5, color="#27ae60" if d["ci_low"] > 0 else "#c0392b")
    a2.axvline(0, color="k", lw=0.8)
    a2.set_yticks([])
    a2.set_xlabel("candidate - base (paired 95% CI)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gather(run_dir: Path) -> dict[str, Any]:
    ctx: dict[str, Any] = {"stages": []}
    for name in ("data", "train", "eval"):
        m = read_manifest(run_dir / name)
        if m is not None:
            ctx["stages"].append({"name": name, "wall_s": m.wall_s, "started_at": m.started_at, "verdict": m.verdict})
    ctx["data"] = json.loads((run_dir / "data" / "stats.json").read_text())
    ctx["train"] = json.loads((run_dir / "train" / "train_summary.json").read_text())
    ctx["scores"] = json.loads((run_dir / "eval" / "scores.json").read_text())
    ctx["verdict"] = json.loads((run_dir / "eval" / "verdict.json").read_text())
    samples = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines() if line]
    ctx["diffs"] = [s for s in samples if s["base_score"] != s["candidate_score"]][:20]
    ctx["packages"] = read_manifest(run_dir / "eval").packages
    return ctx


def run(st: Stage) -> StageResult:
    from jinja2 import Environment, PackageLoader, select_autoescape

    run_dir = st.run_dir
    ctx = gather(run_dir)
    plot_scores(ctx["scores"], st.dir / "scores.png")
    ctx["project"] = st.project
    ctx["loss_png"] = _png_data_uri(run_dir / "train" / "loss.png")
    ctx["scores_png"] = _png_data_uri(st.dir / "scores.png")
    env = Environment(loader=PackageLoader("tunegate", "report/templates"), autoescape=select_autoescape(["html"]))
    atomic_write_text(st.dir / "report.html", env.get_template("report.html.j2").render(**ctx))
    atomic_write_text(st.dir / "report.md", env.get_template("report.md.j2").render(**ctx))
    console.print(f"report written: {st.final_dir / 'report.html'}")
    return StageResult(metrics={"verdict": ctx["verdict"]["verdict"]})
