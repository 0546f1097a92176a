"""The canonical record, the readers that produce it, and the structural validation rules.

A record is a dict:
    {"id": str, "source": str, "messages": [{"role": ..., "content": str}, ...], "meta": {...}}
or, for plain prompt/completion text (no chat template):
    {"id": str, "source": str, "prompt": str, "completion": str, "meta": {...}}

Readers never raise on a bad row: each row is either a record or a `Rejection` naming the file, the line
and the rule it broke (datatrove's "keep, or drop with a reason"). Validation here needs no tokenizer and
no model; the template and loss-mask checks that need the tokenizer are in `tunegate.data.format`.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tunegate import TunegateError

ROLES = ("system", "user", "assistant")


@dataclass
class Rejection:
    file: str
    line: int  # 1-based line in the file (CSV: the data row's line, header is line 1)
    id: str | None
    rule: str  # a stable name: invalid_json, unknown_role, role_order, empty_turn, ...
    detail: str
    raw: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rid = f" (id {self.id})" if self.id else ""
        return f"{self.file}:{self.line}{rid}: {self.rule}: {self.detail}"


class RowError(Exception):
    """A row broke a rule. Carries the rule name and a detail message."""

    def __init__(self, rule: str, detail: str):
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


def _text_content(content: Any, where: str) -> str:
    """A message's content as a string. A list of typed text parts is joined (case C06)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError("non_text_content", f"{where}: content part of type {kind!r} is not text")
        return "".join(parts)
    raise RowError("wrong_type", f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def normalize_messages(messages: Any, require_final_assistant: bool = True) -> list[dict[str, str]]:
    """Check a chat and return it with string contents. Raises RowError with the rule broken.

    Rules: a list of {role, content} objects; roles are system/user/assistant; at most one system message,
    first; then user and assistant alternate, starting with user; no empty or whitespace-only turn (C07);
    the chat ends with an assistant turn (something to learn from).
    """
    if not isinstance(messages, list):
        raise RowError("wrong_type", f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise RowError("empty_conversation", "messages is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RowError("unknown_role", f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if "content" not in m:
            raise RowError("missing_field", f"messages[{i}] has no content")
        content = _text_content(m["content"], f"messages[{i}]")
        if not content.strip():
            raise RowError("empty_turn", f"messages[{i}] ({role}) is empty or whitespace")
        out.append({"role": role, "content": content})
    body = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(body):
        offset = i + (len(out) - len(body))
        if m["role"] == "system":
            raise RowError("role_order", f"messages[{offset}]: a system message is only allowed first")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError("role_order", f"messages[{offset}] is {m['role']}, expected {expected} (turns must alternate, user first)")
    if not body:
        raise RowError("role_order", "only a system message, no user turn")
    if require_final_assistant and body[-1]["role"] != "assistant":
        raise RowError("role_order", "the conversation must end with an assistant turn")
    return out


def record_from_object(obj: Any, fmt: str, default_id: str, source: str) -> dict[str, Any]:
    """One parsed JSON object -> a canonical record. Raises RowError."""
    if not isinstance(obj, dict):
        raise RowError("wrong_type", f"a row must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    rid = str(rid)
    meta = {k: v for k, v in obj.items() if k not in ("id", "messages", "prompt", "completion")}
    if fmt == "chat":
        if "messages" not in obj:
            raise RowError("missing_field", "no 'messages' field")
        return {"id": rid, "source": source, "messages": normalize_messages(obj["messages"]), "meta": meta}
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                raise RowError("missing_field", f"no '{key}' field")
            if not isinstance(obj[key], str):
                raise RowError("wrong_type", f"'{key}' must be a string, got {type(obj[key]).__name__}")
        if not obj["completion"].strip():
            raise RowError("empty_turn", "completion is empty or whitespace")
        return {"id": rid, "source": source, "prompt": obj["prompt"], "completion": obj["completion"], "meta": meta}
    raise ValueError(f"unknown format {fmt}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, Exception | None]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, raw[:200].decode("utf-8", "replace"), RowError("invalid_utf8", str(exc))
                continue
            text = text.rstrip("\r\n")
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield lineno, text[:200], RowError("invalid_json", exc.msg + f" at column {exc.colno}")


def read_source(src, role: str = "train") -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Read one configured source (a `config.SourceConfig`). Returns (records, rejections); never raises on a row.

    Raises:
        TunegateError: the file is missing or unreadable, or a CSV lacks a mapped column.
    """
    path = Path(src.path)
    if not path.is_file():
        raise TunegateError(f"{path}: data file not found (data.{'golden' if role == 'golden' else 'sources'}.path)")
    name = path.name
    records: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    if src.format == "csv":
        rows = _csv_rows(path, src)
    else:
        rows = _jsonl_rows(path)
    for lineno, obj, err in rows:
        default_id = f"{path.stem}:{lineno}"
        rid = str(obj.get("id")) if isinstance(obj, dict) and "id" in obj else None
        if err is None:
            try:
                if src.format == "csv":
                    rec = {"id": default_id, "source": name, "messages": normalize_messages(obj), "meta": {}}
                else:
                    rec = record_from_object(obj, src.format, default_id, name)
                if src.instruction and "messages" in rec:
                    if rec["messages"][0]["role"] == "system":
                        raise RowError("role_order", "the source sets an instruction and the row has its own system message")
                    rec["messages"] = [{"role": "system", "content": src.instruction}, *rec["messages"]]
                rec["meta"] = {**rec["meta"], "file": str(path), "line": lineno}
                if src.license:
                    rec["meta"]["license"] = src.license
                records.append(rec)
                continue
            except RowError as exc:
                err = exc
        rejected.append(Rejection(str(path), lineno, rid, err.rule, err.detail, raw=obj))
    if src.sample is not None and src.sample < len(records):
        rng = random.Random(src.seed)
        keep = sorted(rng.sample(range(len(records)), src.sample))
        records = [records[i] for i in keep]
    return records, rejected


def _csv_rows(path: Path, src) -> Iterator[tuple[int, Any, Exception | None]]:
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (src.prompt_column, src.completion_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise TunegateError(
                f"{path}:1: column(s) {', '.join(missing)} not in the header {reader.fieldnames} "
                f"(set data.sources[].prompt_column / completion_column)"
            )
        try:
            for row in reader:
                lineno = reader.line_num
                yield lineno, [
                    {"role": "user", "content": row[src.prompt_column] or ""},
                    {"role": "assistant", "content": row[src.completion_column] or ""},
                ], None
        except UnicodeDecodeError as exc:
            raise TunegateError(f"{path}: invalid UTF-8 after line {reader.line_num}: {exc}") from None


_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case, whitespace collapsed: the key for exact-after-normalisation overlap checks (case C23)."""
    return _WS.sub(" ", text).strip().lower()


def prompt_text(record: dict[str, Any]) -> str:
    """Everything the model is shown, without the answer: the user turns (system excluded), or the prompt."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")
    return record["prompt"]


def reference_answer(record: dict[str, Any]) -> str:
    if "messages" in record:
        return record["messages"][-1]["content"]
    return record["completion"]


def row_hash(record: dict[str, Any]) -> str:
    """sha256 of what a golden row says (its prompt and answer), independent of file position."""
    import hashlib

    body = {k: record[k] for k in ("messages", "prompt", "completion") if k in record}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
