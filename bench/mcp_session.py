"""One agent session with `tunegate mcp`, recorded: every request an MCP client sends and the server's answer.

The client is the MCP SDK's own (mcp.client.stdio + ClientSession); the server is `python -m tunegate.cli mcp
PROJECT` (read-only: no --allow-writes). The project is the hand-written one of tests/integration/test_mcp.py
(runs r1 and r2 with manifests, eval scores, r1 with a verdict, an audit and a report; nothing trained), made in
a temporary folder, or --project PATH for a real one. Each entry: the method, the tool or resource, its
arguments, whether it is an error, the answer (JSON when it is JSON) and the milliseconds it took.

    python bench/mcp_session.py                      # writes bench/results/mcp_session.json
    python bench/mcp_session.py --project examples/quickstart --run-id default --other-run default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for sub in ("src", "tests", "tests/unit", "tests/integration"):
    sys.path.insert(0, str(REPO / sub))

from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402


def _field(obj, name: str, v1_name: str):
    return getattr(obj, name) if hasattr(obj, name) else getattr(obj, v1_name)


def _answer(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


async def record(project: Path, run_id: str, other: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    params = StdioServerParameters(command=sys.executable, args=["-m", "tunegate.cli", "mcp", str(project)], env=env)
    transcript = []
    t_start = time.perf_counter()
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            init = await s.initialize()
            startup_ms = (time.perf_counter() - t_start) * 1000
            server_info = _field(init, "server_info", "serverInfo")

            async def step(method, name, arguments, call):
                t0 = time.perf_counter()
                result = await call()
                ms = round((time.perf_counter() - t0) * 1000, 1)
                if method == "tools/list":
                    answer, error = [t.name for t in result.tools], False
                elif method == "resources/templates/list":
                    answer, error = [_field(t, "uri_template", "uriTemplate") for t in _field(result, "resource_templates", "resourceTemplates")], False
                elif method == "resources/read":
                    answer, error = result.contents[0].text, False
                else:
                    answer, error = _answer(result.content[0].text), _field(result, "is_error", "isError")
                transcript.append({"method": method, "name": name, "arguments": arguments, "is_error": error,
                                   "answer": answer, "ms": ms})

            async def tool(name, arguments):
                await step("tools/call", name, arguments, lambda: s.call_tool(name, arguments))

            await step("tools/list", None, None, s.list_tools)
            await step("resources/templates/list", None, None, s.list_resource_templates)
            await tool("validate", {})
            await tool("list_runs", {})
            await tool("verdict", {"run_id": run_id})
            await tool("audit_recommendation", {"run_id": run_id})
            await tool("compare_runs", {"run_a": run_id, "run_b": other})
            await tool("decide", {"answers": {"changing_knowledge": "no", "prompt_meets_bar": "no"}})
            await tool("decide", {"answers": {"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "yes"}})
            await tool("preview_rows", {"run_id": run_id, "first": 1})
            await tool("verdict", {"run_id": "../../etc"})
            await tool("start_run", {"run_id": "r3"})  # a write tool: not offered without --allow-writes
            uri = f"tunegate://runs/{run_id}/eval/manifest"
            await step("resources/read", uri, None, lambda: s.read_resource(uri))
            uri_report = f"tunegate://runs/{run_id}/report"
            await step("resources/read", uri_report, None, lambda: s.read_resource(uri_report))
    return {"server": {"name": server_info.name, "command": ["tunegate", "mcp", "PROJECT"], "allow_writes": False},
            "project": "hand-written demo (tests/integration/test_mcp.py: finished_project)" if other == "r2" else str(project),
            "startup_ms": round(startup_ms, 1), "calls": transcript}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, help="a project (default: the hand-written demo in a temporary folder)")
    ap.add_argument("--run-id", default="r1")
    ap.add_argument("--other-run", default="r2", help="the run compared with --run-id")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mcp_session.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = a.project
        if project is None:
            from test_mcp import finished_project

            project = finished_project(Path(tmp))
        result = asyncio.run(record(project.resolve(), a.run_id, a.other_run))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(result['calls'])} calls, startup {result['startup_ms']} ms; wrote {a.out}")


if __name__ == "__main__":
    main()
