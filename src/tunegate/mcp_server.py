"""`tunegate mcp PROJECT`: the project as an MCP server (Model Context Protocol, stdio transport), so an agent
(Claude Desktop, an IDE, any MCP client) can read runs and verdicts the way `tunegate runs` shows them to a person.

Built on the official `mcp` Python SDK (`MCPServer` in mcp 2, `FastMCP` in mcp 1.2+). One server serves one
project, the one named at start; the project file is re-read on every call, so edits are seen.

Read-only tools (always listed):
  validate            pipeline.validate_project: {"ok", "project", "problems": [line, ...]}
  decide              the decision tree (tunegate.decide) for given answers {question id: option}
  decision_tree       every question of the tree, its options and where each leads (text)
  list_runs           {"runs": tunegate.runs.list_runs} (refreshes each run's run.js, as `tunegate runs` does)
  compare_runs        tunegate.runs.compare_runs(a, b): config diff, paired CIs, changed rows
  verdict             runs/<id>/eval/verdict.json (verdict, gate rules) and scores.json (metrics with 95% CIs)
  audit_recommendation runs/<id>/audit/audit.json: the recommendation, metric, bar and candidates
  preview_rows        tunegate.preview.build_previews: the loss mask of chosen rows (supervised spans in ⟦ ⟧)
Resources (templates): `tunegate://runs/{run_id}/report` (report/report.md) and
`tunegate://runs/{run_id}/{stage}/manifest` (<stage>/manifest.json).

Write tools, registered only with `allow_writes` (`tunegate mcp --allow-writes`); without it they are not listed
and a call is refused as an unknown tool:
  start_run / start_stage   `tunegate run|<stage> PROJECT --run-id ID` as a background subprocess, in its own
                            session (it outlives the server); its stdout and stderr go to a temporary file
  run_progress              that subprocess's state, the tail of runs/<id>/log.txt and of what it printed
  promote                   tunegate.serve.production.promote (PASS and a verified bundle only)

Every run id is checked with core.paths.check_identifier and resolved inside the project (Project.run_dir);
every stage name must be one of pipeline.STAGE_NAMES; every file read is checked with core.paths.inside. Errors
come back to the client as tool errors carrying the TunegateError's one line. Nothing is printed on stdout (the
protocol's channel): tunegate's console writes to stderr.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.core.paths import check_identifier, inside

LOG_TAIL_LINES = 40  # lines of runs/<id>/log.txt run_progress returns by default
MAX_PREVIEW_ROWS = 20  # rows one preview_rows call may encode


def _sdk():
    """(server class, ToolError, ResourceError) of the SDK: MCPServer (mcp 2) or FastMCP (mcp 1.2+). Raises
    TunegateError naming the extra to install when the SDK is missing."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.server.mcpserver.exceptions import ResourceError, ToolError
        return MCPServer, ToolError, ResourceError
    except ImportError:
        pass
    try:
        from mcp.server.fastmcp import FastMCP
        from mcp.server.fastmcp.exceptions import ResourceError, ToolError
        return FastMCP, ToolError, ResourceError
    except ImportError:
        raise TunegateError("tunegate mcp: the `mcp` package is not installed; rule: pip install 'tunegate[mcp]'") from None


def _reporting(fn, error: type[Exception]):
    """`fn`, with a TunegateError re-raised as the SDK's `error` so that its one line reaches the client (the SDK
    hides the text of any other exception)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TunegateError as exc:
            raise error(str(exc)) from None

    return call


class Tools:
    """The tools' bodies, plain functions of JSON values (the server registers them; tests may call them directly).

    project_path: tunegate.yaml, or the folder holding it. Each call loads the project afresh.
    """

    def __init__(self, project_path: Path):
        self.project_path = Path(project_path)
        self.jobs: dict[str, subprocess.Popen] = {}  # run id -> the background `tunegate` command started for it
        self.job_args: dict[str, list[str]] = {}
        self.outputs: dict[str, Any] = {}  # run id -> the temporary file the command's stdout and stderr go to

    def project(self):
        from tunegate.config import load_project

        return load_project(self.project_path, [])

    def run_dir(self, project, run_id: str) -> Path:
        """runs/<run_id> of a run that exists (identifier, inside the project)."""
        from tunegate.pipeline import existing_run_dir

        check_identifier("run id", run_id)
        return existing_run_dir(project, run_id, flag="run_id")

    def read_json(self, project, path: Path) -> Any:
        path = inside(project.root, path, "file")
        if not path.is_file():
            raise TunegateError(f"{path}: not found; rule: the stage that writes it has not finished for this run")
        return json.loads(path.read_text(encoding="utf-8"))

    # read-only tools

    def validate(self) -> dict[str, Any]:
        """Check the project without loading a model or touching the network (`tunegate validate`): keys, types,
        the base model, files, the first rows of every source, the frozen golden set, TRL/PEFT settings.
        Returns {"ok": bool, "project": name or null, "problems": [one line each]}."""
        from tunegate.pipeline import validate_project

        try:
            p = self.project()
        except TunegateError as exc:
            return {"ok": False, "project": None, "problems": str(exc).splitlines()}
        problems = validate_project(p)
        return {"ok": not problems, "project": p.name, "problems": problems}

    def decide(self, answers: dict[str, str]) -> dict[str, Any]:
        """Which method fits (`tunegate decide`): answers maps question id -> option key. Returns the method,
        whether it trains, why, the next step, the path of questions and answers, the rejected options, and the
        train settings for tunegate.yaml. An unanswered question or a wrong option is an error naming the options."""
        from tunegate import decide as tree

        try:
            given = tree.read_answers(None, [f"{k}={v}" for k, v in answers.items()])
            d = tree.decide(given)
        except tree.DecisionError as exc:
            raise TunegateError(str(exc)) from None
        return {**d.to_json(), "settings": tree.TRAIN_SETTINGS.get(d.method) if d.trains else None}

    def decision_tree(self) -> str:
        """The whole decision tree as text: each question's id, its options and where each leads."""
        from tunegate.decide import explain

        return explain()

    def list_runs(self) -> dict[str, Any]:
        """The project's runs (`tunegate runs`): {"runs": [each with id, date, each stage's status, method, the
        settings that differ between runs, the headline metric with its 95% CI, verdict, wall time]}."""
        from tunegate.runs import list_runs

        return {"runs": _plain(list_runs(self.project()))}

    def compare_runs(self, run_a: str, run_b: str) -> dict[str, Any]:
        """Run B against run A (`tunegate runs --compare A B`): config diff, each metric's B - A with a paired
        bootstrap CI over the golden rows both scored, and the rows whose answer or score changed."""
        from tunegate.runs import compare_runs

        check_identifier("run id", run_a)
        check_identifier("run id", run_b)
        return _plain(compare_runs(self.project(), run_a, run_b))

    def verdict(self, run_id: str = "default") -> dict[str, Any]:
        """The eval gate of a run: {"verdict": PASS|FAIL, "rules": [...each gate rule with its value and CI...],
        "scores": scores.json (metrics: baseline/candidate/delta means with 95% CIs)}."""
        p = self.project()
        run = self.run_dir(p, run_id)
        verdict = self.read_json(p, run / "eval" / "verdict.json")
        scores = self.read_json(p, run / "eval" / "scores.json")
        return {"run_id": run_id, "verdict": verdict.get("verdict"), "rules": verdict.get("rules", []), "scores": scores}

    def audit_recommendation(self, run_id: str = "default") -> dict[str, Any]:
        """The audit of a run (runs/<id>/audit/audit.json): its recommendation (method, TRAIN or NO_TRAIN, why),
        the metric and quality bar, and every candidate's score with its CI and cost."""
        p = self.project()
        audit = self.read_json(p, self.run_dir(p, run_id) / "audit" / "audit.json")
        keep = ("project", "metric", "bar", "min_gain", "golden_rows", "task", "recommendation", "candidates")
        return {"run_id": run_id, **{k: audit.get(k) for k in keep}}

    def preview_rows(self, run_id: str = "default", rows: list[str] | None = None, first: int = 5) -> dict[str, Any]:
        """The loss mask of chosen rows (`tunegate data-preview`): `rows` (row ids) or the `first` training rows,
        at most MAX_PREVIEW_ROWS. Each row: id, split, where it was read from, status (fits / TRUNCATED /
        REJECTED), token counts, and its text with the supervised spans between ⟦ and ⟧; `from_data_stage` is false
        when the run has no current data stage and the rows come from the sources. Loads the tokenizer only."""
        from tunegate.pipeline import run_dir_for
        from tunegate.preview import SUP_CLOSE, SUP_OPEN, build_previews

        if rows is not None and (not rows or len(rows) > MAX_PREVIEW_ROWS or not all(isinstance(r, str) for r in rows)):
            raise TunegateError(f"rows: give 1 to {MAX_PREVIEW_ROWS} row ids")
        if not 1 <= first <= MAX_PREVIEW_ROWS:
            raise TunegateError(f"first: {first} is not between 1 and {MAX_PREVIEW_ROWS}")
        p = self.project()
        check_identifier("run id", run_id)
        previews, chosen_from = build_previews(p, run_dir_for(p, run_id), rows, first)
        return {"max_length": p.data.max_length, "overlength": p.data.overlength, "origin": chosen_from.origin,
                "from_data_stage": chosen_from.from_stage, "rows": [
            {"id": r.id, "split": r.split, "where": r.where, "status": r.status, "n_tokens": r.n_tokens,
             "n_supervised": r.n_supervised,
             "text": "".join(f"{SUP_OPEN}{s.text}{SUP_CLOSE}" if s.supervised else s.text for s in r.segments)}
            for r in previews]}

    # resources

    def report(self, run_id: str) -> str:
        p = self.project()
        path = inside(p.root, self.run_dir(p, run_id) / "report" / "report.md", "file")
        if not path.is_file():
            raise TunegateError(f"{path}: not found; rule: run the report stage first (tunegate report)")
        return path.read_text(encoding="utf-8")

    def manifest(self, run_id: str, stage: str) -> str:
        p = self.project()
        return json.dumps(self.read_json(p, self.run_dir(p, run_id) / _stage(stage) / "manifest.json"), indent=2)

    # write tools (registered with allow_writes only)

    def start(self, args: list[str], run_id: str) -> dict[str, Any]:
        job = self.jobs.get(run_id)
        if job is not None and job.poll() is None:
            raise TunegateError(f"run {run_id}: `tunegate {' '.join(self.job_args[run_id])}` is still running (pid {job.pid}); "
                                "rule: one command per run at a time")
        cmd = [sys.executable, "-m", "tunegate.cli", *args]
        output = tempfile.TemporaryFile()  # what the command prints (stdout is the protocol's channel here)
        self.jobs[run_id] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        self.job_args[run_id], self.outputs[run_id] = args, output
        return {"run_id": run_id, "pid": self.jobs[run_id].pid, "command": ["tunegate", *args], "state": "running",
                "poll": "run_progress"}

    def start_run(self, run_id: str = "default", until: str = "release", force: list[str] | None = None) -> dict[str, Any]:
        """Start `tunegate run PROJECT --run-id ID --until STAGE [--force S ...]` in the background; poll it with
        run_progress. Finished, unchanged stages are skipped, as on the command line."""
        from tunegate.pipeline import check_stage_names, run_dir_for

        p = self.project()
        check_identifier("run id", run_id)
        run_dir_for(p, run_id)
        check_stage_names(until, tuple(force or ()))
        args = ["run", str(p.source_file), "--run-id", run_id, "--until", until]
        for f in force or ():
            args += ["--force", f]
        return self.start(args, run_id)

    def start_stage(self, stage: str, run_id: str = "default", force: bool = False) -> dict[str, Any]:
        """Start one stage, `tunegate <stage> PROJECT --run-id ID [--force]`, in the background; poll it with
        run_progress."""
        from tunegate.pipeline import run_dir_for

        from tunegate.pipeline import stage_spec

        p = self.project()
        check_identifier("run id", run_id)
        # a stage that builds on others needs the run (as on the command line): refused here, not in the background
        if stage_spec(_stage(stage)).upstream:
            self.run_dir(p, run_id)
        else:
            run_dir_for(p, run_id)
        args = [stage, str(p.source_file), "--run-id", run_id] + (["--force"] if force else [])
        return self.start(args, run_id)

    def run_progress(self, run_id: str = "default", lines: int = LOG_TAIL_LINES) -> dict[str, Any]:
        """The background command of a run (running / exited with its code / none started by this server), the
        last `lines` lines (at most 500) of runs/<id>/log.txt, and of what the command printed (`output_tail`:
        also its errors, e.g. before the run folder exists)."""
        p = self.project()
        check_identifier("run id", run_id)
        job = self.jobs.get(run_id)
        state = {"state": "none"} if job is None else (
            {"state": "running", "pid": job.pid} if job.poll() is None else {"state": "exited", "exit_code": job.returncode})
        n = max(1, min(lines, 500))
        log = inside(p.root, p.run_dir(run_id) / "log.txt", "file")
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:] if log.is_file() else []
        output = []
        if run_id in self.outputs:
            self.outputs[run_id].seek(0)
            output = self.outputs[run_id].read().decode("utf-8", errors="replace").splitlines()[-n:]
        return {"run_id": run_id, **state, "command": ["tunegate", *self.job_args.get(run_id, [])], "log_tail": tail,
                "output_tail": output}

    def promote(self, run_id: str = "default") -> dict[str, Any]:
        """Make a run's adapter the production version (`tunegate promote`): refused unless its verdict is PASS and
        its signed release bundle verifies. Returns the registry row."""
        from tunegate.serve.production import promote

        p = self.project()
        self.run_dir(p, run_id)
        return _plain(promote(p, run_id))


def _stage(stage: str) -> str:
    from tunegate.pipeline import STAGE_NAMES

    if stage not in STAGE_NAMES:
        raise TunegateError(f"stage {stage!r}: not a stage; stages: {', '.join(STAGE_NAMES)}")
    return stage


def _plain(value: Any) -> Any:
    """JSON values only (paths and dates as strings)."""
    return json.loads(json.dumps(value, default=str))


READ_TOOLS = ("validate", "decide", "decision_tree", "list_runs", "compare_runs", "verdict", "audit_recommendation",
              "preview_rows")
WRITE_TOOLS = ("start_run", "start_stage", "run_progress", "promote")


def build_server(project_path: Path, allow_writes: bool = False):
    """The MCP server of one project: READ_TOOLS always, WRITE_TOOLS only when `allow_writes`, and the report and
    manifest resource templates. Raises TunegateError when the project does not load (checked once at start)."""
    tools = Tools(project_path)
    p = tools.project()
    server_class, tool_error, resource_error = _sdk()
    server = server_class(
        name=f"tunegate ({p.name})",
        instructions=(f"tunegate project {p.name} ({p.source_file}): read its runs, verdicts, audits and decision "
                      "tree." + (" Write tools start runs in the background and promote." if allow_writes else
                                 " Read-only: start the server with --allow-writes to start runs or promote.")),
    )
    for name in READ_TOOLS + (WRITE_TOOLS if allow_writes else ()):
        server.add_tool(_reporting(getattr(tools, name), tool_error), name=name)
    server.resource("tunegate://runs/{run_id}/report", name="report", mime_type="text/markdown",
                    description="runs/<run_id>/report/report.md: the run's report page")(_reporting(tools.report, resource_error))
    server.resource("tunegate://runs/{run_id}/{stage}/manifest", name="manifest", mime_type="application/json",
                    description="runs/<run_id>/<stage>/manifest.json: what the stage ran with and produced")(
                        _reporting(tools.manifest, resource_error))
    return server


def serve(project_path: Path, allow_writes: bool = False) -> None:
    """Serve the project over stdio until the client closes the connection."""
    build_server(project_path, allow_writes).run("stdio")
