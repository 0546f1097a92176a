"""The serving database: tenants and their API keys, one trace per answered request, and feedback on traces.

SQLAlchemy Core, so `serve.database_url` may be any SQLAlchemy URL (a shared PostgreSQL for several server
processes); the default is SQLite in the project folder, `sqlite:///<project dir>/serve.db`.

Tables:
  tenants   name, key_sha256 (unique), adapters (JSON list), allow_base, created_at, revoked_at
  traces    id (the OpenAI response `id`, "chatcmpl-..."), tenant, model (the name asked for), adapter (None for
            the base model), adapter_sha256, messages (the request's chat, JSON), params (JSON), response,
            finish_reason, prompt_tokens, completion_tokens, created_at, latency_ms, version (what answered:
            `NAME-vN` for a registry version, a bundle's name, or "base"; NULL in rows from before the column,
            which `connect` adds to an older database)
  feedback  id, trace_id -> traces.id, tenant, idempotency_key, request_sha256, rating ('up' | 'down'),
            edited_answer, created_at; UNIQUE (tenant, idempotency_key)

API keys. `tenants add` draws 32 random bytes (`secrets.token_urlsafe(32)`, 256 bits), prints the key once
and stores only its SHA-256. A slow password KDF (bcrypt, scrypt, Argon2) exists to make guessing a
low-entropy human password from a stolen hash expensive; a 256-bit random key cannot be guessed at any
hashing speed, so a fast hash is as safe here, and it lets each request find its tenant by an indexed
lookup of the hash (a salted KDF would have to be run once per stored tenant).

Feedback submissions are rows appended, never updated; each is written exactly once. A submission is
identified by its idempotency key: the client's `Idempotency-Key` header, or, when it sends none, the
content: a body equal to the trace's latest submission is a retry of it, and any other body is a new row
keyed by its content and the submission it follows (so a thumb up, down, then up again is three rows, and
the export reads "up"). A repeated key with the same body returns the stored row (`replayed`); the same key
with a different body is refused (HTTP 409), as in Stripe's idempotency keys. The insert relies on the
UNIQUE constraint, not on a read-then-write, so concurrent retries on several connections still produce
one row. A trace may receive several submissions (a thumb, later an edit); `export_feedback` takes the
latest rating and the latest edited answer of each trace.

SQLite with concurrent writers: every connection sets WAL journaling (readers never block the one writer)
and a busy timeout (a writer waits for the lock instead of failing with "database is locked").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegate import TunegateError
from tunegate.core.io import create_private
from tunegate.core.paths import check_identifier, inside

BUSY_TIMEOUT_S = 30.0  # how long an SQLite writer waits for the write lock
KEY_PREFIX = "tg-"  # makes a leaked key easy to recognise (secret scanners, logs)
RATINGS = ("up", "down")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso_utc(t: Any) -> str | None:
    """A stored timestamp as ISO 8601 text; a naive datetime is taken as UTC. None stays None."""
    if t is None:
        return None
    if isinstance(t, dt.datetime):
        return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).isoformat()
    return str(t)


def default_url(project_root: Path) -> str:
    return f"sqlite:///{Path(project_root).resolve() / 'serve.db'}"


def project_url(project) -> str:
    """The project's serving database URL: `serve.database_url`, else SQLite beside the project file."""
    serve = project.serve
    return (serve.database_url if serve is not None and serve.database_url else None) or default_url(project.root)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_TABLES: dict[str, Any] = {}
_TABLES_LOCK = threading.Lock()


def tables():
    """The SQLAlchemy Core tables (built once, on first use: `import tunegate` stays free of SQLAlchemy)."""
    with _TABLES_LOCK:
        if not _TABLES:
            _build_tables()
    return _TABLES


def _build_tables() -> None:
    from sqlalchemy import (
        JSON,
        Boolean,
        Column,
        DateTime,
        Float,
        ForeignKey,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        UniqueConstraint,
    )

    md = MetaData()
    _TABLES["metadata"] = md
    _TABLES["tenants"] = Table(
        "tenants", md,
        Column("name", String(200), primary_key=True),
        Column("key_sha256", String(64), nullable=False, unique=True),
        Column("adapters", JSON, nullable=False),
        Column("allow_base", Boolean, nullable=False, default=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("revoked_at", DateTime(timezone=True), nullable=True),
    )
    _TABLES["traces"] = Table(
        "traces", md,
        Column("id", String(64), primary_key=True),
        Column("tenant", String(200), nullable=False, index=True),
        Column("model", String(300), nullable=False),
        Column("adapter", String(200), nullable=True),  # None: the base model answered
        Column("adapter_sha256", String(64), nullable=True),
        Column("messages", JSON, nullable=False),
        Column("params", JSON, nullable=False),
        Column("response", Text, nullable=False),
        Column("finish_reason", String(20), nullable=False),
        Column("prompt_tokens", Integer, nullable=False),
        Column("completion_tokens", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, index=True),
        Column("latency_ms", Float, nullable=False),
        Column("version", String(200), nullable=True),  # tunegate.serve.production's label of what answered
    )
    _TABLES["feedback"] = Table(
        "feedback", md,
        Column("id", String(64), primary_key=True),
        Column("trace_id", String(64), ForeignKey("traces.id"), nullable=False, index=True),
        Column("tenant", String(200), nullable=False),
        Column("idempotency_key", String(300), nullable=False),
        Column("request_sha256", String(64), nullable=False),
        Column("rating", String(8), nullable=False),
        Column("edited_answer", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("tenant", "idempotency_key", name="uq_feedback_idempotency"),
    )


def connect(url: str):
    """An engine on `url` with the tables created. SQLite: WAL, a busy timeout and foreign keys on every connection.

    Raises:
        TunegateError: the URL is not a valid SQLAlchemy URL or its driver is not installed.
    """
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                create_private(Path(path))  # 0600: every tenant's prompts and answers
            engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_con, _record):
                cur = dbapi_con.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=FULL")  # a 201 for feedback means it is on disk, even after a power loss
                cur.close()
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise TunegateError(f"serve.database_url {url!r}: {exc}") from None
    tables()["metadata"].create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine) -> None:
    """Migrate a database made by an older tunegate: add the columns its tables lack (nullable; old rows read NULL)."""
    from sqlalchemy import inspect, text

    have = {c["name"] for c in inspect(engine).get_columns("traces")}
    table = tables()["traces"]
    missing = [c for c in table.columns if c.name not in have]
    if not missing:
        return
    with engine.begin() as con:
        for c in missing:
            con.execute(text(f"ALTER TABLE traces ADD COLUMN {c.name} {c.type.compile(dialect=engine.dialect)}"))


# ---------------------------------------------------------------- tenants

@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...]
    allow_base: bool

    def may_use(self, adapter: str | None) -> bool:
        """adapter None: the base model."""
        return self.allow_base if adapter is None else adapter in self.adapters


def add_tenant(engine, name: str, adapters: list[str], allow_base: bool = False) -> str:
    """Create a tenant; returns its new API key (shown once: only its SHA-256 is stored).

    Raises:
        TunegateError: the name is not an identifier (core.paths), is taken (revoked tenants keep their name), or no
            model is granted.
    """
    from sqlalchemy import select

    check_identifier("tenant name", name)
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise TunegateError(f"tenant name {name!r}: letters, digits, '-', '_' and '.' only")
    if not adapters and not allow_base:
        raise TunegateError(f"tenant {name}: grant at least one adapter (--adapter NAME) or the base model (--allow-base)")
    t = tables()["tenants"]
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as con:
        if con.execute(select(t.c.name).where(t.c.name == name)).first() is not None:
            raise TunegateError(f"tenant {name} already exists (revoke it and add a new name to rotate its key)")
        con.execute(t.insert().values(name=name, key_sha256=key_hash(key), adapters=list(dict.fromkeys(adapters)),
                                      allow_base=allow_base, created_at=_now(), revoked_at=None))
    return key


def list_tenants(engine) -> list[dict[str, Any]]:
    from sqlalchemy import select

    t = tables()["tenants"]
    with engine.connect() as con:
        rows = con.execute(select(t).order_by(t.c.created_at, t.c.name)).mappings().all()
    return [{"name": r["name"], "adapters": list(r["adapters"]), "allow_base": bool(r["allow_base"]),
             "created_at": iso_utc(r["created_at"]), "revoked_at": iso_utc(r["revoked_at"]),
             "key_sha256_prefix": r["key_sha256"][:12]} for r in rows]


def revoke_tenant(engine, name: str) -> None:
    """Revoke a tenant's key: its requests get 401 from now on. Its traces and feedback stay.

    Raises:
        TunegateError: no such tenant, or it is already revoked.
    """
    from sqlalchemy import update

    t = tables()["tenants"]
    with engine.begin() as con:
        n = con.execute(update(t).where(t.c.name == name, t.c.revoked_at.is_(None)).values(revoked_at=_now())).rowcount
    if n != 1:
        known = [x["name"] for x in list_tenants(engine)]
        if name in known:
            raise TunegateError(f"tenant {name} is already revoked")
        raise TunegateError(f"no tenant {name}; tenants: {', '.join(known) or '(none)'}")


def tenant_for_key(engine, key: str) -> Tenant | None:
    """The live tenant holding this API key, or None (unknown or revoked key)."""
    from sqlalchemy import select

    t = tables()["tenants"]
    with engine.connect() as con:
        r = con.execute(select(t).where(t.c.key_sha256 == key_hash(key), t.c.revoked_at.is_(None))).mappings().first()
    return None if r is None else Tenant(r["name"], tuple(r["adapters"]), bool(r["allow_base"]))


# ---------------------------------------------------------------- traces and feedback

def new_trace_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def write_trace(engine, **row: Any) -> None:
    """Insert one trace (the columns of the `traces` table; created_at defaults to now)."""
    row.setdefault("created_at", _now())
    with engine.begin() as con:
        con.execute(tables()["traces"].insert().values(**row))


def get_trace(engine, trace_id: str) -> dict[str, Any] | None:
    from sqlalchemy import select

    t = tables()["traces"]
    with engine.connect() as con:
        r = con.execute(select(t).where(t.c.id == trace_id)).mappings().first()
    return dict(r) if r is not None else None


class FeedbackConflict(TunegateError):
    """The idempotency key was used before with a different body."""


def feedback_request_hash(trace_id: str, rating: str, edited_answer: str | None) -> str:
    return hashlib.sha256(json.dumps([trace_id, rating, edited_answer]).encode("utf-8")).hexdigest()


def record_feedback(engine, tenant: str, trace_id: str, rating: str, edited_answer: str | None,
                    idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
    """Write one feedback submission exactly once. Returns (the stored row, replayed).

    replayed is True when this key was already stored with the same body (nothing new is written).
    The caller has checked that the trace exists and belongs to the tenant.

    Raises:
        FeedbackConflict: the key was already used for a different body.
    """
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    f = tables()["feedback"]
    body_hash = feedback_request_hash(trace_id, rating, edited_answer)
    key = idempotency_key
    if key is None:
        # No header: the latest submission on this trace with the same body is a retry of it; otherwise this is
        # a new submission, keyed by the body and the submission it follows (so up, down, up is three rows, and
        # concurrent copies of one submission collide on the UNIQUE key).
        with engine.connect() as con:
            latest = con.execute(select(f).where(f.c.tenant == tenant, f.c.trace_id == trace_id)
                                 .order_by(f.c.created_at.desc()).limit(1)).mappings().first()
        if latest is not None and latest["request_sha256"] == body_hash:
            return dict(latest), True
        key = f"auto:{body_hash}:after:{latest['id'] if latest is not None else '-'}"
    row = {"id": "fb-" + uuid.uuid4().hex, "trace_id": trace_id, "tenant": tenant, "idempotency_key": key,
           "request_sha256": body_hash, "rating": rating, "edited_answer": edited_answer, "created_at": _now()}
    try:
        with engine.begin() as con:
            con.execute(f.insert().values(**row))
        return row, False
    except IntegrityError:
        pass  # the key is taken: the transaction was rolled back; read what holds it
    with engine.connect() as con:
        stored = con.execute(select(f).where(f.c.tenant == tenant, f.c.idempotency_key == key)).mappings().first()
    if stored is None:  # the IntegrityError was something else (e.g. the trace vanished)
        raise TunegateError(f"feedback on {trace_id}: could not be stored (integrity error)")
    if stored["request_sha256"] != body_hash:
        raise FeedbackConflict(f"Idempotency-Key {idempotency_key!r} was already used for a different feedback body "
                               f"(feedback {stored['id']})")
    return dict(stored), True


def count_feedback(engine) -> int:
    from sqlalchemy import func, select

    with engine.connect() as con:
        return int(con.execute(select(func.count()).select_from(tables()["feedback"])).scalar_one())


# ---------------------------------------------------------------- export for the next round

TRUNCATED_RULE = "truncated_response"  # the openai_log reader's rule for an answer cut by max_tokens


def export_feedback(engine, adapters: list[str] | None = None,
                    special_tokens: frozenset[str] = frozenset(),
                    versions_of: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Traces with feedback -> (preference rows, KTO rows, counts), in the JSONL shapes of `format: preference`
    and `format: kto` (tunegate.data.records).

    Per trace, the latest rating gives one KTO row (prompt = the request's messages, completion = the served
    answer, label = rating == "up"), and the latest edited answer that differs from the served answer gives
    one preference pair (chosen = the edit, rejected = the served answer) and one SFT chat row (the request's
    messages + the edit as the assistant turn; in counts["sft"], which export_to_files takes out: kept even when
    the served answer was cut short, since that answer is not in it). Every row carries its provenance
    as top-level keys, which the reader keeps in `meta`: source "feedback", trace_id, tenant, adapter
    (None: the base model), adapter_sha256, adapter_version (the trace's `version`: NAME-vN, a bundle's name,
    or "base"), feedback_id, served_at. `adapters` keeps only traces of those
    adapter names ("base" selects the base model's traces); `versions_of` keeps only traces answered by a registry
    version of that project (version `NAME-vN`, tunegate.serve.production).

    Left out: a row whose served answer was cut short (finish_reason "length": max_tokens, the deadline or a
    shutdown; rule `truncated_response`, as the `openai_log` reader rejects such logged answers), and a row any of
    whose texts (the request's messages, the served answer, the edit) spells one of `special_tokens` (the base
    tokenizer's, tunegate.data.format.special_tokens; the API refuses such text, 400 `control_token`, but a
    database may predate that rule). counts["rejected"] lists each one ({id, trace_id, feedback_id, rule,
    detail}) and counts["rejected_by_rule"] counts them.
    """
    from collections import Counter

    from sqlalchemy import select

    from tunegate.data.format import CONTROL_TOKEN_RULE, control_token_problem
    from tunegate.data.records import normalize_text

    t, f = tables()["traces"], tables()["feedback"]
    q = select(f, t.c.messages, t.c.response, t.c.finish_reason, t.c.adapter, t.c.adapter_sha256, t.c.model,
               t.c.version.label("adapter_version"),
               t.c.created_at.label("served_at")).join(t, t.c.id == f.c.trace_id).order_by(f.c.created_at, f.c.id)
    with engine.connect() as con:
        rows = con.execute(q).mappings().all()
    latest_rating: dict[str, Any] = {}
    latest_edit: dict[str, Any] = {}
    own_version = re.compile(rf"{re.escape(versions_of)}-v[0-9]+") if versions_of is not None else None
    for r in rows:  # ordered oldest first: later submissions overwrite
        if adapters is not None and (r["adapter"] or "base") not in adapters:
            continue
        if own_version is not None and not own_version.fullmatch(r["adapter_version"] or ""):
            continue
        latest_rating[r["trace_id"]] = r
        if r["edited_answer"] is not None and r["edited_answer"].strip():
            latest_edit[r["trace_id"]] = r

    def provenance(r) -> dict[str, Any]:
        return {"source": "feedback", "trace_id": r["trace_id"], "tenant": r["tenant"], "adapter": r["adapter"],
                "adapter_sha256": r["adapter_sha256"], "adapter_version": r["adapter_version"], "model": r["model"],
                "feedback_id": r["id"],
                "rating": r["rating"], "served_at": iso_utc(r["served_at"])}

    rejected: list[dict[str, Any]] = []

    def clean(row: dict[str, Any], texts: dict[str, str], finish_reason: str | None) -> bool:
        messages = row["prompt"] if isinstance(row.get("prompt"), list) else row.get("messages")
        rule, problem = TRUNCATED_RULE, None
        if finish_reason == "length":  # cut by max_tokens, the deadline or a shutdown: not the model's answer
            problem = "the served answer was cut short (finish_reason 'length')"
        elif special_tokens:
            rule, problem = CONTROL_TOKEN_RULE, control_token_problem(special_tokens, messages, fields=texts)
        if problem:
            rejected.append({"id": row["id"], "trace_id": row["trace_id"], "feedback_id": row["feedback_id"],
                             "rule": rule, "detail": problem})
        return problem is None

    kto = [{"id": f"{tid}-kto", "prompt": r["messages"], "completion": r["response"], "label": r["rating"] == "up",
            **provenance(r)} for tid, r in latest_rating.items()]
    kto = [k for k, r in zip(kto, latest_rating.values()) if clean(k, {"completion": k["completion"]}, r["finish_reason"])]
    pairs, sft, same = [], [], 0
    for tid, r in latest_edit.items():
        if normalize_text(r["edited_answer"]) == normalize_text(r["response"]):
            same += 1  # an "edit" that changes nothing carries no preference
            continue
        pair = {"id": f"{tid}-pref", "prompt": r["messages"], "chosen": r["edited_answer"], "rejected": r["response"],
                **provenance(r)}
        if clean(pair, {"chosen": pair["chosen"], "rejected": pair["rejected"]}, r["finish_reason"]):
            pairs.append(pair)
        # The edit as a demonstration: the request + the edited answer. A served answer that was cut short does not
        # matter here (it is not in the row), so such an edit is still an SFT row.
        row = {"id": f"{tid}-sft", "messages": [*_as_messages(r["messages"]), {"role": "assistant", "content": r["edited_answer"]}],
               **provenance(r)}
        if clean(row, {"edited_answer": r["edited_answer"]}, None):
            sft.append(row)
    counts = {"feedback_rows": len(rows), "traces_with_feedback": len(latest_rating), "kto_rows": len(kto),
              "kto_up": sum(1 for r in kto if r["label"]), "kto_down": sum(1 for r in kto if not r["label"]),
              "preference_rows": len(pairs), "edits_identical_to_answer": same}
    counts["rejected_by_rule"] = dict(Counter(r["rule"] for r in rejected))
    counts["rejected"] = rejected
    counts["sft"] = sft
    return pairs, kto, counts


def _as_messages(prompt: Any) -> list[dict[str, Any]]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def feedback_dir(project) -> Path:
    """<project dir>/feedback, where `data.sources[].feedback` reads and `tunegate data feedback` writes by default.

    Raises:
        TunegateError: it is (or lies under) a symbolic link leading outside the project (core.paths.inside; one
            line naming the folder, where it leads and the project folder).
    """
    return inside(project.root, Path(project.root) / "feedback", "feedback/")


def export_to_files(project, out_dir: Path | None = None, adapters: list[str] | None = None,
                    versions_of: str | None = None) -> tuple[dict[str, Path], dict[str, Any]]:
    """`tunegate data feedback`: export_feedback from the project's serving database into `out_dir` (default
    <project dir>/feedback, where `data.sources[].feedback` reads): sft.jsonl (edited answers as chat rows:
    the request + the edit), preference.jsonl and kto.jsonl (each written, empty when it has no rows, so a feedback source
    always has its file), rejected.jsonl (rows left out: an answer cut short, rule `truncated_response`, or text
    spelling one of the base tokenizer's control tokens, rule `control_token`; only when there are any) and
    feedback_stats.json (with `rejected_by_rule`). The rows are in feedback order, so an unchanged database
    writes the same bytes and a run's data stage stays finished.

    Returns ({format: path written, "rejected" included when written}, counts). Raises TunegateError when the
    database holds no traces table yet, or when the default folder leads outside the project (`feedback_dir`).
    """
    from tunegate.core.io import atomic_write_json, atomic_write_jsonl
    from tunegate.data.format import special_tokens
    from tunegate.models import load_tokenizer, resolve_base_model

    out = Path(out_dir) if out_dir is not None else feedback_dir(project)
    url = project_url(project)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise TunegateError(f"{url[len('sqlite:///'):]}: no serving database yet (run `tunegate serve` and collect feedback first)")
    specials = special_tokens(load_tokenizer(resolve_base_model(project.base_model)))
    pairs, kto, counts = export_feedback(connect(url), adapters, specials, versions_of)
    rejected = counts.pop("rejected", [])
    counts.setdefault("rejected_by_rule", {})
    written: dict[str, Path] = {}
    sft = counts.pop("sft", [])
    counts["sft_rows"] = len(sft)
    for fmt, rows, name in (("sft", sft, "sft.jsonl"), ("preference", pairs, "preference.jsonl"), ("kto", kto, "kto.jsonl")):
        atomic_write_jsonl(out / name, rows)
        written[fmt] = out / name
    if rejected:
        atomic_write_jsonl(out / "rejected.jsonl", rejected)
        written["rejected"] = out / "rejected.jsonl"
    elif (out / "rejected.jsonl").is_file():
        (out / "rejected.jsonl").unlink()  # an earlier export's file would now be stale
    atomic_write_json(out / "feedback_stats.json", {**counts, "database": url.split("://")[0], "adapters": adapters,
                                                     "exported_at": iso_utc(_now())})
    return written, counts


def refresh_feedback_sources(project) -> list[str]:
    """Before `tunegate run` / `tunegate data`: when a data source is `feedback: sft|preference|kto`, export the
    serving database into <project dir>/feedback/ (export_to_files) so the run trains on the feedback collected so
    far. Returns lines to print. With no serving database yet, the files are written empty (a project may keep its
    feedback source from the first round on): the data stage then reads no rows from it. Only feedback on this
    project's registry versions (`NAME-vN`, what `tunegate promote` put in production) is exported: answers of
    the base model or of other bundles the server also serves are not this adapter's to learn from.
    Raises TunegateError when <project dir>/feedback leads outside the project (`feedback_dir`)."""
    from tunegate.core.io import atomic_write_jsonl

    kinds = [s.feedback for s in project.data.sources if s.feedback is not None]
    if not kinds:
        return []
    feedback_dir(project)  # refused before anything is written when it leads outside the project
    url = project_url(project)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        for s in project.data.sources:
            if s.feedback is not None and not s.path.is_file():
                atomic_write_jsonl(s.path, [])
        return [f"feedback sources ({', '.join(kinds)}): no serving database yet ({url[len('sqlite:///'):]}), so no feedback rows"]
    written, counts = export_to_files(project, versions_of=project.name)
    return [f"feedback sources: {counts['sft_rows']} SFT row(s), {counts['preference_rows']} preference pair(s), "
            f"{counts['kto_rows']} KTO row(s) on versions {project.name}-vN exported from the serving database "
            f"into {written['sft'].parent}"]
