"""Report stage: one page that says what ran, what the data looked like, how training went, and the verdict.

Writes report.html (plots embedded, readable offline), report.md and scores.png (tunegate.report.run_report).
"""

from __future__ import annotations

from tunegate.core.console import console
from tunegate.core.stage import Stage, StageResult, StageSpec, config_sections
from tunegate.report.run_report import write_run_report


def run(st: Stage) -> StageResult:
    verdict = write_run_report(st.run_dir, st.dir, st.project)
    console.print(f"report written: {st.final_dir / 'report.html'}")
    return StageResult(metrics={"verdict": verdict["verdict"]})


SPEC = StageSpec(name="report", run=run, upstream=("data", "train", "eval"), config=config_sections("name"))
