"""Serving load test: N concurrent clients, each doing a chat completion and then posting feedback on it.

Works against any OpenAI-compatible server (`--url` and `--key`): tunegate's embedded engine now, vLLM behind
the same API later (`--no-feedback` where the server has no /v1/feedback). Reports chat requests/s, p50/p95/p99
latency of chat completions and of feedback posts, failures by kind, and checks that the feedback rows added to
the serving database equal the feedback posts sent and acknowledged (exactly once), when it can read that
database (`--database-url`, or the server it started itself). Each feedback carries its own Idempotency-Key;
`--feedback-repeats 3` sends each one three times with the same key, as a retrying client would, and the
check still expects one row per feedback.

    # start the embedded server itself on a tiny random Llama (real tokenizer; seconds to start)
    python bench/serve_load.py --start tiny --duration 10
    # on the embedded base model SmolLM2-135M-Instruct (fp32 on this CPU; the 60 s default is the figure)
    python bench/serve_load.py --start smollm2 --clients 16 --duration 60
    # any running server
    python bench/serve_load.py --url http://127.0.0.1:8000/v1 --key tg-... --model support \\
        --database-url sqlite:///path/to/serve.db
    # one project's bundles on both engines, back to back on one machine: `tunegate serve --engine E` as a
    # separate process each time (what a user runs), the same clients, prompts and settings against each
    python bench/serve_load.py --project PROJECT --engine vllm --engine embedded --clients 16 --duration 60

The README's table used this PROJECT: a copy of examples/quickstart (data/, golden.lock.json, tunegate.yaml)
with two plain-LoRA runs released as signed bundles and listed under serve.bundles (public_key: keys/public.pem):

    O="audit.enabled=false train.adapter=lora train.lora.use_dora=false"
    tunegate run tunegate.yaml --run-id support --until eval $O train.seed=0    # and: sales, train.seed=1
    tunegate keys generate --out keys
    tunegate release tunegate.yaml --key keys/private.pem --run-id support --out bundles/support $O train.seed=0

The embedded engine answers one request at a time (see tunegate.serve.engine), so its requests/s is the model's
single-stream speed and the latency grows with the number of clients queued behind the lock; feedback posts
do not wait for that lock. Writes bench/results/serve_load.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "How do I reset my password?",
    "What are your opening hours on Sunday?",
    "Can I change the delivery address of an order?",
    "Summarise our refund policy in one sentence.",
    "Which payment methods do you accept?",
    "My card was charged twice, what should I do?",
    "How long does shipping to Canada take?",
    "Write a short thank-you note to a customer.",
]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values, None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def summary_ms(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else None, "max_ms": max(ms) if ms else None}


def tiny_base_model(out: Path) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) with the real SmolLM2 tokenizer, as the tests build it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunegate.models import load_tokenizer, resolve_base_model

    tok = load_tokenizer(resolve_base_model("smollm2-135m-instruct", progress=True))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def start_embedded(which: str, workdir: Path, max_tokens: int):
    """Start tunegate's embedded server on the base model alone, in a throwaway project with one tenant.
    Returns (BackgroundServer, api key, model name, database URL, description)."""
    from tunegate.config import load_project
    from tunegate.serve import create_app, start_background
    from tunegate.serve import db as servedb

    base = str(tiny_base_model(workdir / "tiny-llama")) if which == "tiny" else "smollm2-135m-instruct"
    (workdir / "golden.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}]}) + "\n")
    (workdir / "tunegate.yaml").write_text(
        f"name: load\nbase_model: {base}\n"
        "data:\n  sources: [{path: golden.jsonl}]\n  golden: {path: golden.jsonl}\n"
        f"serve:\n  max_new_tokens: {max_tokens}\n")
    project = load_project(workdir / "tunegate.yaml")
    app = create_app(project)
    url = servedb.project_url(project)
    key = servedb.add_tenant(app.state.db, "load", [], allow_base=True)
    srv = start_background(app)
    desc = {"engine": "embedded", "base_model": "tiny random Llama (2 layers, hidden 64, SmolLM2 tokenizer)"
            if which == "tiny" else "smollm2-135m-instruct (fp32)"}
    return srv, key, app.state.engine.base_name, url, desc


def result_header(benchmark: str) -> dict:
    """The fields every result file of this script starts with: what, when, on which machine."""
    return {"benchmark": benchmark, "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}}


def db_check(rows_added: int, feedback: dict) -> dict:
    """Exactly once: the rows the serving database gained equal the feedback sent and acknowledged."""
    return {"rows_added": rows_added, "sent": feedback["sent"], "acknowledged": feedback["acknowledged"],
            "exactly_once": rows_added == feedback["sent"] == feedback["acknowledged"]}


def wait_healthy(url: str, proc, timeout_s: float, log: Path) -> None:
    """Poll GET {url}/../health until the server answers 200; raise with the log's tail if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    health = url.removesuffix("/v1") + "/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tunegate serve exited with {proc.returncode}:\n" + "\n".join(log.read_text().splitlines()[-30:]))
        try:
            if httpx.get(health, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"tunegate serve did not answer {health} within {timeout_s:.0f} s (log: {log})")


def serve_project(project_path: Path, engine: str, args, workdir: Path) -> dict:
    """One engine's run: a new tenant granted every bundle, `tunegate serve PROJECT --engine ENGINE` started as
    its own process, the load, the exactly-once check against the project's serving database, then SIGINT."""
    import signal
    import subprocess
    import sys

    from tunegate.config import load_project
    from tunegate.serve import db as servedb
    from tunegate.serve.bundles import bundle_name
    from tunegate.serve.vllm import free_port

    project = load_project(project_path)
    models = [bundle_name(b) for b in (project.serve.bundles if project.serve else [])]
    if not models:
        raise SystemExit(f"{project_path}: serve.bundles is empty: nothing to load-test")
    db_url = servedb.project_url(project)
    db = servedb.connect(db_url)
    key = servedb.add_tenant(db, f"load-{engine}-{uuid.uuid4().hex[:8]}", models)
    port = free_port()
    log = workdir / f"serve-{engine}.log"
    cmd = [sys.executable, "-m", "tunegate.cli", "serve", str(project_path), "--engine", engine, "--port", str(port)]
    if engine == "vllm" and args.vllm_venv:
        cmd += ["--vllm-venv", str(args.vllm_venv)]
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_healthy(url, proc, args.startup_timeout, log)
        startup = round(time.perf_counter() - t0, 1)
        print(f"{engine}: serving after {startup} s; load: {args.clients} clients x {args.duration:g} s ({', '.join(models)})", flush=True)
        before, load_before = servedb.count_feedback(db), os.getloadavg()
        result = run_load(url, [key], models, args.clients, args.duration, args.max_tokens, True,
                          max(1, args.feedback_repeats), args.timeout)
        result["feedback_db_check"] = db_check(servedb.count_feedback(db) - before, result["feedback"])
        result["server"] = {"engine": engine, "command": " ".join(cmd[1:]), "startup_s": startup, "models": models,
                            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}
        if engine == "vllm":
            line = next((x for x in log.read_text().splitlines() if "starting vLLM:" in x), "")
            result["server"]["vllm_launch"] = line.split("starting vLLM: ", 1)[-1]
        return result
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_load(url: str, keys: list[str], models: list[str], clients: int, duration_s: float, max_tokens: int,
             feedback: bool, repeats: int, timeout_s: float) -> dict:
    """The load itself: `clients` threads until `duration_s` has passed (a request in flight then finishes)."""
    import httpx

    chat_lat: list[float] = []
    fb_lat: list[float] = []
    failures: Counter = Counter()
    counts = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client(i: int) -> None:
        key, model = keys[i % len(keys)], models[i % len(models)]
        n = 0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s) as c:
            while time.monotonic() < deadline:
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0.7, "seed": i * 100_003 + n,
                        "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}]}
                n += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        failures[f"chat:{type(exc).__name__}"] += 1
                    continue
                dt_s = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        failures[f"chat:http_{r.status_code}"] += 1
                        continue
                    chat_lat.append(dt_s)
                    counts["chat_ok"] += 1
                if not feedback:
                    continue
                trace_id = r.json()["id"]
                rating = "up" if n % 2 else "down"
                fb = {"trace_id": trace_id, "rating": rating}
                if n % 4 == 0:
                    fb["edited_answer"] = f"An edited, better answer number {n} from client {i}."
                idem = f"load-{uuid.uuid4().hex}"
                with lock:
                    counts["feedback_sent"] += 1
                acked = False
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    try:
                        f = c.post("/feedback", json=fb, headers={"Idempotency-Key": idem})
                    except httpx.HTTPError as exc:
                        with lock:
                            failures[f"feedback:{type(exc).__name__}"] += 1
                        continue
                    dt_s = time.perf_counter() - t0
                    with lock:
                        if f.status_code not in (200, 201):
                            failures[f"feedback:http_{f.status_code}"] += 1
                            continue
                        fb_lat.append(dt_s)
                        counts["feedback_posts_ok"] += 1
                        counts["feedback_replayed"] += int(f.status_code == 200)
                        acked = True
                if acked:
                    with lock:
                        counts["feedback_acknowledged"] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    return {
        "wall_s": round(wall, 3),
        "chat": {**summary_ms(chat_lat), "requests_per_s": counts["chat_ok"] / wall if wall else None},
        "feedback": {**summary_ms(fb_lat), "posts_per_s": counts["feedback_posts_ok"] / wall if wall else None,
                     "sent": counts["feedback_sent"], "acknowledged": counts["feedback_acknowledged"],
                     "posts_ok": counts["feedback_posts_ok"], "replayed": counts["feedback_replayed"]},
        "failures": dict(failures),
        "failures_total": sum(failures.values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="base URL of an OpenAI-compatible server, ending in /v1")
    ap.add_argument("--key", action="append", default=[], help="API key (repeatable: clients take them in turn)")
    ap.add_argument("--model", action="append", default=[], help="model name (repeatable: clients take them in turn)")
    ap.add_argument("--start", choices=["tiny", "smollm2"], help="start tunegate's embedded server itself on this base model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each chat completion")
    ap.add_argument("--no-feedback", action="store_true", help="chat completions only (a server without /v1/feedback)")
    ap.add_argument("--feedback-repeats", type=int, default=1, help="send each feedback this many times with one Idempotency-Key")
    ap.add_argument("--database-url", help="the server's serving database (SQLAlchemy URL), to count feedback rows")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/serve_load.json "
                    "(serve_load_compare.json with --project)")
    ap.add_argument("--project", type=Path, help="serve this project's serve.bundles with each --engine in turn")
    ap.add_argument("--engine", action="append", choices=["embedded", "vllm"], default=[],
                    help="with --project: the engines to run, in this order (repeatable; default vllm then embedded)")
    ap.add_argument("--vllm-venv", type=Path, help="with --engine vllm: vLLM's environment (default .venv-vllm)")
    ap.add_argument("--startup-timeout", type=float, default=1200.0, help="with --project: seconds for a server to come up")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.project:
        return compare(args)
    args.out = args.out or REPO / "bench" / "results" / "serve_load.json"
    if not args.start and not (args.url and args.key and args.model):
        ap.error("give --start tiny|smollm2, or --url with --key and --model")

    srv, tmp = None, None
    server: dict = {"engine": "external", "url": args.url}
    if args.start:
        tmp = tempfile.TemporaryDirectory(prefix="tunegate-load-")
        t0 = time.perf_counter()
        srv, key, model, db_url, server = start_embedded(args.start, Path(tmp.name), args.max_tokens)
        server["startup_s"] = round(time.perf_counter() - t0, 2)
        url, keys, models = srv.url, [key], [model]
        args.database_url = args.database_url or db_url
    else:
        url, keys, models = args.url.rstrip("/"), args.key, args.model
    try:
        engine = None
        if args.database_url and not args.no_feedback:
            from tunegate.serve import db as servedb

            engine = servedb.connect(args.database_url)
            rows_before = servedb.count_feedback(engine)
        print(f"load: {args.clients} clients x {args.duration:g} s against {url} ({', '.join(models)})", flush=True)
        result = run_load(url, keys, models, args.clients, args.duration, args.max_tokens, not args.no_feedback,
                          max(1, args.feedback_repeats), args.timeout)
        check = None
        if engine is not None:
            check = db_check(servedb.count_feedback(engine) - rows_before, result["feedback"])
    finally:
        if srv is not None:
            srv.stop()
        if tmp is not None:
            tmp.cleanup()
    out = {
        **result_header("serve_load"),
        "server": server,
        "settings": {"clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
                     "models": models, "feedback": not args.no_feedback, "feedback_repeats": args.feedback_repeats},
        **result,
        "feedback_db_check": check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    c, f = result["chat"], result["feedback"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    print(f"chat: {c['n']} ok, {c['requests_per_s']:.2f} req/s, p50 {fmt(c['p50_ms'])} ms, p95 {fmt(c['p95_ms'])} ms")
    if not args.no_feedback:
        print(f"feedback: {f['sent']} sent, {f['acknowledged']} acknowledged, p50 {fmt(f['p50_ms'])} ms, p95 {fmt(f['p95_ms'])} ms")
    print(f"failures: {result['failures_total']} {result['failures'] or ''}")
    if check is not None:
        print(f"feedback rows added to the database: {check['rows_added']} (exactly once: {check['exactly_once']})")
    print(f"wrote {args.out}")
    ok = result["failures_total"] == 0 and (check is None or check["exactly_once"])
    return 0 if ok else 1


def compare(args) -> int:
    """--project: each engine in turn on the same bundles and settings; one JSON with the runs side by side."""
    engines = args.engine or ["vllm", "embedded"]
    out_path = args.out or REPO / "bench" / "results" / "serve_load_compare.json"
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tunegate-load-") as tmp:
        for engine in engines:
            runs[engine] = serve_project(args.project.resolve(), engine, args, Path(tmp))
            c = runs[engine]["chat"]
            print(f"{engine}: {c['n']} ok, {c['requests_per_s']:.2f} req/s, p50 {c['p50_ms']:.0f} ms, p95 {c['p95_ms']:.0f} ms, "
                  f"failures {runs[engine]['failures_total']}, feedback rows exactly once: "
                  f"{runs[engine]['feedback_db_check']['exactly_once']}", flush=True)
    try:
        project = str(args.project.resolve().relative_to(REPO))
    except ValueError:
        project = str(args.project)
    out = {
        **result_header("serve_load_compare"),
        "project": project,
        "settings": {"clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
                     "feedback_repeats": args.feedback_repeats, "order": engines},
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print("| engine | chat requests/s | p50 | p95 | failures | feedback rows exactly once |")
    for engine, r in runs.items():
        c, chk = r["chat"], r["feedback_db_check"]
        print(f"| {engine} | {c['requests_per_s']:.2f} | {c['p50_ms'] / 1000:.1f} s | {c['p95_ms'] / 1000:.1f} s | "
              f"{r['failures_total']} | {chk['rows_added']} of {chk['sent']} |")
    print(f"wrote {out_path}")
    ok = all(r["failures_total"] == 0 and r["feedback_db_check"]["exactly_once"] for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
