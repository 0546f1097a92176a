"""What `tunegate run` prints and keeps, on the tiny pipeline: `stage N/M` lines, the summary block, runs/<id>/log.txt
with the trainer's per-step logs, and the errors that send a user the right way (--force, an unknown run id)."""

import json
import re
import subprocess
import sys

from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

ESCAPES = re.compile(r"\x1b|\[A")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tunegate.cli", *map(str, args)], capture_output=True, text=True)


def test_stage_lines_summary_and_log_file(tiny_project, capsys):
    project = load_project(tiny_project / "tunegate.yaml")
    run_pipeline(project)
    err = capsys.readouterr().err
    run_dir = tiny_project / "runs" / "default"
    # the audit is off in the tiny project: 5 stages run, numbered among themselves, release last
    for i, stage in enumerate(("data", "train", "eval", "report", "release"), start=1):
        assert re.search(rf"stage {i}/5 {stage}\b", err), stage
        assert re.search(rf"stage {i}/5 {stage}: done in \d+\.\d s", err), stage
    assert "stage -/5 audit: skipped (audit.enabled: false)" in err
    assert re.search(r"stage 3/5 eval: done in .*, verdict PASS", err)
    # the trainer's own output is folded into the bar: no raw log dicts, no tqdm escape codes
    assert "{'loss'" not in err and not ESCAPES.search(err)
    # the summary block: verdict, headline metric with its CI, time per stage, where things are
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())["metrics"]["exact_match"]["candidate"]
    summary = err[err.index("summary"):]
    assert "verdict" in summary and "PASS (eval gate)" in summary
    assert f"exact_match {scores['mean']:.3f} [{scores['ci_low']:.3f}, {scores['ci_high']:.3f}]" in summary
    assert re.search(r"data \d+\.\d s, audit skipped, train \d+\.\d s, eval \d+\.\d s, report \d+\.\d s, release \d+\.\d s", summary)
    assert str(run_dir / "report" / "report.html") in summary and str(run_dir / "log.txt") in summary
    assert str(run_dir / "release" / "bundle") in summary  # the signed release the main job ends in

    log = (run_dir / "log.txt").read_text()
    assert not ESCAPES.search(log)
    assert log.startswith("==== ") and log.count("\n==== ") == 0  # one header for the one invocation
    steps = re.findall(r"^step (\d+)/4 loss=\d", log, re.M)
    assert steps == ["1", "2", "3", "4"]  # logging_steps 1, max_steps 4: every step's log is kept
    assert re.findall(r"^step (\d+)/4 eval_loss=\d", log, re.M) == ["2", "4"]  # eval_steps = save_steps = 2
    assert "stage 2/5 train: done in" in log and "PASS (eval gate)" in log

    # a second invocation appends under its own header; unchanged stages say so with their number
    run_pipeline(load_project(tiny_project / "tunegate.yaml"))
    err = capsys.readouterr().err
    assert "stage 2/5 train: unchanged since" in err
    assert "data unchanged, audit skipped, train unchanged, eval unchanged, report unchanged, release unchanged" in err
    log = (run_dir / "log.txt").read_text()
    assert len(re.findall(r"^==== .* ====$", log, re.M)) == 2 and log.count("stage 2/5 train: unchanged since") == 1

    # an unknown run id: the commands that read an existing run list the runs there are
    r = cli("report", tiny_project / "tunegate.yaml", "--run-id", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--run-id nope: no run {tiny_project / 'runs' / 'nope'}; existing runs: default" in r.stderr
    assert not (tiny_project / "runs" / "nope").exists()


def test_force_with_an_unknown_stage_is_refused_before_anything_runs(tiny_project):
    r = cli("run", tiny_project / "tunegate.yaml", "--force", "trian")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--force trian: not a stage; stages: data, audit, train, eval, report, release (or all)" in r.stderr
    assert not (tiny_project / "runs").exists()
    r = cli("eval", tiny_project / "tunegate.yaml")  # no run at all yet
    assert r.returncode == 2 and "there are no runs yet; start one with `tunegate run`" in r.stderr
