"""`tunegate mcp`: the server driven through the MCP SDK's own client over stdio (mcp.client.stdio + ClientSession),
against a hand-written project whose run looks finished (manifests, verdict, scores, audit, report written by
hand, as tests/unit/test_runs.py does; nothing is trained)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

from tunegate.config import load_project  # noqa: E402
from tunegate.core.io import atomic_write_json, atomic_write_text  # noqa: E402

from conftest import chat, project_yaml, write_jsonl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_runs import fake_run  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
VERDICT = {"verdict": "PASS", "rules": [{"metric": "exact_match", "min": 0.0, "value": 0.75, "ci_low": 0.65,
                                         "ci_high": 0.85, "passed": True}]}
RECOMMENDATION = {"method": "rag_bm25", "verdict": "NO_TRAIN", "why": "retrieval meets the bar"}


def finished_project(root: Path) -> Path:
    """A project with runs r1 and r2 (data/train/eval manifests, eval samples and scores), r1 also with a verdict,
    an audit and a report."""
    write_jsonl(root / "train.jsonl", [chat(f"q{i}", "a", f"t{i}") for i in range(4)])
    write_jsonl(root / "golden.jsonl", [chat(f"g{i}", "a", f"g{i}") for i in range(4)])
    (root / "tunegate.yaml").write_text(project_yaml("mcpdemo", "smollm2-135m-instruct", train="  method: sft"))
    project = load_project(root / "tunegate.yaml")
    run = fake_run(project, "r1", 1e-4, [1.0, 0.0, 1.0, 1.0], ["a", "b", "a", "a"])
    fake_run(project, "r2", 2e-4, [1.0, 1.0, 1.0, 1.0], ["a", "a", "a", "a"], started="2026-01-02T00:00:00+00:00")
    atomic_write_json(run / "eval" / "verdict.json", VERDICT)
    (run / "audit").mkdir()
    atomic_write_json(run / "audit" / "audit.json", {"project": "mcpdemo", "metric": "exact_match", "bar": 0.7,
                                                     "recommendation": RECOMMENDATION, "candidates": []})
    (run / "report").mkdir()
    atomic_write_text(run / "report" / "report.md", "# mcpdemo, run r1\n\nverdict PASS\n")
    return root


async def session(project: Path, allow_writes: bool, body):
    args = ["-m", "tunegate.cli", "mcp", str(project)] + (["--allow-writes"] if allow_writes else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            return await body(s)


def field(obj, name: str, v1_name: str):
    """A result field under its mcp 2 name (snake case) or its mcp 1 name (camel case)."""
    return getattr(obj, name) if hasattr(obj, name) else getattr(obj, v1_name)


def payload(result):
    """A tool result's JSON value (its first text content), and whether it is an error."""
    text, error = result.content[0].text, field(result, "is_error", "isError")
    return (text if error else json.loads(text)), error


@pytest.fixture
def project(tmp_path):
    return finished_project(tmp_path)


def test_read_tools_answer_from_the_run_folders(project):
    async def body(s):
        names = {t.name for t in (await s.list_tools()).tools}
        validated, _ = payload(await s.call_tool("validate", {}))
        runs = payload(await s.call_tool("list_runs", {}))[0]["runs"]
        verdict, _ = payload(await s.call_tool("verdict", {"run_id": "r1"}))
        audit, _ = payload(await s.call_tool("audit_recommendation", {"run_id": "r1"}))
        decided, _ = payload(await s.call_tool("decide", {"answers": {
            "changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "yes"}}))
        unanswered = payload(await s.call_tool("decide", {"answers": {}}))
        compared, _ = payload(await s.call_tool("compare_runs", {"run_a": "r1", "run_b": "r2"}))
        preview, _ = payload(await s.call_tool("preview_rows", {"run_id": "r1", "rows": ["t1"]}))
        report = await s.read_resource("tunegate://runs/r1/report")
        manifest = await s.read_resource("tunegate://runs/r1/train/manifest")
        listed = field(await s.list_resource_templates(), "resource_templates", "resourceTemplates")
        templates = {field(t, "uri_template", "uriTemplate") for t in listed}
        return names, validated, runs, verdict, audit, decided, unanswered, compared, preview, report, manifest, templates

    names, validated, runs, verdict, audit, decided, unanswered, compared, preview, report, manifest, templates = \
        asyncio.run(session(project, False, body))
    assert names == {"validate", "decide", "decision_tree", "list_runs", "compare_runs", "verdict",
                     "audit_recommendation", "preview_rows"}
    assert validated["project"] == "mcpdemo" and validated["ok"] == (validated["problems"] == [])
    assert [r["run_id"] for r in runs] == ["r1", "r2"] and runs[0]["verdict"] == "PASS"
    assert runs[0]["differs"] == {"train.trl.learning_rate": 1e-4}
    assert verdict["verdict"] == "PASS" and verdict["rules"] == VERDICT["rules"]
    assert verdict["scores"]["metrics"]["exact_match"]["candidate"]["mean"] == 0.75
    assert audit["recommendation"] == RECOMMENDATION and audit["bar"] == 0.7
    assert decided["method"] == "grpo" and decided["trains"] and len(decided["path"]) == 3
    assert decided["settings"] == {"method": "grpo"}
    assert unanswered[1] and "is not answered" in unanswered[0]
    assert compared["config"] == [{"key": "train.trl.learning_rate", "a": 1e-4, "b": 2e-4}]
    assert compared["metrics"][0]["b"] == 1.0
    # hand-written data manifest: not current, so the row comes from the source file, masked by the real template
    (row,) = preview["rows"]
    assert preview["from_data_stage"] is False and row["id"] == "t1" and row["where"].endswith("train.jsonl:2")
    assert row["text"].endswith("assistant\n⟦a<|im_end|>⟧\n") and row["status"] == "fits max_length, not truncated"
    assert report.contents[0].text.startswith("# mcpdemo, run r1")
    assert json.loads(manifest.contents[0].text)["stage"] == "train"
    assert templates == {"tunegate://runs/{run_id}/report", "tunegate://runs/{run_id}/{stage}/manifest"}


def test_paths_outside_the_project_and_write_tools_are_refused_without_the_flag(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    atomic_write_json(outside / "eval" / "verdict.json", VERDICT)
    (project / "runs" / "linked").symlink_to(outside)  # a run folder that leads outside the project

    async def body(s):
        return [payload(await s.call_tool("verdict", {"run_id": rid})) for rid in ("../..", "r1/../r2", "nope", "linked")] + [
            payload(await s.call_tool("start_run", {"run_id": "r3"})),
            payload(await s.call_tool("promote", {"run_id": "r1"})),
        ]

    (dots, _), (slash, _), (missing, _), (linked, linked_err), (start, start_err), (promote, promote_err) = \
        asyncio.run(session(project, False, body))
    assert "is not a letter or digit" in dots and "is not a letter or digit" in slash
    assert "no run" in missing and "existing runs: " in missing
    assert linked_err and "outside the project folder" in linked
    assert start_err and promote_err and "start_run" in start and "promote" in promote
    assert not (project / "runs" / "r3").exists()


def test_write_tools_are_listed_with_allow_writes(project):
    async def body(s):
        names = {t.name for t in (await s.list_tools()).tools}
        bad_stage = payload(await s.call_tool("start_stage", {"stage": "../eval", "run_id": "r1"}))
        bad_until = payload(await s.call_tool("start_run", {"run_id": "r1", "until": "deploy"}))
        progress, _ = payload(await s.call_tool("run_progress", {"run_id": "r1"}))
        no_run = payload(await s.call_tool("start_stage", {"stage": "eval", "run_id": "nothing_yet"}))
        # the data stage (no model weights, no training) of a new run, in the background, polled to its end
        started, _ = payload(await s.call_tool("start_stage", {"stage": "data", "run_id": "fresh"}))
        for _ in range(600):
            done, _ = payload(await s.call_tool("run_progress", {"run_id": "fresh"}))
            if done["state"] != "running":
                break
            await asyncio.sleep(0.5)
        return names, bad_stage, bad_until, progress, no_run, started, done

    names, bad_stage, bad_until, progress, no_run, started, done = asyncio.run(session(project, True, body))
    assert {"start_run", "start_stage", "run_progress", "promote"} <= names
    assert bad_stage[1] and "not a stage" in bad_stage[0]
    assert bad_until[1] and "--until deploy: not a stage" in bad_until[0]
    assert progress["state"] == "none" and progress["log_tail"] == [] and progress["output_tail"] == []
    assert no_run[1] and "run_id nothing_yet: no run" in no_run[0]  # refused before anything starts
    assert started["state"] == "running" and started["command"][:2] == ["tunegate", "data"]
    assert done["state"] == "exited" and done["exit_code"] == 0, done["log_tail"]
    assert any("data" in line for line in done["log_tail"]) and done["output_tail"]
    assert (project / "runs" / "fresh" / "data" / "manifest.json").is_file()
