"""Serving under abuse (issue 23, kinds 4 and 5): does one tenant's abuse stall another tenant, and does SIGTERM stop
the server while it is abused?

Two tenants of tunegate's embedded server on loopback (base model alone). Tenant B sends short requests
(max_tokens 8, greedy) one after another; B's latency is measured alone (the baseline, before and after the abuse)
and while tenant A sends 100,000-character prompts (max_tokens 1) from several threads, whose answers are counted
by status. With
`--near-window-duration S`, A then sends prompts just under the model's context window instead (valid requests, the
most expensive ones: what the limits do not refuse). Last, `tunegate serve` is started as its own process, abused the
same way with one long answer in flight, and sent SIGTERM: the seconds to exit are measured.

    # the embedded base model SmolLM2-135M-Instruct (fp32 on this CPU): the README's numbers
    python bench/serve_abuse.py --duration 60
    python bench/serve_abuse.py --start tiny --duration 2 --baseline-duration 1   # seconds (the test runs this)

Before issue 23 one 100,000-character prompt held the generation lock for over 6.5 minutes and SIGTERM did not stop
the server. Writes bench/results/serve_abuse.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from serve_load import REPO, result_header, summary_ms, tiny_base_model, wait_healthy

SHORT = "How do I reset my password?"
LONG_ANSWER = "Write a long story about a lighthouse keeper and the sea."
WORDS = ["alpha", "harbour", "quantum", "ledger", "violet", "seventeen", "marmalade", "turbine", "oblique", "zephyr"]


def abusive_prompt(chars: int = 100_000) -> str:
    """`chars` characters of ordinary words: far more tokens than any small model's context window."""
    text, i = [], 0
    while sum(map(len, text)) + len(text) < chars:
        text.append(f"{WORDS[i % len(WORDS)]}{i % 97}")
        i += 1
    return " ".join(text)[:chars]


def near_window_prompt(tokenizer, window: int, margin: int = 16) -> str:
    """A user message whose chat-templated prompt is about `window - margin` tokens: valid, and the most expensive."""
    unit = "The quick brown fox jumps over the lazy dog. "
    lo, hi = 1, window
    while lo < hi:  # the most repeats that still fit
        mid = (lo + hi + 1) // 2
        n = len(tokenizer.apply_chat_template([{"role": "user", "content": unit * mid}], add_generation_prompt=True,
                                              return_dict=True)["input_ids"])
        lo, hi = (mid, hi) if n <= window - margin else (lo, mid - 1)
    return unit * lo


def setup(which: str, workdir: Path, grace_s: float) -> dict:
    """A throwaway project on the base model with tenants A and B; the app (not started) and the project file."""
    from tunegate.config import load_project
    from tunegate.serve import create_app
    from tunegate.serve import db as servedb

    base = str(tiny_base_model(workdir / "tiny-llama")) if which == "tiny" else "smollm2-135m-instruct"
    (workdir / "golden.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}]}) + "\n")
    yaml = workdir / "tunegate.yaml"
    yaml.write_text(f"name: abuse\nbase_model: {base}\ndata:\n  sources: [{{path: golden.jsonl}}]\n"
                    f"  golden: {{path: golden.jsonl}}\nserve:\n  shutdown_grace_s: {grace_s}\n")
    project = load_project(yaml)
    t0 = time.perf_counter()
    app = create_app(project)
    startup = time.perf_counter() - t0
    keys = {t: servedb.add_tenant(app.state.db, t, [], allow_base=True) for t in ("tenant-a", "tenant-b")}
    engine = app.state.engine
    settings = app.state.settings
    return {"yaml": yaml, "app": app, "keys": keys, "model": engine.base_name, "engine": engine,
            "server": {"engine": "embedded", "base_model": "tiny random Llama (2 layers, hidden 64, SmolLM2 tokenizer)"
                       if which == "tiny" else "smollm2-135m-instruct (fp32)", "load_s": round(startup, 2),
                       "context_window": engine.context_window, "max_token_chars": engine.max_token_chars,
                       "prefill_chunk_tokens": engine.prefill_chunk_tokens,
                       "serve": {"max_new_tokens": settings.max_new_tokens, "max_request_bytes": settings.max_request_bytes,
                                 "request_timeout_s": settings.request_timeout_s, "shutdown_grace_s": settings.shutdown_grace_s}}}


def _chat(model: str, text: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


class Tenant:
    """Requests of one kind in a loop on `threads` threads until `stop` is set; latencies and statuses recorded."""

    def __init__(self, url: str, key: str, body: dict, threads: int, timeout_s: float):
        self.url, self.key, self.body, self.threads, self.timeout_s = url, key, body, threads, timeout_s
        self.latencies: list[float] = []  # seconds, every answered request
        self.ok_latencies: list[float] = []  # seconds, 200s only
        self.statuses: Counter = Counter()
        self.codes: Counter = Counter()  # the error codes of non-200 answers
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=self.timeout_s) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.post("/chat/completions", json=self.body)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.statuses[type(exc).__name__] += 1
                    time.sleep(0.1)  # a server that is gone refuses at once: do not spin
                    continue
                dt = time.perf_counter() - t0
                with self._lock:
                    self.statuses[str(r.status_code)] += 1
                    self.latencies.append(dt)
                    if r.status_code == 200:
                        self.ok_latencies.append(dt)
                    else:
                        try:
                            self.codes[str(r.json()["error"]["code"])] += 1
                        except (ValueError, KeyError, TypeError):
                            self.codes["?"] += 1

    def start(self) -> Tenant:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for t in self._threads:
            t.start()
        return self

    def finish(self, join_s: float) -> dict:
        self.stop.set()
        for t in self._threads:
            t.join(join_s)
        return {"threads": self.threads, "statuses": dict(self.statuses), "error_codes": dict(self.codes),
                "requests": sum(self.statuses.values()), "latency": summary_ms(self.latencies),
                "ok_latency": summary_ms(self.ok_latencies)}


def phase(url: str, keys: dict, model: str, duration_s: float, abuse_body: dict | None, abusers: int, timeout_s: float) -> dict:
    """`duration_s` of tenant B's short requests, with tenant A's `abuse_body` on `abusers` threads beside (or none)."""
    b = Tenant(url, keys["tenant-b"], _chat(model, SHORT, 8), 1, timeout_s).start()
    a = Tenant(url, keys["tenant-a"], abuse_body, abusers, timeout_s).start() if abuse_body else None
    time.sleep(duration_s)
    out = {"duration_s": duration_s, "tenant_b": b.finish(timeout_s)}
    if a is not None:
        out["tenant_a"] = a.finish(timeout_s)
    return out


def tunegate_src() -> str:
    """The folder this process imports tunegate from: the `tunegate serve` subprocess runs the same code."""
    import tunegate

    return str(Path(tunegate.__file__).resolve().parents[1])


def sigterm_phase(yaml: Path, keys: dict, model: str, abusers: int, after_s: float, startup_timeout_s: float,
                  workdir: Path) -> dict:
    """`tunegate serve` as its own process, abused by A with one long answer for B in flight, then SIGTERM."""
    from tunegate.serve.vllm import free_port

    port = free_port()
    log = workdir / "serve.log"
    cmd = [sys.executable, "-m", "tunegate.cli", "serve", str(yaml), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tunegate_src(), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    long_answer: dict = {}
    try:
        wait_healthy(url, proc, startup_timeout_s, log)
        startup = time.perf_counter() - t0

        def ask_long() -> None:
            import httpx

            try:
                r = httpx.post(url + "/chat/completions", json=_chat(model, LONG_ANSWER, 256),
                               headers={"Authorization": f"Bearer {keys['tenant-b']}"}, timeout=600)
                long_answer.update(status=r.status_code, answered_at=time.perf_counter())
                if r.status_code == 200:
                    body = r.json()
                    long_answer.update(finish_reason=body["choices"][0]["finish_reason"],
                                       completion_tokens=body["usage"]["completion_tokens"])
                else:
                    long_answer["code"] = r.json()["error"]["code"]
            except Exception as exc:  # noqa: BLE001  (a dropped connection is a result here)
                long_answer.update(status=type(exc).__name__, answered_at=time.perf_counter())

        longer = threading.Thread(target=ask_long, daemon=True)
        longer.start()
        time.sleep(0.5)  # the long answer takes the lock first
        a = Tenant(url, keys["tenant-a"], _chat(model, abusive_prompt(), 1), abusers, 120).start()
        time.sleep(after_s)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=600)
            exit_s = time.perf_counter() - sent
        except subprocess.TimeoutExpired:
            exit_s = None
        a_result = a.finish(10)
        longer.join(10)
        if "answered_at" in long_answer:  # seconds after SIGTERM (negative: answered before it)
            long_answer["answered_after_sigterm_s"] = round(long_answer.pop("answered_at") - sent, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"command": " ".join(cmd[1:3] + ["serve", "PROJECT", "--port", "P"]), "startup_s": round(startup, 2),
            "sigterm_after_s": after_s, "sigterm_to_exit_s": None if exit_s is None else round(exit_s, 2),
            "returncode": proc.returncode, "long_answer_in_flight": long_answer, "tenant_a": a_result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", choices=["tiny", "smollm2"], default="smollm2", help="the base model (default smollm2)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of 100,000-character abuse")
    ap.add_argument("--baseline-duration", type=float, default=30.0, help="seconds of tenant B alone")
    ap.add_argument("--near-window-duration", type=float, default=0.0,
                    help="seconds of abuse with prompts just under the context window (0: skip)")
    ap.add_argument("--abusers", type=int, default=4, help="tenant A's concurrent threads")
    ap.add_argument("--shutdown-grace", type=float, default=2.0, help="serve.shutdown_grace_s of the project")
    ap.add_argument("--sigterm-after", type=float, default=3.0, help="seconds of abuse before SIGTERM")
    ap.add_argument("--no-sigterm", action="store_true", help="skip the `tunegate serve` SIGTERM phase")
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for `tunegate serve` to come up")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_abuse.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunegate.serve import start_background

    with tempfile.TemporaryDirectory(prefix="tunegate-abuse-") as tmp:
        workdir = Path(tmp)
        s = setup(args.start, workdir, args.shutdown_grace)
        srv = start_background(s["app"])
        try:
            print(f"in-process server {srv.url}: {s['server']['base_model']}, context window "
                  f"{s['server']['context_window']} tokens", flush=True)
            import httpx

            for _ in range(2):  # warm-up, not counted: the first forward passes are slower
                httpx.post(srv.url + "/chat/completions", json=_chat(s["model"], SHORT, 8), timeout=args.timeout,
                           headers={"Authorization": f"Bearer {s['keys']['tenant-b']}"}).raise_for_status()
            load = {"before": os.getloadavg()[0]}
            baseline = phase(srv.url, s["keys"], s["model"], args.baseline_duration, None, 0, args.timeout)
            print(f"baseline: B {fmt(baseline['tenant_b'])}", flush=True)
            abuse = phase(srv.url, s["keys"], s["model"], args.duration, _chat(s["model"], abusive_prompt(), 1),
                          args.abusers, args.timeout)
            print(f"abuse (100,000 characters x {args.abusers} threads): B {fmt(abuse['tenant_b'])}; "
                  f"A {abuse['tenant_a']['statuses']} {abuse['tenant_a']['error_codes']}", flush=True)
            baseline_after = phase(srv.url, s["keys"], s["model"], args.baseline_duration, None, 0, args.timeout)
            load["after"] = os.getloadavg()[0]
            print(f"baseline again: B {fmt(baseline_after['tenant_b'])}", flush=True)
            near = None
            if args.near_window_duration > 0:
                prompt = near_window_prompt(s["engine"].tokenizer, s["engine"].context_window)
                near = phase(srv.url, s["keys"], s["model"], args.near_window_duration, _chat(s["model"], prompt, 1),
                             args.abusers, args.timeout)
                near["prompt_chars"] = len(prompt)
                print(f"near-window abuse: B {fmt(near['tenant_b'])}; A {near['tenant_a']['statuses']} "
                      f"{near['tenant_a']['error_codes']}", flush=True)
        finally:
            srv.stop()
        sigterm = None
        if not args.no_sigterm:
            sigterm = sigterm_phase(s["yaml"], s["keys"], s["model"], args.abusers, args.sigterm_after,
                                    args.startup_timeout, workdir)
            print(f"SIGTERM during abuse: exit after {sigterm['sigterm_to_exit_s']} s (rc {sigterm['returncode']}); "
                  f"answer in flight: {sigterm['long_answer_in_flight']}; A {sigterm['tenant_a']['statuses']}", flush=True)
    out = {**result_header("serve_abuse"), "server": s["server"],
           "settings": {"duration_s": args.duration, "baseline_duration_s": args.baseline_duration,
                        "near_window_duration_s": args.near_window_duration, "abusers": args.abusers,
                        "abuse_prompt_chars": 100_000, "tenant_b": {"max_tokens": 8, "prompt": SHORT}},
           "loadavg_1min": {k: round(v, 2) for k, v in load.items()},
           "baseline": baseline, "abuse": abuse, "baseline_after": baseline_after, "near_window": near, "sigterm": sigterm}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    b_ok = abuse["tenant_b"]["statuses"].keys() <= {"200"}
    a_refused = abuse["tenant_a"]["statuses"].keys() <= {"400"}
    stopped = sigterm is None or (sigterm["sigterm_to_exit_s"] is not None and sigterm["returncode"] == 0)
    return 0 if b_ok and a_refused and stopped else 1


def fmt(t: dict) -> str:
    lat = t["ok_latency"]
    ms = lambda v: "-" if v is None else f"{v:.0f} ms"
    return f"{lat['n']} ok of {t['requests']}, p50 {ms(lat['p50_ms'])}, p95 {ms(lat['p95_ms'])} {t['statuses']}"


if __name__ == "__main__":
    raise SystemExit(main())
