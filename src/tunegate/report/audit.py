"""The audit's page: candidates (metric with 95% CI against cost per 1,000 requests), the decision, the numbers.

Writes audit.png and audit.html (plot embedded, readable offline, opening with the run's header: report.header)
into the audit stage's folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunegate.core.io import atomic_write_text


def plot_candidates(report: dict[str, Any], path: Path) -> None:
    """Left: each candidate's score with its 95% CI (and the bar). Right: score against USD per 1,000 requests.
    Every bar and point is labelled, inside the axes; candidates at the same point share one label."""
    from matplotlib.ticker import NullFormatter

    from tunegate.report.render import LABEL_BOX, error_bar, keep_labels_inside, pyplot

    plt = pyplot()

    cands = report["candidates"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.45 * len(cands)), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    colours = ["#e67e22" if c["trains"] else "#2f80ed" for c in cands]
    for i, (c, colour) in enumerate(zip(cands, colours)):
        a1.barh(i, c["mean"], color=colour, height=0.6, xerr=error_bar(c), capsize=3)
        right = c["ci_high"] < 0.85  # the label right of the CI, else left of it (over the bar)
        a1.annotate(f"{c['mean']:.3f}", (c["ci_high"] if right else c["ci_low"], i), xytext=(4 if right else -4, 0),
                    textcoords="offset points", va="center", ha="left" if right else "right", fontsize=8, bbox=LABEL_BOX)
        a2.errorbar([c["usd_per_1k_requests"]], [c["mean"]], yerr=error_bar(c),
                    fmt="o", color=colour, capsize=3)
    points: dict[tuple[float, float], list[str]] = {}
    for c in cands:
        points.setdefault((c["usd_per_1k_requests"], round(c["mean"], 3)), []).append(c["name"])
    for k, ((x, y), names) in enumerate(sorted(points.items())):
        a2.annotate(", ".join(names), (x, y), fontsize=7, xytext=(4, 4 + 9 * (k % 2)), textcoords="offset points", bbox=LABEL_BOX)
    a1.set_yticks(range(len(cands)), [c["name"] for c in cands])
    a1.invert_yaxis()
    a1.set_xlim(0, 1)
    a1.set_xlabel(f"{report['metric']} on {report['golden_rows']} golden rows (95% CI)")
    if report.get("bar") is not None:
        for ax in (a1,):
            ax.axvline(report["bar"], color="#c0392b", ls="--", lw=1)
        a2.axhline(report["bar"], color="#c0392b", ls="--", lw=1, label=f"bar {report['bar']:.2f}")
        a2.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1, 1), frameon=False)  # above the axes, clear of the points
    a2.set_xscale("log")
    costs = [c["usd_per_1k_requests"] for c in cands if c["usd_per_1k_requests"] > 0]
    if costs:  # whole decades, so at least two labelled ticks and no crowded minor labels
        a2.set_xlim(10 ** math.floor(math.log10(min(costs) / 1.5)), 10 ** math.ceil(math.log10(max(costs) * 1.5)))
    a2.xaxis.set_minor_formatter(NullFormatter())
    a2.set_xlabel(f"{report['prices']['currency']} per 1,000 requests")
    a2.set_ylabel(report["metric"])
    a2.set_ylim(-0.04, 1.04)
    fig.suptitle("blue: no training; orange: fine-tuned (probe)", fontsize=8)
    fig.tight_layout()
    for ax in (a1, a2):
        keep_labels_inside(ax)
    fig.savefig(path)
    plt.close(fig)


def render(report: dict[str, Any], out_dir: Path) -> None:
    from tunegate.decide import explain
    from tunegate.report.header import run_header
    from tunegate.report.render import environment, png_data_uri

    plot_candidates(report, out_dir / "audit.png")
    env = environment()
    html = env.get_template("audit.html.j2").render(r=report, png=png_data_uri(out_dir / "audit.png"), tree=explain(),
                                                      header=run_header(report["project"], Path(out_dir).resolve().parent, out_dir))
    atomic_write_text(out_dir / "audit.html", html)
