"""The embedded serving engine: an OpenAI-compatible HTTP API over one base model and its release bundles' adapters.

`tunegate serve PROJECT --engine embedded` (FastAPI + uvicorn + transformers/PEFT) is the engine for a
laptop, a test, or a small internal endpoint; production throughput is vLLM's (continuous batching,
multi-LoRA kernels): `--engine vllm` (tunegate.vllm_engine) runs vLLM on a private loopback port and this
same app in front of it, so the API, keys, traces and feedback store are the same. The generation backend
is pluggable: anything with `base_name`, `adapters` and `complete(...) -> Completion` (EmbeddedEngine here,
VLLMEngine forwarding to vLLM); a backend with `add_adapter`/`remove_adapter` gets the admin endpoints.

Endpoints (tenants authenticate with `Authorization: Bearer KEY`, see `tunegate tenants add`):
  GET  /health               no key; liveness, the engine and how many adapters are loaded (no names)
  GET  /v1/models            the models this key may use: the base model (when granted) and its adapters
  POST /v1/chat/completions  OpenAI chat completions; `model` is an adapter name or the base model's name.
                             The response `id` is the trace id; the request and the answer are stored as a
                             trace (tunegate.servedb). `stream: true` sends the whole answer as one chunk.
  POST /v1/feedback          {trace_id, rating: "up"|"down", edited_answer?}; optional `Idempotency-Key`
                             header (see tunegate.servedb for the exactly-once rules). 201 new, 200 replay,
                             404 unknown trace or another tenant's, 409 key reused with a different body.
  POST   /admin/adapters        {path, name?}: verify a bundle and load its adapter at run time (vLLM engine)
  DELETE /admin/adapters/NAME   unload it. Both need `Authorization: Bearer ADMIN_TOKEN` (the token tunegate
                                serve writes to <project>/.tunegate-serve.json, mode 0600; not a tenant key).
Errors use OpenAI's shape, {"error": {"message", "type", "code"}}: 401 unknown, missing or revoked key;
403 a model the key is not granted; 404 a granted adapter that is not loaded; 400 an invalid request;
502 the vLLM engine behind the app failed or is unreachable.

Which adapters load: only from release bundles (tunegate.release) whose signature verifies with
`serve.public_key` and whose release.json verdict is PASS, trained on this server's base model. Each bundle
is copied to a private temporary folder, verified there and loaded from there, so the bytes that were
verified are the bytes that are loaded. One refused bundle stops the server from starting, naming the
bundle and the reason: a tenant would otherwise be answered by something other than what was released.

Concurrency: one base model is loaded once, every adapter is attached to it by name (PeftModel.load_adapter),
and each request selects its adapter (set_adapter, or disable_adapter for the base model). The active adapter
is state of the one shared model, and transformers' generate is not thread-safe, so generation runs under one
lock: requests are answered one at a time, in arrival order, while authentication, validation and the
database writes of other requests (traces, feedback) go on beside it. This trades throughput for
simplicity; vLLM batches requests for different adapters together.
"""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from tunegate import TunegateError, servedb

ENGINES = ("embedded", "vllm")


# ---------------------------------------------------------------- bundles

@dataclass
class ServedAdapter:
    name: str
    bundle: Path
    release: dict[str, Any]


def bundle_name(b) -> str:
    """A configured bundle's (config.BundleConfig) adapter name: its `name`, else the bundle folder's name."""
    return b.name or Path(b.path).name


def base_model_name(project) -> str:
    """The base model's name in the API: the configured name, or a local folder's name."""
    name = project.base_model
    if name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve().name
    return name


def _same_base(recorded: Any, project) -> bool:
    if not recorded:
        return False
    if str(recorded) == project.base_model:
        return True
    try:
        a, b = Path(str(recorded)).expanduser(), Path(project.base_model).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def check_bundle(bundle_dir: Path, public_key: Path | None, project) -> dict[str, Any]:
    """Why a bundle may not be served, as a TunegateError; its release.json when it may.

    Refused: no public key configured; no bundle folder, release.json or adapter; no model.sig (unsigned);
    a signature that does not verify or a changed file (tunegate.release.verify_bundle names it); a verdict
    other than PASS (ungated); an adapter trained on another base model.
    """
    bundle_dir = Path(bundle_dir)
    if public_key is None:
        raise TunegateError(f"{bundle_dir}: refused: serve.public_key is not set, and unsigned adapters are never served")
    if not Path(public_key).is_file():
        raise TunegateError(f"{bundle_dir}: refused: serve.public_key {public_key} not found")
    if not bundle_dir.is_dir():
        raise TunegateError(f"{bundle_dir}: refused: no such bundle folder")
    if not (bundle_dir / "release.json").is_file():
        raise TunegateError(f"{bundle_dir}: refused: no release.json (not a release bundle; make one with the release stage)")
    if not (bundle_dir / "model.sig").is_file():
        raise TunegateError(f"{bundle_dir}: refused: unsigned (no model.sig)")
    if not (bundle_dir / "adapter" / "adapter_config.json").is_file():
        raise TunegateError(f"{bundle_dir}: refused: no adapter/adapter_config.json in the bundle")
    from tunegate.release import verify_bundle

    try:
        release = verify_bundle(bundle_dir, Path(public_key))
    except TunegateError as exc:
        raise TunegateError(f"{bundle_dir}: refused: signature check failed: {exc}") from None
    verdict = release.get("verdict")
    if verdict != "PASS":
        raise TunegateError(f"{bundle_dir}: refused: ungated: release.json verdict is {verdict!r}, not PASS")
    if not _same_base(release.get("base_model"), project):
        raise TunegateError(f"{bundle_dir}: refused: the adapter was trained on base model {release.get('base_model')!r}, "
                            f"this server serves {project.base_model!r}")
    return release


# ---------------------------------------------------------------- the model

@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] | None = None  # the answer's token ids up to end of turn (embedded engine; smoke test)


@dataclass
class EmbeddedEngine:
    """The base model with every adapter attached by name; `complete` is serialised by `lock`."""

    model: Any
    tokenizer: Any
    base_name: str
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, project, bundles: list | None = None, public_key: Path | None = None) -> "EmbeddedEngine":
        """Load the base model once and attach each bundle's adapter under its name.

        Raises:
            TunegateError: a bundle is refused (every refusal is listed), or two bundles share a name.
        """
        import shutil
        import tempfile

        from tunegate.models import (
            load_inference_model,
            load_tokenizer,
            resolve_base_model,
        )

        serve = project.serve
        bundles = list(serve.bundles if serve and bundles is None else bundles or [])
        public_key = public_key if public_key is not None else (serve.public_key if serve else None)
        names = [bundle_name(b) for b in bundles]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TunegateError(f"serve.bundles: adapter name(s) {', '.join(dup)} used twice; give each bundle a `name`")
        base_name = base_model_name(project)
        if base_name in names:
            raise TunegateError(f"serve.bundles: adapter name {base_name} is the base model's name; give the bundle another `name`")
        adapters: dict[str, ServedAdapter] = {}
        problems = []
        with tempfile.TemporaryDirectory(prefix="tunegate-serve-") as tmp:
            for b, name in zip(bundles, names):  # every bundle is checked before the model loads: fail fast
                copy = Path(tmp) / name
                try:
                    if not Path(b.path).is_dir():
                        raise TunegateError(f"{b.path}: refused: no such bundle folder")
                    shutil.copytree(b.path, copy, symlinks=True)  # verify and load the same bytes; a link stays a link
                    adapters[name] = ServedAdapter(name, Path(b.path), check_bundle(copy, public_key, project))
                except TunegateError as exc:
                    problems.append(str(exc).replace(str(copy), str(b.path)))
            if problems:
                raise TunegateError("\n".join(problems))
            path = resolve_base_model(project.base_model)
            tokenizer = load_tokenizer(path)
            model = load_inference_model(path)
            for name in adapters:
                model = _attach(model, Path(tmp) / name / "adapter", name)
        return cls(model=model, tokenizer=tokenizer, base_name=base_name, adapters=adapters)

    def resolve(self, model_name: str) -> str | None:
        """The adapter a request's `model` names (None: the base model). Raises KeyError when unknown."""
        if model_name in self.adapters:
            return model_name
        if model_name == self.base_name:
            return None
        raise KeyError(model_name)

    def complete(self, adapter: str | None, messages: list[dict[str, str]], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None) -> Completion:
        """Generate one answer with `adapter` (None: the base model). Serialised: see the module docstring."""
        import contextlib

        import torch

        with self.lock:
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            input_ids = enc["input_ids"].to(self.model.device)  # (1, T)
            attention = enc["attention_mask"].to(self.model.device)
            if seed is not None:
                torch.manual_seed(seed)
            sampling = temperature > 0
            # The same stop tokens as the eval stage (tunegate.evals.generate): end of turn and eos.
            from tunegate.data.format import end_token_id

            stop_ids = sorted({end_token_id(self.tokenizer), self.tokenizer.eos_token_id})
            kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sampling,
                      "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": stop_ids}
            if sampling:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if adapter is None:
                ctx = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
            else:
                self.model.set_adapter(adapter)
                ctx = contextlib.nullcontext()
            with ctx, torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            new = out[0, input_ids.shape[1]:].tolist()  # (N,) generated token ids; one sequence: no padding
        n_generated = len(new)
        finish = "length"
        ends = [i for i, t in enumerate(new) if t in stop_ids]
        if ends:
            new = new[: ends[0]]
            finish = "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in stop or []:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return Completion(text, finish, int(input_ids.shape[1]), n_generated, new)


def _attach(model, adapter_dir: Path, name: str):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=False).eval()


# ---------------------------------------------------------------- the HTTP API

class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields it does not use (user, logprobs, ...) are ignored."""

    model: str
    messages: list[Any] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)  # one answer per request (each answer is one trace)


class FeedbackRequest(BaseModel):
    trace_id: str = Field(min_length=1, max_length=64)
    rating: Literal["up", "down"]
    edited_answer: str | None = Field(default=None, max_length=100_000)


class AdapterRequest(BaseModel):
    path: str = Field(min_length=1)  # a release bundle folder, on the server's file system
    name: str | None = None  # the adapter's model name; default: the bundle folder's name


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def create_app(project, engine: Any = None, database_url: str | None = None, admin_token: str | None = None):
    """The FastAPI app. `engine` (the generation backend) defaults to EmbeddedEngine.load(project) (a refused
    bundle raises TunegateError); `admin_token` opens /admin/adapters when the engine can add adapters."""
    from fastapi import Depends, FastAPI, Header
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from tunegate import __version__
    from tunegate.data.records import normalize_messages, RowError

    engine = engine or EmbeddedEngine.load(project)
    db = servedb.connect(database_url or servedb.project_url(project))
    serve = project.serve
    feedback_on = serve.feedback if serve is not None else True
    max_cap = serve.max_new_tokens if serve is not None else 256
    app = FastAPI(title="tunegate", version=__version__, docs_url=None, redoc_url=None)
    app.state.engine, app.state.db = engine, db

    @app.exception_handler(ApiError)
    def _api_error(_req, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": {"message": exc.message, "type": exc.type, "code": exc.code}},
                            status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(_req, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"message": detail, "type": "invalid_request_error", "code": None}}, status_code=400)

    def tenant(authorization: Annotated[str | None, Header()] = None) -> servedb.Tenant:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", "authentication_error", "missing_api_key")
        found = servedb.tenant_for_key(db, key.strip())
        if found is None:
            raise ApiError(401, "invalid or revoked API key", "authentication_error", "invalid_api_key")
        return found

    def model_card(name: str, parent: str | None) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "tunegate", "root": name, "parent": parent}

    @app.get("/health")
    def health():
        # No key: liveness and the engine only. Adapter names stay private (a tenant's key lists its own in /v1/models).
        return {"status": "ok", "engine": getattr(engine, "kind", "embedded"), "adapters_loaded": len(engine.adapters)}

    @app.get("/v1/models")
    def models(t: Annotated[servedb.Tenant, Depends(tenant)]):
        cards = [model_card(engine.base_name, None)] if t.allow_base and getattr(engine, "serves_base", True) else []
        cards += [model_card(n, engine.base_name) for n in engine.adapters if n in t.adapters]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest, t: Annotated[servedb.Tenant, Depends(tenant)]):
        started = time.perf_counter()
        adapter = None if body.model == engine.base_name else body.model
        if not t.may_use(adapter):  # 403 whether or not the model exists: another tenant's names stay private
            raise ApiError(403, f"this API key may not use model {body.model!r}", "permission_error", "model_not_allowed")
        if (adapter is not None and adapter not in engine.adapters) or (adapter is None and not getattr(engine, "serves_base", True)):
            raise ApiError(404, f"model {body.model!r} is not loaded on this server", "invalid_request_error", "model_not_found")
        try:
            messages = normalize_messages(body.messages, require_final_assistant=False)
        except RowError as exc:
            raise ApiError(400, f"messages: {exc.rule}: {exc.detail}", code=exc.rule) from None
        if messages[-1]["role"] != "user":
            raise ApiError(400, "messages: the last message must be a user turn", code="role_order")
        max_new = min(body.max_completion_tokens or body.max_tokens or max_cap, max_cap)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        out = engine.complete(adapter, messages, max_new, body.temperature, body.top_p, body.seed, stop)
        latency_ms = (time.perf_counter() - started) * 1000
        trace_id = servedb.new_trace_id()
        served = engine.adapters.get(adapter) if adapter else None  # may have been removed meanwhile (admin)
        release = served.release if served else {}
        servedb.write_trace(
            db, id=trace_id, tenant=t.name, model=body.model, adapter=adapter,
            adapter_sha256=release.get("adapter_sha256"), messages=messages,
            params={"max_tokens": max_new, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                    "stop": stop, "stream": body.stream},
            response=out.text, finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens, latency_ms=latency_ms,
        )
        created = int(time.time())
        usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                 "total_tokens": out.prompt_tokens + out.completion_tokens}
        headers = {"X-Trace-Id": trace_id}
        if body.stream:
            import json

            def events():
                base = {"id": trace_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
                first = {"index": 0, "delta": {"role": "assistant", "content": out.text}, "finish_reason": None}
                last = {"index": 0, "delta": {}, "finish_reason": out.finish_reason}
                yield f"data: {json.dumps({**base, 'choices': [first]})}\n\n"
                yield f"data: {json.dumps({**base, 'choices': [last], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        return JSONResponse({
            "id": trace_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": out.finish_reason}],
            "usage": usage,
        }, headers=headers)

    @app.post("/v1/feedback")
    def feedback(body: FeedbackRequest, t: Annotated[servedb.Tenant, Depends(tenant)],
                 idempotency_key: Annotated[str | None, Header(max_length=255)] = None):
        if not feedback_on:
            raise ApiError(403, "feedback capture is off on this server (serve.feedback: false)", "permission_error",
                           "feedback_disabled")
        if body.edited_answer is not None and not body.edited_answer.strip():
            raise ApiError(400, "edited_answer is empty: leave it out for a plain thumbs rating", code="empty_turn")
        trace = servedb.get_trace(db, body.trace_id)
        if trace is None or trace["tenant"] != t.name:  # another tenant's trace looks like no trace at all
            raise ApiError(404, f"no trace {body.trace_id!r} for this API key", "invalid_request_error", "trace_not_found")
        try:
            row, replayed = servedb.record_feedback(db, t.name, body.trace_id, body.rating, body.edited_answer, idempotency_key)
        except servedb.FeedbackConflict as exc:
            raise ApiError(409, str(exc), "invalid_request_error", "idempotency_key_reused") from None
        return JSONResponse({"id": row["id"], "object": "feedback", "trace_id": row["trace_id"], "rating": row["rating"],
                             "replayed": replayed}, status_code=200 if replayed else 201)

    if admin_token and hasattr(engine, "add_adapter"):
        import hmac

        def admin(authorization: Annotated[str | None, Header()] = None) -> None:
            scheme, _, key = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), admin_token.encode()):
                raise ApiError(401, "admin endpoints need the server's admin token", "authentication_error", "invalid_admin_token")

        @app.post("/admin/adapters", dependencies=[Depends(admin)])
        def add_adapter(body: AdapterRequest):
            from tunegate.config import BundleConfig

            name = body.name or Path(body.path).name
            try:
                BundleConfig(path=Path(body.path), name=name)  # the same name rule as serve.bundles
                release = engine.add_adapter(name, Path(body.path))
            except (TunegateError, ValueError) as exc:
                raise ApiError(400, str(exc), code="adapter_refused") from None
            return JSONResponse({"name": name, "run_id": release.get("run_id"), "adapter_sha256": release.get("adapter_sha256")},
                                status_code=201)

        @app.delete("/admin/adapters/{name}", dependencies=[Depends(admin)])
        def remove_adapter(name: str):
            if name not in engine.adapters:
                raise ApiError(404, f"adapter {name!r} is not served here", code="model_not_found")
            try:
                engine.remove_adapter(name)
            except TunegateError as exc:
                raise ApiError(400, str(exc), code="adapter_refused") from None
            return {"name": name, "removed": True}

    return app


# ---------------------------------------------------------------- running it

def serve(project, engine: str = "embedded", host: str | None = None, port: int | None = None, *,
          vllm_venv: Path | None = None, merged: str | None = None, smoke: bool = True, dtype: str = "bfloat16",
          match_tokens: int | None = None, max_rank: int | None = None, enforce_eager: bool = False) -> None:
    """Start the server in the foreground until interrupted.

    With `engine="vllm"` (tunegate.vllm_engine): vLLM starts on a private loopback port from the verified
    bundles (preflight C14-C16; `merged` serves one bundle's merged model alone), the smoke test (C17) runs
    against it unless `smoke` is False, then this app answers tenants in front of it.

    Raises:
        TunegateError: an unknown engine, a refused bundle, no vLLM environment, vLLM failed to start, or the
            smoke test failed (the message names the adapter and the prompt).
    """
    if engine not in ENGINES:
        raise TunegateError(f"--engine {engine}: unknown; engines: {', '.join(ENGINES)}")
    import uvicorn

    cfg = project.serve
    host = host or (cfg.host if cfg else "127.0.0.1")
    port = port if port is not None else (cfg.port if cfg else 8000)
    if engine == "embedded":
        app = create_app(project)
        loaded = app.state.engine.adapters
        print(f"tunegate serve: base model {app.state.engine.base_name}, adapters: {', '.join(loaded) or '(none)'}; "
              f"database {servedb.project_url(project).split('://')[0]}; http://{host}:{port}/v1", flush=True)
        uvicorn.run(app, host=host, port=port, workers=1, log_level="info")
        return
    import secrets

    from tunegate import vllm_engine

    backend = vllm_engine.VLLMEngine.launch(project, venv=vllm_venv, merged=merged, dtype=dtype, enforce_eager=enforce_eager)
    admin_file = None
    try:
        if smoke:
            if max_rank is None and match_tokens is None and dtype != "float32":
                max_rank = vllm_engine.BF16_MAX_RANK  # bf16 vs the fp32 reference: see BF16_MAX_RANK
            models = [None] if backend.serves_base else []
            report = vllm_engine.run_smoke(project, backend.url, models + list(backend.adapters),
                                           base_served=backend.serves_base, match_tokens=match_tokens,
                                           base_name=backend.base_name, max_rank=max_rank)
            print(vllm_engine.format_smoke(report), flush=True)
            if not report["passed"]:
                raise TunegateError("the serving smoke test failed (case C17); not serving:\n  " + "\n  ".join(report["failures"]))
        token = secrets.token_urlsafe(32)
        app = create_app(project, engine=backend, admin_token=token)
        admin_file = vllm_engine.write_admin_file(project, f"http://{host}:{port}", token, backend.url)
        print(f"tunegate serve: vLLM ({backend.url}, private) serving {'merged model ' + merged if merged else 'base model ' + backend.base_name}"
              f", adapters: {', '.join(backend.adapters) or '(none)'}; database {servedb.project_url(project).split('://')[0]}; "
              f"http://{host}:{port}/v1; admin token in {admin_file}", flush=True)
        uvicorn.run(app, host=host, port=port, workers=1, log_level="info")
    finally:
        if admin_file is not None:
            admin_file.unlink(missing_ok=True)
        backend.close()


@dataclass
class BackgroundServer:
    """A uvicorn server on a thread (tests, bench/serve_load.py). `url` ends in /v1."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_background(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0) -> BackgroundServer:
    """Run `app` with uvicorn on a daemon thread; port 0 picks a free port. Returns once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", workers=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise TunegateError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return BackgroundServer(server, thread, f"http://{host}:{bound}/v1")
