"""`tunegate serve PROJECT --engine vllm`: vLLM serves the base model and the release bundles' LoRA adapters,
behind tunegate's own API keys, traces and feedback store.

vLLM's OpenAI server has no per-tenant access control, so it listens on a private loopback port and
tunegate's FastAPI app (tunegate.serve.api.create_app) stands in front of it as a thin proxy: it authenticates the
tenant, checks the model is granted, forwards the chat completion to vLLM (`VLLMEngine.complete`, httpx),
writes the trace and takes feedback. The API is the same as the embedded engine's.

    tenant --HTTP--> tunegate app (auth, trace, feedback) --loopback--> vLLM api_server (continuous batching,
                                                                         multi-LoRA kernels)

Launch (`plan_launch`, `LaunchPlan.argv`):

    python -m vllm.entrypoints.openai.api_server --model BASE_DIR --served-model-name BASE_NAME --enable-lora
        --lora-modules NAME=DIR ... --max-lora-rank R --max-loras N --dtype bfloat16 --host 127.0.0.1 --port P
        --generation-config GEN_DIR

GEN_DIR holds a copy of the model folder's generation_config.json whose eos_token_id lists eos and the end-of-turn
token (models.write_stop_tokens), and every forwarded request carries them as `stop_token_ids`: a base whose
eos is not its end-of-turn token (`<|endoftext|>` vs `<|im_end|>`) would otherwise answer to max_tokens.

R is `release.max_lora_rank_for` over every rank of every adapter (case C14 in docs/cases.md: a server started with the
default max rank 16 fails on a rank-32 adapter at its first request). Before launch each bundle is verified
(signature, PASS verdict, same base model: tunegate.serve.bundles) and checked against what vLLM can
serve as a LoRA (release.json's "vllm" record and `release.vllm_compatibility` on the adapter's own config):
`modules_to_save` (case C15), DoRA magnitude vectors (C16), trained biases and ranks above vLLM's largest are
refused for multi-LoRA serving with the reasons; such a bundle carries a merged model (`merged/`), which one
vLLM server serves as its model on its own (`--merged NAME`: one model, no base, no LoRA). A classification head
(train.method classify) is refused outright (CLASSIFY_REFUSAL): it has no merged model; the embedded engine serves it.
So is an adapter the eval gate measured with an abstain threshold (eval.abstain, ABSTAIN_REFUSAL): vLLM would not apply it.

After launch, before it accepts a tenant, the server runs the smoke test (case C17, tunegate.serve.smoke).

Runtime adapters: vLLM is started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; `VLLMEngine.add_adapter`
verifies a bundle like at launch and posts /v1/load_lora_adapter, `remove_adapter` /v1/unload_lora_adapter
(the proxy's admin endpoints, `tunegate serve-adapters add|remove`). A rank above the server's
--max-lora-rank needs a restart and is refused.

vLLM lives in its own virtual environment (`tunegate serve-setup vllm`, tunegate.serve.vllm_setup); tunegate
runs it as a subprocess with that environment's python.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.core.paths import check_identifier
from tunegate.serve.bundles import (
    ServedAdapter,
    base_model_name,
    copy_verified,
    verify_bundles,
)
from tunegate.serve.engine import ApiError, Completion, NotServable, shutting_down_error
from tunegate.serve.vllm_setup import find_vllm_python

KVCACHE_SPACE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE default: small, the CPU's memory is shared with everything
ADMIN_FILE = ".tunegate-serve.json"  # in the project folder: the running proxy's URL and admin token (0600)


# ---------------------------------------------------------------- the launch


@dataclass
class LoraModule:
    name: str
    path: Path  # the adapter folder vLLM loads (adapter_config.json, adapter_model.safetensors)
    ranks: list[int]


@dataclass
class LaunchPlan:
    """What vLLM is started with. `merged` is set in the single-merged-model mode (no base model, no LoRA)."""

    model: Path
    served_name: str
    loras: list[LoraModule] = field(default_factory=list)
    max_lora_rank: int | None = None
    max_loras: int = 0
    merged: str | None = None
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    enforce_eager: bool = False  # skip torch.compile: starts faster, decodes slower (tests)
    # A folder whose generation_config.json lists the stop ids (eos and end of turn; `VLLMEngine.launch` writes
    # it): vLLM's --generation-config, read instead of the model folder's own file (its default, "auto").
    generation_config: Path | None = None

    def argv(self, python: Path | str, host: str = "127.0.0.1", port: int = 8001) -> list[str]:
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", self.served_name, "--dtype", self.dtype, "--host", host, "--port", str(port)]
        if self.loras or self.max_lora_rank:  # LoRA support: adapters now, or room for the registry's later
            cmd += ["--enable-lora"]
            if self.loras:
                cmd += ["--lora-modules", *(f"{m.name}={m.path}" for m in self.loras)]
            cmd += ["--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(max(self.max_loras, 1))]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            cmd += ["--enforce-eager"]
        if self.generation_config is not None:
            cmd += ["--generation-config", str(self.generation_config)]
        return cmd


# A release bundle of train.method classify (release.json `classify`): a LoRA adapter with a trained `score` head in
# modules_to_save, which vLLM's LoRA loading does not take (docs/design.md#vllm); the embedded engine serves it.
CLASSIFY_REFUSAL = ("refused for vLLM: a classification head (train.method classify; its trained `score` layer is a "
                    "module to save, and vLLM's multi-LoRA loads LoRA matrices for generation only); serve it with the "
                    "embedded engine (`tunegate serve` without --engine vllm), which answers with the label")


# A release bundle of a generating candidate that abstains under a confidence threshold (release.json `abstain`,
# eval.abstain, tunegate.evals.abstain): vLLM would answer without the threshold the eval gate measured.
ABSTAIN_REFUSAL = ("refused for vLLM: the eval gate measured this adapter with eval.abstain (answers under a confidence "
                   "threshold become the abstain label), which vLLM does not apply; serve it with the embedded engine "
                   "(`tunegate serve` without --engine vllm)")


def bundle_refusal(release: dict[str, Any]) -> str | None:
    """Why vLLM must not serve this bundle at all, in any form (None: it may, as a LoRA or merged)."""
    if release.get("classify"):
        return CLASSIFY_REFUSAL
    if release.get("abstain"):
        return ABSTAIN_REFUSAL
    return None


def adapter_ranks(adapter_config: dict[str, Any]) -> list[int]:
    """Every LoRA rank in an adapter config: `r` and the values of `rank_pattern`."""
    ranks = {adapter_config.get("r")} | set((adapter_config.get("rank_pattern") or {}).values())
    return sorted(int(r) for r in ranks if r is not None)


def lora_refusals(release: dict[str, Any], adapter_config: dict[str, Any]) -> list[str]:
    """Why vLLM cannot serve this bundle's adapter as a LoRA (cases C15, C16, rank): release.json's own
    record and `release.vllm_compatibility` on the adapter config as it is now (an older bundle may predate
    a check). Empty when it can."""
    from tunegate.release import vllm_compatibility

    recorded = release.get("vllm") or {}
    reasons = list(recorded.get("reasons") or []) if recorded.get("servable_as_lora") is False else []
    if release.get("adapter_type") == "full" and not reasons:
        reasons.append("full fine-tune: a whole model, not a LoRA")
    _, now = vllm_compatibility(adapter_config) if adapter_config else (True, [])
    return list(dict.fromkeys(reasons + now))


def servable_as_lora(bundle: Path, release: dict[str, Any]) -> bool:
    """Whether vLLM can serve the verified bundle folder `bundle`'s adapter as a LoRA (`lora_refusals` is empty, and
    `bundle_refusal` has nothing against the bundle)."""
    if bundle_refusal(release):
        return False
    cfg_path = Path(bundle) / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    return not lora_refusals(release, cfg)


def plan_launch(base_dir: Path | str, base_name: str, adapters: dict[str, tuple[Path, dict[str, Any]]],
                merged: str | None = None, extra_loras: int = 0) -> LaunchPlan:
    """The vLLM launch for a base model and verified bundles.

    Args:
        base_dir: the base model's transformers folder (tunegate.models.resolve_base_model).
        base_name: the base model's name in the API (--served-model-name).
        adapters: adapter name -> (its verified bundle folder, its release.json).
        merged: serve this one adapter's merged model (bundle/merged) instead: no base model, no LoRA.
        extra_loras: room in --max-loras for adapters added at run time.

    Returns:
        The plan; `LaunchPlan.argv` is the command line.

    Raises:
        TunegateError: an adapter vLLM cannot serve as a LoRA (every one listed with its reasons and the
            merged-model alternative), or `merged` names an adapter without a merged model.
    """
    if merged is not None:
        if merged not in adapters:
            raise TunegateError(f"--merged {merged}: not a configured bundle (names: {', '.join(adapters) or 'none'})")
        bundle, release = adapters[merged]
        if bundle_refusal(release):
            raise TunegateError(f"{bundle}: {bundle_refusal(release)}")
        model = bundle / "merged"
        if not (model / "config.json").is_file():
            raise TunegateError(f"{bundle}: no merged model (merged/config.json); release.json vllm: {release.get('vllm')}; "
                                "serve its adapter as a LoRA, or rebuild the bundle without --no-merge")
        return LaunchPlan(model=model, served_name=merged, merged=merged)
    loras, problems = [], []
    for name, (bundle, release) in adapters.items():
        if bundle_refusal(release):
            problems.append(f"{bundle}: {bundle_refusal(release)}")
            continue
        cfg_path = bundle / "adapter" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        reasons = lora_refusals(release, cfg)
        if reasons:
            alt = (f"serve its merged model on a server of its own: tunegate serve PROJECT --engine vllm --merged {name} "
                   f"(vLLM --model {bundle / 'merged'})" if (bundle / "merged" / "config.json").is_file()
                   else "rebuild the bundle with merging (tunegate release, without --no-merge) and serve it with --merged")
            problems.append(f"{bundle}: refused for vLLM multi-LoRA serving: {'; '.join(reasons)}; {alt}")
            continue
        loras.append(LoraModule(name, bundle / "adapter", adapter_ranks(cfg)))
    if problems:
        raise TunegateError("\n".join(problems))
    plan = LaunchPlan(model=Path(base_dir), served_name=base_name, loras=loras)
    if loras:
        from tunegate.release import max_lora_rank_for

        plan.max_lora_rank = max_lora_rank_for([r for m in loras for r in m.ranks] or [8])
        plan.max_loras = len(loras) + extra_loras
    return plan


# vllm-cpu 0.32's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes): a
# model with another head size starts, then fails at its first request ("EngineCore encountered an issue").
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_size_problem(model_dir: Path | str) -> str | None:
    """Why vLLM's CPU attention cannot run this model folder's attention head size; None when it can."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None  # a hub id or an unusual config: vLLM will say
    if head not in CPU_HEAD_SIZES:
        return (f"{model_dir}: attention head size {head} is not one vLLM's CPU backend supports "
                f"({', '.join(map(str, CPU_HEAD_SIZES))}); serve it with --engine embedded")
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now (the OS picks it; another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM runs with: small KV cache, runtime LoRA updates on, usage stats off."""
    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KVCACHE_SPACE_GIB)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # no telemetry by default
    env.setdefault("DO_NOT_TRACK", "1")
    for k in ("PYTHONPATH", "VIRTUAL_ENV"):  # tunegate's environment must not leak into vLLM's
        env.pop(k, None)
    return env


@dataclass
class VLLMProcess:
    """A vLLM api_server subprocess on loopback; its output goes to `log`."""

    proc: subprocess.Popen
    url: str  # ends in /v1
    log: Path

    @classmethod
    def start(cls, argv: list[str], url: str, log: Path, env: dict[str, str], timeout_s: float = 600.0) -> VLLMProcess:
        """Start vLLM and wait until GET /health answers 200.

        Raises:
            TunegateError: it exited or did not answer within `timeout_s` (the message ends with its log's tail).
        """
        import httpx

        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self = cls(proc, url, log)
        deadline = time.monotonic() + timeout_s
        health = url.removesuffix("/v1") + "/health"
        while True:
            if proc.poll() is not None:
                raise TunegateError(f"vLLM exited with status {proc.returncode} while starting; {log} ends:\n{self.tail()}")
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TunegateError(f"vLLM did not answer {health} within {timeout_s:.0f} s; {log} ends:\n{self.tail()}")
            time.sleep(1.0)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: vLLM's engine-core child goes too
            self.proc.wait(timeout=timeout_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=timeout_s)


# ---------------------------------------------------------------- the proxy's generation backend


@dataclass
class VLLMEngine:
    """The generation backend of tunegate's app (tunegate.serve.api.create_app) when vLLM serves; implements
    tunegate.serve.engine.Engine. `complete` forwards to vLLM's /v1/chat/completions. Thread-safe (one pooled
    httpx client); completions take no lock (vLLM batches), adding and removing adapters take `_admin_lock`, one
    at a time: two calls with one name would otherwise both pass the name check and copy into the same folder."""

    url: str  # vLLM's base URL, ends in /v1
    base_name: str
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)
    serves_base: bool = True
    kind: str = "vllm"
    runtime_adapters: bool = True  # vLLM runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING (vllm_env)
    special_tokens: frozenset[str] = frozenset()  # the base tokenizer's control tokens (`launch` reads them)
    # Sent as every request's `stop_token_ids` (vLLM's extra field): eos and the end-of-turn token of the base
    # tokenizer (data.format.stop_token_ids, as the eval stage and the embedded engine stop); `launch` sets them.
    stop_token_ids: list[int] = field(default_factory=list)
    plan: LaunchPlan | None = None
    process: VLLMProcess | None = None
    workdir: Any = None  # TemporaryDirectory holding the verified bundle copies vLLM reads
    project: Any = None
    public_key: Path | None = None
    timeout_s: float = 600.0
    _client: Any = None
    _admin_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def client(self):
        if self._client is None:
            import httpx

            self._client = httpx.Client(base_url=self.url, timeout=self.timeout_s,
                                        limits=httpx.Limits(max_connections=128, max_keepalive_connections=64))
        return self._client

    @classmethod
    def launch(cls, project, venv: Path | None = None, merged: str | None = None, dtype: str = "bfloat16",
               timeout_s: float = 900.0, log: Path | None = None, extra_loras: int = 2,
               max_model_len: int | None = None, enforce_eager: bool = False,
               preload: dict[str, tuple[Path, dict[str, Any]]] | None = None, reserve_lora_rank: int | None = None,
               ) -> VLLMEngine:
        """Verify the configured bundles, plan the launch (C14-C16 preflight) and start vLLM on a private
        loopback port. The bundles are copied to a private folder and verified there; vLLM loads the copies.

        `preload`: registry versions (tunegate.serve.production.registry_copies: slot -> (verified copy, release.json))
        vLLM starts with as LoRAs under their slot names, served under no public name until the switchboard says.
        `reserve_lora_rank`: start with LoRA support up to at least this rank even without an adapter (the
        registry's versions promoted later are loaded at run time; a higher rank needs a restart, C14).

        Raises:
            TunegateError: no vLLM environment, a refused bundle, or vLLM failed to start.
        """
        from tunegate.data.format import special_tokens, stop_token_ids
        from tunegate.models import load_tokenizer, resolve_base_model, write_stop_tokens

        python = find_vllm_python(venv)
        serve = project.serve
        from tunegate.release import public_key_for

        public_key = public_key_for(project)  # serve.public_key, else the project-local key
        base_name = base_model_name(project)
        workdir = tempfile.TemporaryDirectory(prefix="tunegate-vllm-")
        copies = Path(workdir.name) / "bundles"  # vLLM reads the verified copy of each bundle: copies/NAME
        try:
            verified = verify_bundles(project, list(serve.bundles if serve else []), public_key, copies)
            try:
                plan = plan_launch(resolve_base_model(project.base_model), base_name,
                                   {**{n: (copies / n, a.release) for n, a in verified.items()}, **(preload or {})},
                                   merged, extra_loras)
            except TunegateError as exc:  # name the configured bundle, not the private copy
                msg = str(exc)
                for n, a in verified.items():
                    msg = msg.replace(str(copies / n), str(a.bundle))
                raise TunegateError(msg) from None
            plan.dtype, plan.max_model_len, plan.enforce_eager = dtype, max_model_len, enforce_eager
            if reserve_lora_rank and merged is None:
                from tunegate.release import max_lora_rank_for

                plan.max_lora_rank = max(plan.max_lora_rank or 0, max_lora_rank_for([reserve_lora_rank]))
                plan.max_loras = max(plan.max_loras, len(plan.loras) + extra_loras)
            # vLLM renders the chat template itself: the app refuses text spelling a control token before forwarding
            tokenizer = load_tokenizer(resolve_base_model(project.base_model))
            specials = special_tokens(tokenizer)
            # vLLM stops at the eos ids of the generation config it reads (--generation-config auto: the model
            # folder's). The base model's lists only its tokenizer's eos, which need not be the end-of-turn token:
            # vLLM reads a copy that lists both, for every client (the smoke test too); requests carry them as well.
            stops = stop_token_ids(tokenizer)
            plan.generation_config = Path(workdir.name) / "generation"
            write_stop_tokens(plan.generation_config, stops, tokenizer.pad_token_id, source=plan.model)
            problem = head_size_problem(plan.model)
            if problem:
                raise TunegateError(problem)
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1"
            argv = plan.argv(python, "127.0.0.1", port)
            log = log or Path(workdir.name) / "vllm.log"
            print("tunegate serve: starting vLLM: " + " ".join(argv), flush=True)
            print(f"  (log: {log})", flush=True)
            process = VLLMProcess.start(argv, url, log, vllm_env(), timeout_s)
        except BaseException:
            workdir.cleanup()
            raise
        served = {n: a for n, a in verified.items() if merged is None or n == merged}
        return cls(url=url, base_name=base_name, adapters=served, serves_base=merged is None, plan=plan,
                   process=process, workdir=workdir, project=project, public_key=public_key, timeout_s=timeout_s,
                   special_tokens=specials, stop_token_ids=stops)

    def upstream_model(self, adapter: str | None) -> str:
        """vLLM's model name for `adapter` (None: the base model). Raises ApiError 404: no base model served."""
        if adapter is None:
            if not self.serves_base:
                raise ApiError(404, f"this server serves the merged model {self.plan.merged if self.plan else '?'} "
                               "only, not the base model", "invalid_request_error", "model_not_found")
            return self.base_name
        return adapter

    def complete(self, adapter: str | None, messages: list[dict[str, str]], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, *, fit_max_tokens: bool = False, timeout_s: float | None = None,
                 cancel: threading.Event | None = None) -> Completion:
        """Forward one chat completion to vLLM. Returns tunegate.serve.engine.Completion.

        vLLM checks the context window itself (a prompt + max_tokens over it is its 400, passed on; `fit_max_tokens`
        is not used). `timeout_s` bounds the forwarded request (httpx's connect, write and read timeouts: vLLM sends
        a non-streamed answer in one piece, so the read timeout is the answer's). `cancel` set: refused with 503.

        Raises:
            tunegate.serve.engine.ApiError: 502 when vLLM is unreachable or fails, 504 when it does not answer within
                `timeout_s`, 400 when it refuses the request, 503 when `cancel` is set.
        """
        import httpx

        if cancel is not None and cancel.is_set():
            raise shutting_down_error()

        body: dict[str, Any] = {"model": self.upstream_model(adapter), "messages": messages,
                                "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = stop
        if self.stop_token_ids:  # vLLM's extra field: end the answer at the end-of-turn token whatever the model's eos
            body["stop_token_ids"] = list(self.stop_token_ids)
        try:
            r = self.client.post("/chat/completions", json=body,
                                 **({"timeout": timeout_s} if timeout_s is not None else {}))
        except httpx.TimeoutException:
            raise ApiError(504, f"the vLLM engine did not answer within {timeout_s or self.timeout_s:g} s "
                           "(serve.request_timeout_s)",
                           "api_error", "upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise ApiError(502, f"the vLLM engine is unreachable ({type(exc).__name__})", "api_error", "upstream_unavailable") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("error", {}).get("message") or r.text[:500]
            except ValueError:
                detail = r.text[:500]
            if r.status_code == 400:
                raise ApiError(400, f"the engine refused the request: {detail}", code="upstream_invalid_request")
            raise ApiError(502, f"the vLLM engine failed (HTTP {r.status_code}): {detail}", "api_error", "upstream_error")
        out = r.json()
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Completion(choice["message"].get("content") or "", choice.get("finish_reason") or "stop",
                          int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    # ------------------------------------------------------------ runtime adapters

    def add_adapter(self, name: str, bundle: Path) -> dict[str, Any]:
        """Verify a bundle (as at launch) and load its adapter into the running vLLM under `name`.

        Raises:
            TunegateError: the name is taken, the bundle is refused (signature, verdict, base model, C15/C16),
                its rank is above the server's --max-lora-rank (restart needed), or vLLM refused it.
        """
        with self._admin_lock:
            return self._add_adapter(name, bundle)

    def _add_adapter(self, name: str, bundle: Path) -> dict[str, Any]:
        check_identifier("adapter name", name)  # it names the verified copy's folder below
        if name in self.adapters or name == self.base_name:
            raise TunegateError(f"adapter name {name}: already served; remove it first or pick another name")
        self._require_lora()
        copy = Path(self.workdir.name) / "bundles" / name
        if copy.exists():
            shutil.rmtree(copy)
        try:
            release = copy_verified(Path(bundle), copy, self.public_key, self.project)
            self._load_lora(name, copy, release)
        except NotServable as exc:
            shutil.rmtree(copy, ignore_errors=True)
            raise TunegateError(f"{bundle}: {exc}") from None
        except TunegateError as exc:
            shutil.rmtree(copy, ignore_errors=True)
            raise TunegateError(str(exc).replace(str(copy), str(bundle))) from None
        except BaseException:
            shutil.rmtree(copy, ignore_errors=True)
            raise
        self.adapters[name] = ServedAdapter(name, Path(bundle), release)
        return release

    def _require_lora(self) -> None:
        """Raises NotServable: this server loads no LoRA adapters (started with --merged, or without LoRA support)."""
        if self.plan is not None and self.plan.merged is not None:
            raise NotServable(f"this vLLM server serves the merged model {self.plan.merged} only (--merged) and loads "
                              "no LoRA adapters; serve it from a server started without --merged")
        if self.plan is None or not self.plan.max_lora_rank:
            raise NotServable("this vLLM server was started without LoRA support (no adapters); "
                              "restart it with the adapter in serve.bundles")

    def _load_lora(self, name: str, copy: Path, release: dict[str, Any]) -> None:
        """Post the adapter of the verified bundle folder `copy` to vLLM as LoRA `name` (C15/C16, C14 checked first)."""
        self._require_lora()
        if bundle_refusal(release):
            raise NotServable(bundle_refusal(release))
        cfg = json.loads((copy / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        reasons = lora_refusals(release, cfg)
        if reasons:
            raise NotServable(f"refused for vLLM multi-LoRA serving: {'; '.join(reasons)}; vLLM serves it only merged, "
                              "on a server of its own (tunegate serve --engine vllm --merged)")
        top = max(adapter_ranks(cfg) or [0])
        if top > (self.plan.max_lora_rank or 0):
            raise NotServable(f"rank {top} is above this server's --max-lora-rank {self.plan.max_lora_rank} "
                              "(case C14); add the bundle to serve.bundles and restart the server")
        r = self.client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(copy / "adapter")})
        if r.status_code >= 400:
            raise TunegateError(f"{copy}: vLLM refused the adapter (HTTP {r.status_code}): {r.text[:500]}")

    def load_slot(self, slot: str, bundle: Path, release: dict[str, Any]) -> None:
        """Load the adapter of the verified bundle folder `bundle` into vLLM as LoRA `slot`, serving no public name
        yet (tunegate.serve.production switches names to it). A slot vLLM launched with is already loaded.

        Raises:
            NotServable: refused for multi-LoRA serving (DoRA, added tokens, ...), a rank above --max-lora-rank, or
                a server started with --merged.
            TunegateError: vLLM refused it.
        """
        with self._admin_lock:
            if self.plan is not None and any(m.name == slot for m in self.plan.loras):
                return
            self._load_lora(slot, Path(bundle), release)

    def unload_slot(self, slot: str) -> None:
        """Unload LoRA `slot` from vLLM. Raises TunegateError: vLLM refused."""
        with self._admin_lock:
            r = self.client.post("/unload_lora_adapter", json={"lora_name": slot})
            if r.status_code >= 400:
                raise TunegateError(f"adapter {slot}: vLLM refused to unload it (HTTP {r.status_code}): {r.text[:500]}")
            if self.plan is not None:
                self.plan.loras = [m for m in self.plan.loras if m.name != slot]

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter from the running vLLM. Raises TunegateError: not served, or vLLM refused."""
        with self._admin_lock:
            self._remove_adapter(name)

    def _remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise TunegateError(f"adapter {name}: not served here (served: {', '.join(self.adapters) or 'none'})")
        if self.plan is not None and self.plan.merged == name:
            raise TunegateError(f"adapter {name}: it is this server's merged model; stop the server instead")
        r = self.client.post("/unload_lora_adapter", json={"lora_name": name})
        if r.status_code >= 400:
            raise TunegateError(f"adapter {name}: vLLM refused to unload it (HTTP {r.status_code}): {r.text[:500]}")
        del self.adapters[name]

    def close(self) -> None:
        """Close the HTTP client, stop vLLM and delete the verified bundle copies."""
        if self._client is not None:
            self._client.close()
        if self.process is not None:
            self.process.stop()
        if self.workdir is not None:
            self.workdir.cleanup()


# ---------------------------------------------------------------- the admin file


def write_admin_file(project, url: str, token: str, engine_url: str | None = None) -> Path:
    """The running proxy's URL, admin token and vLLM's private URL (for `tunegate serve-adapters` and
    `serve-smoke`), mode 0600."""
    path = Path(project.root) / ADMIN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "admin_token": token, "engine_url": engine_url, "pid": os.getpid()}, f)
    return path


def read_admin_file(project) -> dict[str, Any]:
    """What `write_admin_file` wrote for the running server. Raises TunegateError: no server is running."""
    path = Path(project.root) / ADMIN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TunegateError(f"{path}: not found; start the server first: tunegate serve PROJECT --engine vllm") from None
