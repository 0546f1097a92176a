"""The serving API: an OpenAI-compatible HTTP API over one base model and its release bundles' adapters.

`tunegate serve PROJECT --engine embedded` (FastAPI + uvicorn + transformers/PEFT) is the engine for a
laptop, a test, or a small internal endpoint; production throughput is vLLM's (continuous batching,
multi-LoRA kernels): `--engine vllm` (tunegate.serve.vllm) runs vLLM on a private loopback port and this
same app in front of it, so the API, keys, traces and feedback store are the same. The generation backend
is a tunegate.serve.engine.Engine (EmbeddedEngine, or VLLMEngine forwarding to vLLM); an engine with
`runtime_adapters` gets the admin endpoints.

Endpoints (tenants authenticate with `Authorization: Bearer KEY`, see `tunegate tenants add`):
  GET  /health               no key; liveness, the engine and how many adapters are loaded (no names)
  GET  /v1/models            the models this key may use: the base model (when granted) and its adapters
  POST /v1/chat/completions  OpenAI chat completions; `model` is an adapter name or the base model's name.
                             The response `id` is the trace id; the request and the answer are stored as a
                             trace (tunegate.serve.db). `stream: true` sends the whole answer as one chunk.
  POST /v1/feedback          {trace_id, rating: "up"|"down", edited_answer?}; optional `Idempotency-Key`
                             header (see tunegate.serve.db for the exactly-once rules). 201 new, 200 replay,
                             404 unknown trace or another tenant's, 409 key reused with a different body.
  POST   /admin/adapters        {path, name?}: verify a bundle and load its adapter at run time (vLLM engine)
  DELETE /admin/adapters/NAME   unload it. Both need `Authorization: Bearer ADMIN_TOKEN` (the token tunegate
                                serve writes to <project>/.tunegate-serve.json, mode 0600; not a tenant key).
Errors use OpenAI's shape, {"error": {"message", "type", "code"}}, and never carry a traceback:
  400  an invalid request; the message names the field (`seed: ...`, `stop: ...`); `context_length_exceeded`:
       the messages, or messages + max_tokens, do not fit the model's context window (both numbers given)
  401  unknown, missing or revoked key          403  a model the key is not granted
  404  a granted adapter that is not loaded, or an unknown path
  413  `request_too_large`: a body over serve.max_request_bytes (refused before it is parsed)
  500  `internal_error`: a bug; the traceback goes to the server's log only
  502  the vLLM engine behind the app failed or is unreachable
  503  `server_busy`: the embedded engine could not start the request within serve.request_timeout_s;
       `server_shutting_down`: SIGTERM was received. Both with Retry-After.
  504  `request_timeout`: the embedded engine could not read the prompt before the deadline (a long prompt is
       read in chunks, the deadline checked between them); `upstream_timeout`: vLLM did not answer in time

Limits (issue 23): request bodies are bounded (`BodyLimit`, serve.max_request_bytes), and so are the fields
(`ChatRequest`: at most MAX_MESSAGES messages, MAX_STOP stop strings of MAX_STOP_CHARS, 0 <= seed < 2**63, ...).
A chat completion is answered within serve.request_timeout_s (tunegate.serve.engine: the embedded engine's
lock is waited for with that deadline, and reading the prompt and generating stop at it; an answer cut short
ends with finish_reason "length"). `serve` shuts down on SIGTERM or SIGINT (`shutdown_aware_server`): no new
connections; for serve.shutdown_grace_s answers go on (a request waiting for the lock may still take it), then
the answer in flight is cut short, requests still waiting get 503, and the process exits 0.

Which adapters load: only from verified release bundles (tunegate.serve.bundles); one refused bundle stops
the server from starting, naming the bundle and the reason: a tenant would otherwise be answered by
something other than what was released. Besides serve.bundles, the registry's production version is served
under the project's name and each version in serve.versions as NAME-vN (tunegate.serve.production: a watcher
switches them while the server runs, after `tunegate promote` / `rollback`; 404 while there is no production
version). Every chat completion says what answered: `X-Tunegate-Adapter-Version` (NAME-vN, a bundle's name, or
`base`) and `X-Tunegate-Adapter-Sha256` (the adapter weights' sha256; absent for the base model); the trace
stores the same label (column `version`).

Each endpoint is a function of this module; `create_app` wires them to one engine and one serving database
(`app.state.engine`, `app.state.db`, `app.state.settings`).
"""

import json
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunegate import TunegateError, __version__
from tunegate.serve import db as servedb
from tunegate.serve.engine import ApiError, Completion, EmbeddedEngine, Engine, busy_error
from tunegate.serve.production import Switchboard

ENGINES = ("embedded", "vllm")
MAX_MESSAGES = 2048  # OpenAI's limit on `messages`
MAX_STOP = 4  # OpenAI's limit on `stop` strings
MAX_STOP_CHARS = 256  # each stop string
MAX_MODEL_CHARS = 256  # `model`: an adapter name (at most 128, core.paths.IDENTIFIER) or the base model's name
SEED_LIMIT = 2**63  # `seed`: 0 <= seed < 2**63, a non-negative int64 (OpenAI's seed is an int64; torch takes < 2**64)
SHUTDOWN_MARGIN_S = 2.0  # uvicorn waits this long past serve.shutdown_grace_s for the cut-short answers to be sent


# ---------------------------------------------------------------- requests and settings

class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields it does not use (user, logprobs, ...) are ignored. Every field
    the engine reads is bounded here, so a value the engine could fail on is a 400 naming the field."""

    model_config = ConfigDict(allow_inf_nan=False)  # Python's json reads NaN and Infinity; NaN passes ge/le checks

    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    messages: list[Any] = Field(min_length=1, max_length=MAX_MESSAGES)  # each one checked by _chat_messages
    max_tokens: int | None = Field(default=None, ge=1, strict=True)  # capped by serve.max_new_tokens; true is not 1
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default; 0 (below 1e-5) is greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT, strict=True)
    stop: (Annotated[str, Field(max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
           | None) = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, strict=True)  # one answer per request (each answer is one trace)


class FeedbackRequest(BaseModel):
    trace_id: str = Field(min_length=1, max_length=64)
    rating: Literal["up", "down"]
    edited_answer: str | None = Field(default=None, max_length=100_000)


class AdapterRequest(BaseModel):
    path: str = Field(min_length=1, max_length=4096)  # a release bundle folder, on the server's file system
    name: str | None = Field(default=None, max_length=128)  # the adapter's model name; default: the folder's name


@dataclass(frozen=True)
class ApiSettings:
    """What the endpoints read from the project's serve section, and the admin token."""

    feedback: bool = True  # serve.feedback: POST /v1/feedback is open
    max_new_tokens: int = 256  # serve.max_new_tokens: the cap on a request's max_tokens
    admin_token: str | None = None  # opens /admin/adapters (engines with runtime_adapters only)
    max_request_bytes: int = 1_048_576  # serve.max_request_bytes: a larger body is refused with 413
    request_timeout_s: float = 60.0  # serve.request_timeout_s: a chat completion's deadline
    shutdown_grace_s: float = 5.0  # serve.shutdown_grace_s: what an answer in flight gets after SIGTERM


# ---------------------------------------------------------------- errors

def _error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def api_error_response(_request: Request, exc: ApiError) -> JSONResponse:
    """An ApiError in OpenAI's error shape; a 401 asks for a bearer token, a 503 says when to retry."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    headers.update(exc.headers or {})
    return JSONResponse(_error_body(exc.message, exc.type, exc.code), status_code=exc.status, headers=headers or None)


def http_error_response(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404 unknown path, 405 method, 400 a body that is not JSON) in OpenAI's shape."""
    type_ = "invalid_request_error" if exc.status_code < 500 else "api_error"
    return JSONResponse(_error_body(str(exc.detail), type_, None), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def internal_error_response(_request: Request, _exc: Exception) -> JSONResponse:
    """Any other exception: 500 without the traceback (Starlette logs it on the server)."""
    return JSONResponse(_error_body("internal error; the server's log has the details", "api_error", "internal_error"),
                        status_code=500)


def invalid_request_response(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request body or header that fails validation: 400 in OpenAI's error shape, naming each field."""
    detail = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": {"message": detail, "type": "invalid_request_error", "code": None}}, status_code=400)


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413 `request_too_large`, before the app parses it.

    A Content-Length over the limit is refused without reading the body; otherwise the body is read here, counting
    the bytes actually received (a chunked upload has no Content-Length, and a client may send more than it said),
    and handed to the app once whole. Bodies are at most `max_bytes` in memory.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrived"] = time.perf_counter()  # the deadline counts from here (request.state)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"{int(declared)} bytes (Content-Length)")
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client is gone, nobody to answer
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: str) -> None:
        body = _error_body(f"the request body is {size}, over this server's limit of {self.max_bytes} bytes "
                           "(serve.max_request_bytes)", "invalid_request_error", "request_too_large")
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


# ---------------------------------------------------------------- authentication

def _bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header; None without one."""
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def authenticated_tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> servedb.Tenant:
    """The tenant whose API key the request carries (`Authorization: Bearer KEY`).

    Raises:
        ApiError: 401, no key, or a key that is unknown or revoked.
    """
    key = _bearer(authorization)
    if key is None:
        raise ApiError(401, "missing API key: send Authorization: Bearer KEY", "authentication_error", "missing_api_key")
    found = servedb.tenant_for_key(request.app.state.db, key)
    if found is None:
        raise ApiError(401, "invalid or revoked API key", "authentication_error", "invalid_api_key")
    return found


AuthTenant = Annotated[servedb.Tenant, Depends(authenticated_tenant)]  # an endpoint's tenant


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Let the request through only with the server's admin token (`Authorization: Bearer TOKEN`).

    Raises:
        ApiError: 401, no token or another one (a tenant key included).
    """
    import hmac

    key = _bearer(authorization)
    if key is None or not hmac.compare_digest(key.encode(), request.app.state.settings.admin_token.encode()):
        raise ApiError(401, "admin endpoints need the server's admin token", "authentication_error", "invalid_admin_token")


# ---------------------------------------------------------------- endpoints
# Endpoints return dicts without a return annotation (FastAPI would take one as a response model and validate
# through it); those that build a JSONResponse may say so, since FastAPI does not validate a Response subclass.

async def health(request: Request):
    """GET /health, no key: liveness and the engine. Adapter names stay private (a key lists its own in /v1/models).
    On the event loop, not in the thread pool the chat endpoints wait in, so it answers while they queue."""
    engine: Engine = request.app.state.engine
    return {"status": "ok", "engine": engine.kind, "adapters_loaded": len(engine.adapters)}


def _model_card(name: str, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tunegate", "root": name, "parent": parent}


def models(request: Request, t: AuthTenant):
    """GET /v1/models: the base model (when the key is granted it and the engine serves it) and the key's adapters."""
    engine: Engine = request.app.state.engine
    cards = [_model_card(engine.base_name, None)] if t.allow_base and engine.serves_base else []
    cards += [_model_card(n, engine.base_name) for n in engine.adapters if n in t.adapters]
    return {"object": "list", "data": cards}


def _granted_adapter(engine: Engine, t: servedb.Tenant, model: str, missing: dict[str, str] | None = None) -> str | None:
    """The adapter a request's `model` names (None: the base model), once the key may use it and it is loaded.
    `missing`: registry names with nothing to serve -> the 404 message (tunegate.serve.production)."""
    adapter = None if model == engine.base_name else model
    if not t.may_use(adapter):  # 403 whether or not the model exists: another tenant's names stay private
        raise ApiError(403, f"this API key may not use model {model!r}", "permission_error", "model_not_allowed")
    if adapter is not None and adapter not in engine.adapters and adapter in (missing or {}):
        raise ApiError(404, missing[adapter], "invalid_request_error", "model_not_found")
    if (adapter is not None and adapter not in engine.adapters) or (adapter is None and not engine.serves_base):
        raise ApiError(404, f"model {model!r} is not loaded on this server", "invalid_request_error", "model_not_found")
    return adapter


def _chat_messages(body: ChatRequest, engine: Engine) -> list[dict[str, str]]:
    """The request's messages, normalised like training data; the last one must be a user turn, and no content
    may spell one of the base tokenizer's control tokens (ApiError 400, code `control_token`)."""
    from tunegate.data.records import RowError, normalize_messages

    try:
        messages = normalize_messages(body.messages, require_final_assistant=False)
    except RowError as exc:
        raise ApiError(400, f"messages: {exc.rule}: {exc.detail}", code=exc.rule) from None
    for i, m in enumerate(messages):  # JSON's "\ud800" escape: a lone surrogate no tokenizer or database can take
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"messages[{i}].content: invalid_unicode: holds a lone surrogate (a \\ud800-\\udfff "
                                "escape): not text", code="invalid_unicode") from None
        _refuse_control_characters(f"messages[{i}].content", m["content"])
    if messages[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be a user turn", code="role_order")
    _refuse_control_tokens(engine, messages)
    return messages


def _refuse_control_characters(field: str, text: str) -> None:
    """ApiError 400 `control_character` when `text` holds a control character (NUL, ESC, ...: the data stage's
    rule of the same name, tunegate.data.records.CONTROL_CHARACTERS): it would reach traces, feedback sources and
    the terminals that print them."""
    from tunegate.data.records import control_character_problem

    problem = control_character_problem(text)
    if problem:
        raise ApiError(400, f"{field}: control_character: {problem}", code="control_character")


def _refuse_control_tokens(engine: Engine, messages: list[dict[str, str]] | None = None,
                           fields: dict[str, str] | None = None) -> None:
    """ApiError 400 (code `control_token`) when a message content or a named field spells one of the base
    tokenizer's control tokens (`engine.special_tokens`; docs/design.md#control-tokens)."""
    from tunegate.data.format import CONTROL_TOKEN_RULE, control_token_problem

    problem = control_token_problem(engine.special_tokens, messages, fields=fields)
    if problem:
        raise ApiError(400, f"{CONTROL_TOKEN_RULE}: {problem}; text may not spell a control token", code=CONTROL_TOKEN_RULE)


def _sse_events(trace_id: str, created: int, model: str, out: Completion, usage: dict[str, int]):
    """A streamed answer: the whole text as one chunk, then the finish reason and usage, then [DONE]."""
    base = {"id": trace_id, "object": "chat.completion.chunk", "created": created, "model": model}
    first = {"index": 0, "delta": {"role": "assistant", "content": out.text}, "finish_reason": None}
    last = {"index": 0, "delta": {}, "finish_reason": out.finish_reason}
    yield f"data: {json.dumps({**base, 'choices': [first]})}\n\n"
    yield f"data: {json.dumps({**base, 'choices': [last], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def chat_completions(request: Request, body: ChatRequest, t: AuthTenant):
    """POST /v1/chat/completions: answer with the engine, store the trace; its id is the response `id`.

    Raises:
        ApiError: 403 a model the key is not granted, 404 not loaded, 400 invalid messages (a content spelling a
            control token included), or the engine's own (400 context_length_exceeded, 503 busy or shutting
            down, 504 past the deadline, 502 vLLM failed).
    """
    # The deadline counts from arrival (BodyLimit), not from when a worker thread took the request: under load
    # requests queue for the thread pool first.
    started = getattr(request.state, "arrived", None) or time.perf_counter()
    engine: Engine = request.app.state.engine
    db, settings = request.app.state.db, request.app.state.settings
    if time.perf_counter() - started >= settings.request_timeout_s:
        raise busy_error(settings.request_timeout_s)
    board: Switchboard = request.app.state.production
    adapter = _granted_adapter(engine, t, body.model, board.missing)
    messages = _chat_messages(body, engine)
    asked = body.max_completion_tokens or body.max_tokens
    max_new = min(asked or settings.max_new_tokens, settings.max_new_tokens)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    # The version this request is answered by is fixed here: a promotion meanwhile switches the next request,
    # and the lease keeps this one's adapter loaded until the answer is done.
    with board.lease(adapter) as served:
        if adapter is not None and served is None:  # removed between the check and the lease (admin, registry)
            raise ApiError(404, f"model {body.model!r} is not loaded on this server", "invalid_request_error", "model_not_found")
        remaining_s = settings.request_timeout_s - (time.perf_counter() - started)
        out = engine.complete(served.engine_name if served else None, messages, max_new, body.temperature, body.top_p,
                              body.seed, stop, fit_max_tokens=asked is None, timeout_s=max(remaining_s, 0.001),
                              cancel=request.app.state.stopping)
    latency_ms = (time.perf_counter() - started) * 1000
    trace_id = servedb.new_trace_id()
    release = served.release if served else {}
    version = served.label if served else "base"
    servedb.write_trace(
        db, id=trace_id, tenant=t.name, model=body.model, adapter=adapter, version=version,
        adapter_sha256=release.get("adapter_sha256"), messages=messages,
        params={"max_tokens": max_new, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                "stop": stop, "stream": body.stream},
        response=out.text, finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens, latency_ms=latency_ms,
    )
    created = int(time.time())
    usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
             "total_tokens": out.prompt_tokens + out.completion_tokens}
    headers = {"X-Trace-Id": trace_id, "X-Tunegate-Adapter-Version": version}
    if release.get("adapter_sha256"):
        headers["X-Tunegate-Adapter-Sha256"] = release["adapter_sha256"]
    if body.stream:
        return StreamingResponse(_sse_events(trace_id, created, body.model, out, usage), media_type="text/event-stream",
                                 headers=headers)
    return JSONResponse({
        "id": trace_id, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "finish_reason": out.finish_reason}],
        "usage": usage,
    }, headers=headers)


def feedback(request: Request, body: FeedbackRequest, t: AuthTenant,
             idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """POST /v1/feedback: a rating (and an edited answer) on one of this key's traces, written exactly once.

    Raises:
        ApiError: 403 feedback is off, 400 an empty edit, or one holding a control character or spelling a
            control token (it would become a preference pair's chosen answer), 404 no such trace for this key, 409 a reused Idempotency-Key with
            another body.
    """
    db = request.app.state.db
    if not request.app.state.settings.feedback:
        raise ApiError(403, "feedback capture is off on this server (serve.feedback: false)", "permission_error",
                       "feedback_disabled")
    if body.edited_answer is not None and not body.edited_answer.strip():
        raise ApiError(400, "edited_answer is empty: leave it out for a plain thumbs rating", code="empty_turn")
    _refuse_control_characters("edited_answer", body.edited_answer or "")
    _refuse_control_tokens(request.app.state.engine, fields={"edited_answer": body.edited_answer or ""})
    trace = servedb.get_trace(db, body.trace_id)
    if trace is None or trace["tenant"] != t.name:  # another tenant's trace looks like no trace at all
        raise ApiError(404, f"no trace {body.trace_id!r} for this API key", "invalid_request_error", "trace_not_found")
    try:
        row, replayed = servedb.record_feedback(db, t.name, body.trace_id, body.rating, body.edited_answer, idempotency_key)
    except servedb.FeedbackConflict as exc:
        raise ApiError(409, str(exc), "invalid_request_error", "idempotency_key_reused") from None
    return JSONResponse({"id": row["id"], "object": "feedback", "trace_id": row["trace_id"], "rating": row["rating"],
                         "replayed": replayed}, status_code=200 if replayed else 201)


def add_adapter(request: Request, body: AdapterRequest) -> JSONResponse:
    """POST /admin/adapters: verify a bundle and load its adapter at run time.

    Raises:
        ApiError: 409 `name_reserved`: the name is one of the registry's names (NAME, NAME-vN); 400: refused.
    """
    from tunegate.config import BundleConfig

    engine: Engine = request.app.state.engine
    board: Switchboard = request.app.state.production
    name = body.name or Path(body.path).name
    if board.clashes(name):
        raise ApiError(409, f"adapter name {name!r} is one of the registry's names for project {board.name} (NAME, NAME-vN: "
                       "what `tunegate promote` serves); give the adapter another name", code="name_reserved")
    try:
        BundleConfig(path=Path(body.path), name=name)  # the same name rule as serve.bundles
        release = engine.add_adapter(name, Path(body.path))
    except (TunegateError, ValueError) as exc:
        raise ApiError(400, str(exc), code="adapter_refused") from None
    return JSONResponse({"name": name, "run_id": release.get("run_id"), "adapter_sha256": release.get("adapter_sha256")},
                        status_code=201)


def remove_adapter(request: Request, name: str):
    """DELETE /admin/adapters/NAME: unload an adapter. Raises ApiError: 404 not served, 400 refused."""
    engine: Engine = request.app.state.engine
    if name not in engine.adapters:
        raise ApiError(404, f"adapter {name!r} is not served here", code="model_not_found")
    if engine.adapters[name].slot is not None:
        raise ApiError(400, f"adapter {name!r} is served from the registry; change it with `tunegate promote` or "
                       "`tunegate rollback` (or serve.versions)", code="adapter_refused")
    try:
        engine.remove_adapter(name)
    except TunegateError as exc:
        raise ApiError(400, str(exc), code="adapter_refused") from None
    return {"name": name, "removed": True}


# ---------------------------------------------------------------- the app

def create_app(project, engine: Engine | None = None, database_url: str | None = None,
               admin_token: str | None = None, watch: bool = True) -> FastAPI:
    """The FastAPI app over `engine` and the serving database, serving the registry's production version too
    (`app.state.production`, a tunegate.serve.production.Switchboard: synced once here, then watched every
    serve.reload_interval_s while the app runs, when `watch`).

    Args:
        project: the loaded project (its serve section: feedback, max_new_tokens, database_url, and the limits
            max_request_bytes, request_timeout_s, shutdown_grace_s).
        engine: the generation backend; default EmbeddedEngine.load(project).
        database_url: default the project's (tunegate.serve.db.project_url).
        admin_token: opens /admin/adapters when the engine has `runtime_adapters`.

    Raises:
        TunegateError: loading the default engine failed (a refused bundle), a bundle's name clashes with the
            registry's names (NAME, NAME-vN), or the registry's production version could not be loaded (a refused
            or changed bundle; a version the engine cannot serve, such as DoRA on vLLM, is not an error: its name
            answers 404 saying why). Whatever fails after the switchboard synced stops it first.
    """
    engine = engine if engine is not None else EmbeddedEngine.load(project)
    board = Switchboard(project, engine)
    try:
        board.sync(strict=True)
        return _app(project, engine, board, database_url, admin_token, watch)
    except BaseException:
        board.stop(unload=True)  # its private bundle copies and the slots it loaded into the engine
        raise


def _app(project, engine: Engine, board: Switchboard, database_url: str | None, admin_token: str | None,
         watch: bool) -> FastAPI:
    """The FastAPI app of `create_app` around a synced switchboard."""
    cfg = project.serve

    @asynccontextmanager
    async def lifespan(_app):
        if watch:
            board.start()
        try:
            yield
        finally:
            board.stop()

    app = FastAPI(title="tunegate", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.production = board
    app.state.db = servedb.connect(database_url or servedb.project_url(project))
    app.state.settings = ApiSettings(
        feedback=cfg.feedback, max_new_tokens=cfg.max_new_tokens, admin_token=admin_token,
        max_request_bytes=cfg.max_request_bytes, request_timeout_s=cfg.request_timeout_s,
        shutdown_grace_s=cfg.shutdown_grace_s) if cfg is not None else ApiSettings(admin_token=admin_token)
    app.state.stopping = threading.Event()  # set on shutdown (begin_shutdown): answers in flight stop early
    app.add_middleware(BodyLimit, max_bytes=app.state.settings.max_request_bytes)
    app.add_exception_handler(ApiError, api_error_response)
    app.add_exception_handler(RequestValidationError, invalid_request_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    app.add_exception_handler(Exception, internal_error_response)
    # FastAPI publishes an endpoint's docstring in /openapi.json up to a form feed: "\f" keeps them out of it.
    route = partial(app.add_api_route, description="\f")
    route("/health", health, methods=["GET"])
    route("/v1/models", models, methods=["GET"])
    route("/v1/chat/completions", chat_completions, methods=["POST"])
    route("/v1/feedback", feedback, methods=["POST"])
    if admin_token and engine.runtime_adapters:
        admin = [Depends(require_admin)]
        route("/admin/adapters", add_adapter, methods=["POST"], dependencies=admin)
        route("/admin/adapters/{name}", remove_adapter, methods=["DELETE"], dependencies=admin)
    return app


# ---------------------------------------------------------------- running it

def serve(project, engine: str = "embedded", host: str | None = None, port: int | None = None, *,
          vllm_venv: Path | None = None, merged: str | None = None, smoke: bool = True, dtype: str = "bfloat16",
          match_tokens: int | None = None, max_rank: int | None = None, enforce_eager: bool = False) -> None:
    """Start the server in the foreground until SIGTERM or SIGINT (see `shutdown_aware_server`), then return.

    With `engine="vllm"` (tunegate.serve.vllm): vLLM starts on a private loopback port from the verified
    bundles (preflight C14-C16 in docs/cases.md; `merged` serves one bundle's merged model alone), the smoke test (C17,
    tunegate.serve.smoke) runs against it unless `smoke` is False, then this app answers tenants in front of it.

    Raises:
        TunegateError: an unknown engine, a refused bundle, no vLLM environment, vLLM failed to start, or the
            smoke test failed (the message names the adapter and the prompt).
    """
    if engine not in ENGINES:
        raise TunegateError(f"--engine {engine}: unknown; engines: {', '.join(ENGINES)}")
    cfg = project.serve
    host = host or (cfg.host if cfg else "127.0.0.1")
    port = port if port is not None else (cfg.port if cfg else 8000)
    if engine == "embedded":
        app = create_app(project)
        loaded = [f"{n} ({a.label})" if a.label != n else n for n, a in app.state.engine.adapters.items()]
        loaded += [f"{n} (no version yet)" for n in app.state.production.missing]
        print(f"tunegate serve: base model {app.state.engine.base_name}, adapters: {', '.join(loaded) or '(none)'}; "
              f"database {servedb.project_url(project).split('://')[0]}; http://{host}:{port}/v1", flush=True)
        shutdown_aware_server(app, host, port).run()
        return
    import secrets

    from tunegate.serve.smoke import BF16_MAX_RANK, format_smoke, run_smoke
    from tunegate.serve.vllm import VLLMEngine, servable_as_lora, write_admin_file

    import tempfile

    from tunegate.serve.production import REGISTRY_LORA_RANK, registry_copies

    copies = tempfile.TemporaryDirectory(prefix="tunegate-registry-")  # vLLM reads the registry's versions from here
    try:
        preload = registry_copies(project, Path(copies.name)) if merged is None else {}
        # a version vLLM cannot serve as a LoRA (DoRA, added tokens, ...) does not stop the launch: the switchboard
        # marks its name missing with the reason (create_app)
        preload = {slot: copy for slot, copy in preload.items() if servable_as_lora(*copy)}
        backend = VLLMEngine.launch(project, venv=vllm_venv, merged=merged, dtype=dtype, enforce_eager=enforce_eager,
                                    preload=preload, reserve_lora_rank=REGISTRY_LORA_RANK if merged is None else None)
    except BaseException:
        copies.cleanup()
        raise
    admin_file = None
    try:
        if smoke:
            if max_rank is None and match_tokens is None and dtype != "float32":
                max_rank = BF16_MAX_RANK  # bf16 vs the fp32 reference: see BF16_MAX_RANK
            models = [None] if backend.serves_base else []
            report = run_smoke(project, backend.url, models + list(backend.adapters), base_served=backend.serves_base,
                               match_tokens=match_tokens, base_name=backend.base_name, max_rank=max_rank)
            print(format_smoke(report), flush=True)
            if not report["passed"]:
                raise TunegateError("the serving smoke test failed (case C17); not serving:\n  " + "\n  ".join(report["failures"]))
        token = secrets.token_urlsafe(32)
        app = create_app(project, engine=backend, admin_token=token)
        admin_file = write_admin_file(project, f"http://{host}:{port}", token, backend.url)
        print(f"tunegate serve: vLLM ({backend.url}, private) serving {'merged model ' + merged if merged else 'base model ' + backend.base_name}"
              f", adapters: {', '.join(backend.adapters) or '(none)'}; database {servedb.project_url(project).split('://')[0]}; "
              f"http://{host}:{port}/v1; admin token in {admin_file}", flush=True)
        shutdown_aware_server(app, host, port).run()
    finally:
        if admin_file is not None:
            admin_file.unlink(missing_ok=True)
        backend.close()
        copies.cleanup()


def begin_shutdown(app, now: bool = False) -> None:
    """Cut answers in flight short (`app.state.stopping`) after serve.shutdown_grace_s, or `now`."""
    if now:
        app.state.stopping.set()
        return
    timer = threading.Timer(app.state.settings.shutdown_grace_s, app.state.stopping.set)
    timer.daemon = True
    timer.start()


def shutdown_aware_server(app, host: str, port: int, log_level: str = "info"):
    """A uvicorn server for `app` that shuts down within seconds on SIGTERM or SIGINT, a generation in flight included.

    uvicorn alone stops accepting connections and waits for the requests in flight, and a generation running in a
    worker thread cannot be cancelled: the embedded engine's lock could keep the process alive for minutes. Here
    the first signal also starts `begin_shutdown` (answers in flight get serve.shutdown_grace_s, then stop with
    finish_reason "length"; requests waiting for the lock get 503), and uvicorn's own graceful timeout is that
    grace plus SHUTDOWN_MARGIN_S. A second SIGINT stops generation at once. The signal is not raised again
    afterwards (uvicorn's default), so `serve` returns and cleans up (the vLLM process) and the command exits 0.
    """
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
                begin_shutdown(app, now=True)
                return
            if not self.should_exit:
                print(f"tunegate serve: signal {signal.Signals(sig).name}: shutting down (answers in flight get "
                      f"{app.state.settings.shutdown_grace_s:g} s)", flush=True)
                begin_shutdown(app)
            self.should_exit = True

    grace = app.state.settings.shutdown_grace_s + SHUTDOWN_MARGIN_S
    return Server(uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level,
                                 timeout_graceful_shutdown=grace))  # type: ignore[arg-type]  # a float works


@dataclass
class BackgroundServer:
    """A uvicorn server on a thread (tests, bench/serve_load.py). `url` ends in /v1."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        """Ask the server to exit and wait for its thread (at most 30 s)."""
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_background(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0) -> BackgroundServer:
    """Run `app` with uvicorn on a daemon thread; port 0 picks a free port. Returns once it accepts connections.

    Raises:
        TunegateError: the server did not start within `timeout_s`.
    """
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
