"""The canonical record, the readers that produce it, and the structural validation rules.

A record is a dict:
    {"id": str, "source": str, "messages": [{"role": ..., "content": str}, ...], "meta": {...}}
or, for plain prompt/completion text (no chat template):
    {"id": str, "source": str, "prompt": str, "completion": str, "meta": {...}}
A preference pair is a chat whose final assistant turn is the chosen answer, plus the rejected one:
    {..., "messages": [..., {"role": "assistant", "content": chosen}], "rejected": str}
An unpaired (KTO) row is a chat whose final assistant turn is the judged answer, plus its label:
    {..., "messages": [..., {"role": "assistant", "content": answer}], "label": bool}
Raw text for continued pretraining:
    {"id": str, "source": str, "text": str, "meta": {...}}
A chat with tool calling (function calling) also carries the function schemas it may call, OpenAI's `tools`;
an assistant turn may call them and `tool` turns hold the results (`normalize_tools`, `normalize_messages`):
    {..., "tools": [{"type": "function", "function": {"name", "description", "parameters"}}, ...],
     "messages": [..., {"role": "assistant", "content": str, "tool_calls": [{"type": "function",
                  "function": {"name": str, "arguments": {...}}}, ...]}, {"role": "tool", "content": str}, ...]}
and, read from BFCL (format `bfcl`), the allowed values of its expected calls: `"ground_truth": [{name: {arg:
[allowed values]}}, ...]` (tunegate.evals.toolcall). Its reference answer is the JSON of that ground truth.
So every method's rows share one shape where they can: the prompt is always `messages[:-1]`.

Readers never raise on a bad row: each row is either a record or a `Rejection` naming the file, the line
and the rule it broke (datatrove's "keep, or drop with a reason"). Validation here needs no tokenizer and
no model; the template and loss-mask checks that need the tokenizer are in `tunegate.data.format`.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from tunegate import TunegateError
from tunegate.core.io import UTF8_BOM, bounded_lines

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

    @classmethod
    def of_row(cls, record: dict[str, Any], rule: str, detail: str) -> Rejection:
        """The rejection of a row that was read and validated: its file, line and id come from the row."""
        return cls(record["meta"]["file"], record["meta"]["line"], record["id"], rule, detail)

    def to_json(self) -> dict[str, Any]:
        """The rejected.jsonl row: a shallow dict (no deep copy of `raw`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

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
    """A message's content as a string. A list of typed text parts is joined (case C06 in docs/cases.md)."""
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


def normalize_messages(messages: Any, require_final_assistant: bool = True,
                       tools: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Check a chat and return it with string contents. Raises RowError with the rule broken.

    Rules: a list of {role, content} objects; roles are system/user/assistant; at most one system message,
    first; then user and assistant alternate, starting with user; no empty or whitespace-only turn (C07);
    the chat ends with an assistant turn (something to learn from).

    tools: the row's function schemas (`normalize_tools`), or None. With tools, an assistant turn may also carry
    `tool_calls` (its content may then be empty or null) and `tool` turns follow it with the results, one per
    call (`_check_tool_turns`); without, either is refused (rule `tool_calls`).
    """
    if not isinstance(messages, list):
        raise RowError("wrong_type", f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise RowError("empty_conversation", "messages is empty")
    roles = ROLES + ("tool",) if tools is not None else ROLES
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role == "tool" and tools is None:
            raise RowError("tool_calls", f"messages[{i}] is a tool result, and the row declares no `tools`")
        if role not in roles:
            raise RowError("unknown_role", f"messages[{i}].role {role!r} is not one of {', '.join(roles)}")
        calls = (m.get("tool_calls") or None) if role == "assistant" else None  # exports write null or [] for none
        if calls is not None and tools is None:
            raise RowError("tool_calls", f"messages[{i}] calls tools, and the row declares no `tools`")
        if "content" not in m and not calls:
            raise RowError("missing_field", f"messages[{i}] has no content")
        content = "" if calls and m.get("content") is None else _text_content(m.get("content"), f"messages[{i}]")
        if not content.strip() and not calls:
            raise RowError("empty_turn", f"messages[{i}] ({role}) is empty or whitespace")
        turn: dict[str, Any] = {"role": role, "content": content}
        if calls is not None:
            turn["tool_calls"] = _normalize_calls(calls, tools, f"messages[{i}]")
        if role == "tool":
            turn |= {k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)}
        out.append(turn)
    body = out[1:] if out[0]["role"] == "system" else out
    offset = len(out) - len(body)
    if tools is not None:
        _check_tool_turns(body, offset, require_final_assistant)
        return out
    for i, m in enumerate(body):
        if m["role"] == "system":
            raise RowError("role_order", f"messages[{i + offset}]: a system message is only allowed first")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError("role_order", f"messages[{i + offset}] is {m['role']}, expected {expected} (turns must alternate, user first)")
    if not body:
        raise RowError("role_order", "only a system message, no user turn")
    if require_final_assistant and body[-1]["role"] != "assistant":
        raise RowError("role_order", "the conversation must end with an assistant turn")
    return out


def normalize_tools(tools: Any) -> list[dict[str, Any]]:
    """A row's `tools` in OpenAI's shape, [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}, ...]; a bare function object ({"name", "description", "parameters"}, BFCL's shape) is
    wrapped. The schemas are kept as they are (BFCL writes `"type": "dict"` for objects). Raises RowError
    (rule `invalid_tools`): not a non-empty list of objects, a function without a name or with non-object
    parameters, or a name declared twice."""
    if not isinstance(tools, list) or not tools:
        raise RowError("invalid_tools", f"tools must be a non-empty list of function schemas, got {type(tools).__name__}")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            fn = tool["function"]
        elif isinstance(tool, dict) and "name" in tool and "type" not in tool:
            fn = tool
        else:
            raise RowError("invalid_tools", f"tools[{i}] must be {{type: function, function: {{name, parameters}}}} or {{name, parameters}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RowError("invalid_tools", f"tools[{i}] has no function name")
        if name in names:
            raise RowError("invalid_tools", f"tools[{i}]: function {name!r} is declared twice")
        if not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            raise RowError("invalid_tools", f"tools[{i}] ({name}): parameters must be an object and description a string")
        names.add(name)
        out.append({"type": "function", "function": fn})
    return out


def _normalize_calls(calls: Any, tools: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls` as [{"type": "function", "function": {"name", "arguments": dict}}, ...]
    (plus each call's `id` when it has one); OpenAI's JSON-string arguments are parsed. Raises RowError: rule
    `tool_calls` for a malformed call, `unknown_tool` for a call to a function the row does not declare."""
    if not isinstance(calls, list) or not calls:
        raise RowError("tool_calls", f"{where}.tool_calls must be a non-empty list")
    declared = {t["function"]["name"] for t in tools}
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError("tool_calls", f"{where}.tool_calls[{j}] must be {{type: function, function: {{name, arguments}}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise RowError("tool_calls", f"{where}.tool_calls[{j}] ({fn['name']}): arguments are not JSON") from None
        if not isinstance(args, dict):
            raise RowError("tool_calls", f"{where}.tool_calls[{j}] ({fn['name']}): arguments must be an object")
        if fn["name"] not in declared:
            raise RowError("unknown_tool", f"{where}.tool_calls[{j}] calls {fn['name']!r}, which the row's tools do not declare")
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _check_tool_turns(body: list[dict[str, Any]], offset: int, require_final_assistant: bool) -> None:
    """Turn order in a chat with tools (after the system message): user first; a user turn is followed by an
    assistant turn; an assistant turn that calls k tools by exactly k tool turns, then an assistant turn; any
    other assistant turn by a user turn. Raises RowError (rule `role_order`)."""
    if not body:
        raise RowError("role_order", "only a system message, no user turn")
    pending = 0  # tool results still owed to the last assistant turn's calls
    for i, m in enumerate(body):
        where = f"messages[{i + offset}]"
        previous = body[i - 1] if i else None
        if m["role"] == "system":
            raise RowError("role_order", f"{where}: a system message is only allowed first")
        if m["role"] == "tool":
            if pending == 0:
                raise RowError("role_order", f"{where} is a tool result that answers no remaining tool call")
            pending -= 1
            continue
        if pending:
            raise RowError("role_order", f"{where} is {m['role']}, but {pending} tool call(s) still await their result")
        expected = "user" if previous is None or (previous["role"] == "assistant") else "assistant"
        if m["role"] != expected:
            raise RowError("role_order", f"{where} is {m['role']}, expected {expected} (turns must alternate, user first; "
                                         "tool results follow the assistant turn that called)")
        pending = len(m.get("tool_calls", ()))
    if require_final_assistant and body[-1]["role"] != "assistant":
        raise RowError("role_order", "the conversation must end with an assistant turn")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """An Anthropic HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...") -> chat messages.

    Source: Bai et al. 2022, the format of github.com/anthropics/hh-rlhf. Raises RowError when the text has
    no "Human:" / "Assistant:" turns.
    """
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError("hh_format", "expected a transcript of \"\\n\\nHuman: ...\\n\\nAssistant: ...\" turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]
    if len(turns) > 1 and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # a prompt ending in "Assistant:" (the answer follows elsewhere)
    return turns


def _as_messages(value: Any, key: str, role: str) -> list[dict[str, str]]:
    """A field that is a string (one turn of `role`), an HH transcript, or a list of messages."""
    if isinstance(value, str):
        if _HH_TURN.search(value) and value.startswith("\n\n"):
            return parse_hh_transcript(value)
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise RowError("wrong_type", f"'{key}' must be a string or a list of messages, got {type(value).__name__}")


def _split_pair(obj: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """A preference row -> (prompt messages ending in a user turn, chosen answer, rejected answer)."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise RowError("missing_field", f"no '{key}' field")
    chosen = _as_messages(obj["chosen"], "chosen", "assistant")
    rejected = _as_messages(obj["rejected"], "rejected", "assistant")
    if "prompt" in obj:
        prompt = normalize_messages(_as_messages(obj["prompt"], "prompt", "user"), require_final_assistant=False)
        # UltraFeedback-style rows repeat the prompt inside chosen and rejected: keep only what follows it
        def after_prompt(turns):
            head = [(m.get("role"), str(m.get("content", "")).strip()) if isinstance(m, dict) else None for m in turns[: len(prompt)]]
            same = head == [(m["role"], m["content"].strip()) for m in prompt]
            return turns[len(prompt):] if same and len(turns) > len(prompt) else turns
        chosen, rejected = after_prompt(chosen), after_prompt(rejected)
    else:  # implicit prompt: the turns both conversations share, up to the last user turn
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and (chosen[n - 1].get("role") if isinstance(chosen[n - 1], dict) else None) != "user":
            n -= 1
        if n == 0:
            raise RowError("missing_field", "no 'prompt' field, and chosen and rejected share no prompt turns")
        prompt, chosen, rejected = normalize_messages(chosen[:n], require_final_assistant=False), chosen[n:], rejected[n:]
    if prompt[-1]["role"] != "user":
        raise RowError("role_order", "the prompt must end with a user turn")
    answers = []
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != 1 or not isinstance(turns[0], dict) or turns[0].get("role", "assistant") != "assistant":
            raise RowError("role_order", f"'{key}' must be one assistant answer after the prompt")
        text = _text_content(turns[0].get("content"), key).strip()
        if not text:
            raise RowError("empty_turn", f"'{key}' is empty or whitespace")
        answers.append(text)
    return prompt, answers[0], answers[1]


NEAR_IDENTICAL = 0.95  # difflib ratio at or above which a preference pair is flagged (case C08)


def pair_similarity(a: str, b: str) -> float:
    """difflib's ratio of two answers after whitespace/case normalisation, 0..1."""
    import difflib

    return difflib.SequenceMatcher(None, normalize_text(a), normalize_text(b), autojunk=False).ratio()


def record_from_object(obj: Any, fmt: str, default_id: str, source: str, text_column: str = "text") -> dict[str, Any]:
    """One parsed JSON object -> a canonical record. Raises RowError."""
    if not isinstance(obj, dict):
        raise RowError("wrong_type", f"a row must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    rid = str(rid)
    meta = {k: v for k, v in obj.items() if k not in ("id", "messages", "prompt", "completion", "chosen", "rejected", "label", text_column)}
    if fmt == "preference":
        prompt, chosen, rejected = _split_pair(obj)
        if normalize_text(chosen) == normalize_text(rejected):  # case C08: no signal, DPO loss sits flat
            raise RowError("identical_pair", "chosen and rejected are the same after whitespace normalisation")
        if len(chosen) + len(rejected) < 20_000:  # difflib is quadratic; long answers are not compared
            sim = pair_similarity(chosen, rejected)
            if sim >= NEAR_IDENTICAL:
                meta["near_identical"] = round(sim, 3)
        messages = [*prompt, {"role": "assistant", "content": chosen}]
        return {"id": rid, "source": source, "messages": messages, "rejected": rejected, "meta": meta}
    if fmt == "kto":
        for key in ("prompt", "completion", "label"):
            if key not in obj:
                raise RowError("missing_field", f"no '{key}' field")
        label = obj["label"]
        if not isinstance(label, bool):
            raise RowError("wrong_type", f"'label' must be true or false, got {label!r}")
        prompt = normalize_messages(_as_messages(obj["prompt"], "prompt", "user"), require_final_assistant=False)
        answer = _as_messages(obj["completion"], "completion", "assistant")
        messages = normalize_messages([*prompt, *answer])
        if len(messages) != len(prompt) + 1:
            raise RowError("role_order", "'completion' must be one assistant answer after the prompt")
        return {"id": rid, "source": source, "messages": messages, "label": label, "meta": meta}
    if fmt == "text":
        if text_column not in obj:
            raise RowError("missing_field", f"no '{text_column}' field (data.sources[].text_column)")
        text = obj[text_column]
        if not isinstance(text, str):
            raise RowError("wrong_type", f"'{text_column}' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RowError("empty_turn", f"'{text_column}' is empty or whitespace")
        return {"id": rid, "source": source, "text": text, "meta": meta}
    if fmt == "alpaca":
        meta = {k: v for k, v in meta.items() if k not in ("instruction", "input", "output", "system")}
        return {"id": rid, "source": source, "messages": normalize_messages(_alpaca_messages(obj)), "meta": meta}
    if fmt == "sharegpt":
        meta = {k: v for k, v in meta.items() if k not in ("conversations", "conversation")}
        return {"id": rid, "source": source, "messages": normalize_messages(_sharegpt_messages(obj)), "meta": meta}
    if fmt == "openai_log":
        messages, provenance = _openai_log_messages(obj)
        meta = {k: v for k, v in meta.items() if k not in ("request", "response")} | provenance
        if "id" not in obj:
            rid = str(obj.get("custom_id") or provenance.get("id") or default_id)
        return {"id": rid, "source": source, "messages": normalize_messages(messages), "meta": meta}
    if fmt == "chat":
        if "messages" not in obj:
            raise RowError("missing_field", "no 'messages' field")
        if obj.get("tools") is not None:  # tool calling: the schemas travel with the row
            tools = normalize_tools(obj["tools"])
            return {"id": rid, "source": source, "messages": normalize_messages(obj["messages"], tools=tools),
                    "tools": tools, "meta": {k: v for k, v in meta.items() if k != "tools"}}
        return {"id": rid, "source": source, "messages": normalize_messages(obj["messages"]), "meta": meta}
    if fmt == "bfcl":
        meta = {k: v for k, v in meta.items() if k not in ("question", "function", "ground_truth")}
        return {"id": rid, "source": source, **_bfcl_row(obj, rid), "meta": {**meta, "category": bfcl_category(rid)}}
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


# ---- row shapes beyond chat: each becomes canonical messages -------------------------------------------

# The answer a BFCL irrelevance row trains on: none of its functions applies, so the right answer calls none.
BFCL_NO_CALL_ANSWER = "None of the available functions can do this, so I will not call any."


def bfcl_category(row_id: str) -> str:
    """A BFCL row's category, its id without the trailing number: "simple_python_12" -> "simple_python"."""
    head, _, tail = row_id.rpartition("_")
    return head if head and tail.isdigit() else row_id


def _bfcl_row(obj: dict[str, Any], rid: str) -> dict[str, Any]:
    """A BFCL question row (Patil et al. 2025; ../shared/data/bfcl/SOURCE.md) with its `ground_truth` (joined in by
    the reader from possible_answer/) -> {"messages", "tools", "ground_truth"}.

    `question` holds one turn (a list of messages; multi-turn rows are refused, rule `unsupported_row`),
    `function` the schemas. The assistant answer calls each expected function with its first allowed values
    (`toolcall.calls_of_ground_truth`); an irrelevance row (no ground truth file, id `irrelevance_*`) expects no
    call and answers BFCL_NO_CALL_ANSWER. Raises RowError.
    """
    from tunegate.evals.toolcall import CallParseError, calls_of_ground_truth, parse_ground_truth

    question, functions = obj.get("question"), obj.get("function")
    if question is None or functions is None:
        raise RowError("missing_field", "a BFCL row needs 'question' and 'function'")
    if not isinstance(question, list) or len(question) != 1:  # BFCL's multi_turn categories
        raise RowError("unsupported_row", "only single-turn BFCL rows are read (question = [[messages]])")
    tools = normalize_tools(functions)
    if "ground_truth" in obj:
        try:
            truth = parse_ground_truth(json.dumps(obj["ground_truth"]))
        except CallParseError as exc:
            raise RowError("invalid_ground_truth", str(exc)) from None
    elif "irrelevance" in bfcl_category(rid):
        truth = []
    else:
        raise RowError("missing_field", f"no ground truth for {rid!r} in possible_answer/ (only irrelevance rows have none)")
    declared = {t["function"]["name"] for t in tools}
    unknown = [name for entry in truth for name in entry if name not in declared]
    if unknown:
        raise RowError("invalid_ground_truth", f"the ground truth calls {unknown[0]!r}, which 'function' does not declare")
    calls = calls_of_ground_truth(truth)
    answer = ({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in calls]}
              if calls else {"role": "assistant", "content": BFCL_NO_CALL_ANSWER})
    if not isinstance(question[0], list):
        raise RowError("wrong_type", "question[0] must be a list of messages")
    return {"messages": normalize_messages([*question[0], answer], tools=tools), "tools": tools, "ground_truth": truth}

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _alpaca_messages(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Stanford Alpaca (Taori et al. 2023): `instruction`, optional `input`, `output`, optional `system`.

    The input follows the instruction after a blank line in the user turn, the output is the assistant turn.
    """
    for key in ("instruction", "output"):
        if obj.get(key) is None:
            raise RowError("missing_field", f"no '{key}' field (alpaca rows have instruction, input, output)")
    for key in ("instruction", "input", "output", "system"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise RowError("wrong_type", f"'{key}' must be a string, got {type(obj[key]).__name__}")
    user = obj["instruction"].strip()
    if (obj.get("input") or "").strip():
        user = f"{user}\n\n{obj['input'].strip()}"
    system = [{"role": "system", "content": obj["system"]}] if (obj.get("system") or "").strip() else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def _sharegpt_messages(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """ShareGPT: `conversations` (or `conversation`) of {"from": human|gpt|system, "value": text} turns."""
    turns = obj.get("conversations", obj.get("conversation"))
    if turns is None:
        raise RowError("missing_field", "no 'conversations' field (sharegpt rows hold [{from, value}, ...])")
    if not isinstance(turns, list):
        raise RowError("wrong_type", f"'conversations' must be a list, got {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError("wrong_type", f"conversations[{i}] must be an object, got {type(t).__name__}")
        speaker = t.get("from", t.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise RowError("unknown_role", f"conversations[{i}].from {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        if "value" not in t and "content" not in t:
            raise RowError("missing_field", f"conversations[{i}] has no value")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": t.get("value", t.get("content"))})
    return out


def _openai_log_messages(obj: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A logged chat completion -> (request messages + the first choice's answer, provenance meta).

    Accepts {"request": {"messages": ...}, "response": <chat.completion>} and the OpenAI batch API's shapes
    ({"request": {"body": ...}} / {"response": {"status_code": 200, "body": ...}}). A `developer` turn counts
    as a system turn. A failed response, an answer cut by max_tokens (finish_reason "length") and a tool-call
    answer with no text are rejected: none of them is an answer to learn from.
    """
    request, response = obj.get("request"), obj.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise RowError("missing_field", "an OpenAI log row needs 'request' and 'response' objects")
    request = request.get("body", request) if isinstance(request.get("body"), dict) else request
    if "status_code" in response:
        if response["status_code"] != 200:
            raise RowError("failed_response", f"response status_code {response['status_code']}")
        response = response.get("body") or {}
    if "messages" not in request:
        raise RowError("missing_field", "request has no 'messages'")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RowError("missing_field", "response has no choices")
    choice = choices[0]
    if choice.get("finish_reason") == "length":
        raise RowError("truncated_response", "the logged answer was cut by max_tokens (finish_reason 'length')")
    answer = choice.get("message") or {}
    if answer.get("content") is None:
        raise RowError("non_text_content", "the logged answer has no text content (a tool call?)")
    if not isinstance(request["messages"], list):
        raise RowError("wrong_type", "request.messages must be a list")
    messages = [
        {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in request["messages"]
    ] + [{"role": "assistant", "content": answer["content"]}]
    meta = {k: response[k] for k in ("id", "model", "created") if k in response}
    if "model" in request and "model" not in meta:
        meta["model"] = request["model"]
    if isinstance(response.get("usage"), dict):
        meta["usage"] = response["usage"]
    return messages, meta


def _rename_columns(obj: Any, columns: dict[str, str]) -> Any:
    """`columns` maps canonical field -> the source's name for it; the source's field is renamed."""
    if not columns or not isinstance(obj, dict):
        return obj
    out = {k: v for k, v in obj.items() if k not in columns.values()}
    for canonical, name in columns.items():
        if name not in obj:
            raise RowError("missing_field", f"no '{name}' field (data.sources[].columns maps {canonical} to it)")
        out[canonical] = obj[name]
    return out


# ---- file types: every reader yields (row number, object or raw text, error) ----------------------------


def parse_json(text: str) -> Any:
    """`json.loads(text)`, with every way it can fail on hostile input as a RowError ("invalid_json"): a syntax
    error, nesting deeper than Python's parser allows (RecursionError), or a number too long to convert."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError("invalid_json", exc.msg + f" at column {exc.colno}") from None
    except RecursionError:
        raise RowError("invalid_json", "nested deeper than the JSON reader allows") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() converts
        raise RowError("invalid_json", str(exc)[:200]) from None


def _too_large(size: int, limit: int) -> RowError:
    return RowError("row_too_large", f"{size:,} bytes > max_row_bytes {limit:,} (data.sources[].max_row_bytes)")


def _jsonl_rows(path: Path, limit: int) -> Iterator[tuple[int, Any, Exception | None]]:
    with open(path, "rb") as f:
        for lineno, raw, oversize in bounded_lines(f, limit):
            if oversize is not None:
                yield lineno, raw.decode("utf-8", "replace"), _too_large(oversize, limit)
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, raw[:200].decode("utf-8", "replace"), RowError("invalid_utf8", str(exc))
                continue
            text = text.rstrip("\r\n")
            try:
                yield lineno, parse_json(text), None
            except RowError as exc:
                yield lineno, text[:200], exc


def _json_rows(path: Path, limit: int) -> Iterator[tuple[int, Any, Exception | None]]:
    """A .json file: one JSON array of rows (Alpaca's release, many exports; row n = element n), or JSON lines.

    An array is parsed whole (its rows are then checked against max_row_bytes in `read_source`): a source too
    large to hold in memory belongs in JSONL, read a line at a time."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(UTF8_BOM).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_rows(path, limit)
        return
    try:
        rows = parse_json(path.read_bytes().removeprefix(UTF8_BOM).decode("utf-8"))
    except (UnicodeDecodeError, RowError) as exc:
        raise TunegateError(f"{path}: not a valid JSON array ({exc})") from None
    for i, obj in enumerate(rows, start=1):
        yield i, obj, None


def _csv_rows(path: Path, src) -> Iterator[tuple[int, Any, Exception | None]]:
    """CSV / TSV rows as dicts keyed by the header; row numbers are file lines (the header is line 1).

    A UTF-8 byte-order mark is skipped. Lines are read at most max_row_bytes at a time and decoded one by one: a
    row over the limit, in one line or across quoted lines ("row_too_large"), a line that is not UTF-8
    ("invalid_utf8") or a line the csv module refuses ("invalid_csv") rejects its row, and reading goes on with the
    next one (`_CsvLines`). The csv module's field limit is raised to max_row_bytes, so a field is never refused
    before its row is.
    """
    previous = csv.field_size_limit(src.max_row_bytes)  # the csv module's limit is process-wide: put it back after
    try:
        yield from _csv_dict_rows(path, src)
    finally:
        csv.field_size_limit(previous)


class _CsvLines:
    """The lines of a CSV file as text for `csv.reader`, from `bounded_lines`, read so that a bad line costs its
    own row and never puts the parser out of step: a line that is not UTF-8 is decoded with replacement
    characters (quotes are ASCII, so the parser sees every quote), and a line over the limit, or the rest of a
    row once the row is over the limit, is passed on as a stand-in holding as many quote characters (odd or even)
    as the line it stands for, so a quoted field spanning it still ends where it ends. Either way the error is
    recorded in `row_errors` for the row being read; `start_row` is called before each row. Old Mac line endings
    (a lone CR) end lines too, as the csv module's newline="" reading did."""

    def __init__(self, f, limit: int):
        self.limit, self.lineno, self.pending = limit, 0, []
        self.quotes = 0  # quote characters in the parts of an over-limit line read past
        self.lines = bounded_lines(f, limit, on_skip=self._count_quotes)
        self.row_errors: list[RowError] = []
        self.row_bytes = 0

    def _count_quotes(self, chunk: bytes) -> None:
        self.quotes += chunk.count(b'"')

    def start_row(self) -> None:
        self.row_errors, self.row_bytes = [], 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pending:
            return self.pending.pop(0)
        self.quotes = 0
        self.lineno, raw, oversize = next(self.lines)
        ending = "\n" if raw.endswith(b"\n") or oversize is not None else ""
        size = oversize if oversize is not None else len(raw)
        self.row_bytes += size
        if oversize is not None or self.row_bytes > self.limit:
            if not self.row_errors or self.row_errors[-1].rule != "row_too_large":
                self.row_errors.append(_too_large(self.row_bytes if oversize is None else oversize, self.limit))
            quotes = self.quotes if oversize is not None else raw.count(b'"')  # on_skip saw every byte of a long line
            return '"' * (quotes % 2) + " " + ending  # the parser's quote state, without the text; never a blank line
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.row_errors.append(RowError("invalid_utf8", f"line {self.lineno}: {exc}"))
            text = raw.decode("utf-8", "replace")
        if "\r" in text.rstrip("\r\n"):  # lone CRs end lines (old Mac / Excel for Mac exports)
            parts = [p for p in re.split(r"(?<=\r)(?!\n)", text) if p]
            self.pending = parts[1:]
            return parts[0]
        return text


def _csv_dict_rows(path: Path, src) -> Iterator[tuple[int, Any, Exception | None]]:
    with open(path, "rb") as f:
        lines = _CsvLines(f, src.max_row_bytes)
        reader = csv.DictReader(lines, delimiter="\t" if path.suffix == ".tsv" else ",")
        try:
            names = reader.fieldnames or []
        except csv.Error as exc:
            raise TunegateError(f"{path}:1: the header cannot be read ({exc})") from None
        if lines.row_errors:
            raise TunegateError(f"{path}:1: the header cannot be read ({lines.row_errors[0]})")
        _check_columns(path, src, names)
        while True:
            lines.start_row()
            start = lines.lineno + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, f"(row starting at line {start})", RowError("invalid_csv", str(exc))
                continue
            if lines.row_errors:
                yield start, f"(row starting at line {start})", lines.row_errors[0]
                continue
            yield lines.lineno, row, None


def _check_columns(where: Any, src, names: list[str]) -> None:
    """Fail before reading any row when a column the source maps is not there."""
    renamed = [c for c in names if c not in src.columns.values()] + list(src.columns)  # after `columns` renames
    missing = [c for c in src.columns.values() if c not in names]
    missing += [c for c in ((src.prompt_column, src.completion_column) if src.format == "csv" else ()) if c not in renamed]
    if missing:
        raise TunegateError(
            f"{where}:1: column(s) {', '.join(missing)} not in the header {names} "
            f"(set data.sources[].prompt_column / completion_column / columns)"
        )


def jsonable(value: Any) -> Any:
    """A value from Parquet / Arrow / `datasets` as plain JSON: timestamps and dates as ISO 8601, bytes as
    base64, Decimal and numpy scalars as numbers; containers recursively. Rows are written as JSON lines."""
    import base64
    import datetime as dt
    import decimal

    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return float(value)
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    if hasattr(value, "tolist"):  # numpy arrays
        return jsonable(value.tolist())
    return str(value)


SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")


def _split_of(path: Path, root: Path) -> str | None:
    """The split a Hub-style Parquet file belongs to: `train-00000-of-00001.parquet`, `train.parquet` or a
    `train/` folder; None when its path names no split."""
    for part in [*path.relative_to(root).parent.parts, path.stem]:
        for split in SPLIT_NAMES:
            if part == split or part.startswith(f"{split}-") or part.startswith(f"{split}_"):
                return split
    return None


def _parquet_rows(files: list[Path], src) -> Iterator[tuple[int, Any, Exception | None]]:
    """Parquet rows (pyarrow, read in record batches); row n counts from 1 across the files in order."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    n = 0
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:  # truncated, not Parquet: the file, not a row
            raise TunegateError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
        _check_columns(path, src, pf.schema_arrow.names)
        try:
            for batch in pf.iter_batches(batch_size=4096):
                try:
                    objs = batch.to_pylist()
                except (UnicodeDecodeError, pa.ArrowException, ValueError):
                    objs = None  # a cell Python cannot take (a string column holding bytes that are not UTF-8)
                for i in range(batch.num_rows):
                    n += 1
                    if objs is not None:
                        yield n, jsonable(objs[i]), None
                        continue
                    try:
                        yield n, jsonable(batch.slice(i, 1).to_pylist()[0]), None
                    except (UnicodeDecodeError, pa.ArrowException, ValueError) as exc:
                        rule = "invalid_utf8" if isinstance(exc, UnicodeDecodeError) else "unreadable_row"
                        yield n, f"(row {n} of {path.name})", RowError(rule, f"{type(exc).__name__}: {str(exc)[:200]}")
        except (pa.ArrowException, OSError) as exc:  # a corrupt page after the rows read so far
            raise TunegateError(f"{path}: not a readable Parquet file after row {n} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _dataset_rows(ds, where: str, src) -> Iterator[tuple[int, Any, Exception | None]]:
    """A `datasets` Dataset (or DatasetDict: `src.split` is taken) row by row; row n counts from 1."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise TunegateError(f"{where}: no split {src.split!r}; it has {', '.join(ds.keys())} (data.sources[].split)")
        ds = ds[src.split]
    _check_columns(where, src, list(ds.column_names))
    for i, obj in enumerate(ds, start=1):
        yield i, jsonable(obj), None


def _rows(src) -> tuple[str, Iterator[tuple[int, Any, Exception | None]]]:
    """(the name rejections cite, the rows) for any supported file type or a Hub id."""
    if src.hub is not None:
        import datasets

        if src.revision is None:
            from tunegate.core.console import console

            console.print(f"[yellow]hf://{src.hub}: no `revision` pinned; the data stage cannot tell when the dataset "
                          "changes upstream (its fingerprint holds the id and revision, not the content)[/yellow]")
        try:
            ds = datasets.load_dataset(src.hub, split=src.split, revision=src.revision)
        except Exception as exc:  # offline, unknown id, gated: the message says which
            raise TunegateError(f"hf://{src.hub}: cannot load the Hub dataset ({type(exc).__name__}: {exc})") from None
        return src.name, _dataset_rows(ds, src.name, src)
    path = Path(src.path)
    if src.format == "bfcl":
        return str(path), _bfcl_rows(path, src.max_row_bytes)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            return src.name, _dataset_rows(datasets.load_from_disk(str(path)), src.name, src)
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise TunegateError(f"{path}: a folder source must be a `datasets` save_to_disk folder or hold .parquet files")
        splits = {_split_of(f, path) for f in files} - {None}
        if splits:  # a Hub snapshot: train-*.parquet beside test-*.parquet; never mix splits
            if src.split not in splits:
                raise TunegateError(f"{path}: no {src.split!r} Parquet files; it has {', '.join(sorted(splits))} (data.sources[].split)")
            files = [f for f in files if _split_of(f, path) == src.split]
        return src.name, _parquet_rows(files, src)
    if not path.is_file():
        raise TunegateError(f"{path}: data file not found")
    if path.suffix in (".csv", ".tsv"):
        return str(path), _csv_rows(path, src)
    if path.suffix == ".parquet":
        return str(path), _parquet_rows([path], src)
    if path.suffix == ".json":
        return str(path), _json_rows(path, src.max_row_bytes)
    return str(path), _jsonl_rows(path, src.max_row_bytes)


BFCL_QUESTIONS = "BFCL_v*_*.json"  # question files in a BFCL data folder; ground truth in possible_answer/<same name>


def bfcl_files(path: Path) -> list[tuple[Path, Path | None]]:
    """(question file, its ground-truth file or None) for a BFCL question file or a folder of them (BFCL's
    layout: `possible_answer/<same name>` beside the questions; irrelevance files have none)."""
    questions = sorted(path.glob(BFCL_QUESTIONS)) if path.is_dir() else [path]
    if not questions:
        raise TunegateError(f"{path}: no BFCL question files ({BFCL_QUESTIONS}) in this folder")
    return [(q, q.parent / "possible_answer" / q.name if (q.parent / "possible_answer" / q.name).is_file() else None)
            for q in questions]


def _bfcl_rows(path: Path, limit: int) -> Iterator[tuple[int, Any, Exception | None]]:
    """BFCL question rows, each with its `ground_truth` from possible_answer/ when there is one; row n counts
    from 1 across the question files in name order (the id names the row). A ground-truth line that cannot be
    read leaves its row without one (then rejected unless it is an irrelevance row)."""
    n = 0
    for questions, answers in bfcl_files(path):
        truth = {}
        for _, obj, err in (_jsonl_rows(answers, limit) if answers else ()):
            if err is None and isinstance(obj, dict) and "id" in obj and "ground_truth" in obj:
                truth[str(obj["id"])] = obj["ground_truth"]
        for _, obj, err in _jsonl_rows(questions, limit):
            n += 1
            if err is None and isinstance(obj, dict) and str(obj.get("id")) in truth:
                obj = {**obj, "ground_truth": truth[str(obj["id"])]}
            yield n, obj, err


def text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in a parsed row: its strings (keys included), numbers as their digits, 4 for any
    other leaf. What max_row_bytes bounds in rows that are not read line by line (JSON arrays, Parquet,
    `datasets`). Iterative: a row nested as deep as the JSON parser allows is counted, not a RecursionError."""
    return _text_scan(value)[0]


MAX_ROW_DEPTH = 64  # levels of nesting in a row; a chat row has 4, Python's pickle and deepcopy fail near 1,000


# Control characters no text needs: C0 but tab, line feed, vertical tab, form feed and carriage return; DEL; C1.
# NUL truncates C strings, ESC starts terminal escape sequences (a row printed by `data-preview` could set the
# window title or clear the screen); a tokenizer turns them into byte tokens the model then learns to emit.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def control_character_problem(text: str) -> str | None:
    """None, or what rule `control_character` says about the first control character in `text` (CONTROL_CHARACTERS)."""
    m = CONTROL_CHARACTERS.search(text)
    return None if m is None else f"holds the control character U+{ord(m.group()):04X} at offset {m.start()}: not text"


def _text_scan(value: Any) -> tuple[int, bool, int, str | None]:
    """(text_bytes, whether a string holds a lone surrogate: JSON's "\\ud800" escape parses to one, and no
    UTF-8 writer, tokenizer or hash downstream can encode it; the row's nesting depth; the first control character
    problem of its strings, control_character_problem)."""
    total, surrogate, depth, control, stack = 0, False, 0, None, [(value, 1)]
    while stack:
        v, level = stack.pop()
        depth = max(depth, level)
        if isinstance(v, str):
            if control is None:
                control = control_character_problem(v)
            if v.isascii():
                total += len(v)
                continue
            try:
                total += len(v.encode("utf-8"))
            except UnicodeEncodeError:
                surrogate = True
                total += len(v.encode("utf-8", "surrogatepass"))
        elif isinstance(v, dict):
            stack.extend((k, level + 1) for k in v.keys())
            stack.extend((x, level + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, level + 1) for x in v)
        elif isinstance(v, bool) or v is None:
            total += 4
        elif isinstance(v, (int, float)):
            total += len(repr(v)) if not isinstance(v, int) or v.bit_length() < 10_000 else v.bit_length() // 3
        else:
            total += 4
    return total, surrogate, depth, control


def _clip_raw(obj: Any, n: int = 200) -> str:
    """What rejected.jsonl keeps of a row too large to copy: the start of its JSON."""
    return json.dumps(obj, ensure_ascii=False, default=str)[:n]


def source_files(src) -> list[Path]:
    """The local files a source reads (their sha256 goes into the data stage's fingerprint); [] for a Hub id."""
    if src.path is None:
        return []
    path = Path(src.path)
    if src.format == "bfcl" and path.is_file():
        return [p for pair in bfcl_files(path) for p in pair if p is not None]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]


def parse_row(obj: Any, src, default_id: str, source: str) -> dict[str, Any]:
    """One row of a source (any format) -> a canonical record, with the source's instruction, its answer read as
    labels when the project's task is classification or multilabel (`_label_answer`). Raises RowError."""
    obj = _rename_columns(obj, src.columns)
    task = getattr(src, "_task", None)
    if task is not None and task.kind in ("classification", "multilabel"):
        obj = _label_list_answer(obj, src, task)
    rec = _parse_row(obj, src, default_id, source)
    if task is not None and task.kind in ("classification", "multilabel"):
        _label_answer(rec, src, task)
    return rec


def _label_list_answer(obj: Any, src, task) -> Any:
    """A row whose answer is a list, before the chat reader would join a list as text parts: for a multi-label
    task the list (or null / missing: the empty set, as NLU++ writes a row with no intent) becomes the answer in
    canonical text form (tunegate.evals.labels.canonical_answer); for a classification task a list is refused.
    The answer is the `csv` completion column, the `prompt_completion` completion, or the last `chat` message's
    content when it is a list of plain strings (typed text parts stay text). Raises RowError."""
    from tunegate.evals.labels import LabelError, canonical_answer

    if not isinstance(obj, dict):
        return obj
    key = {"csv": src.completion_column, "prompt_completion": "completion"}.get(src.format)
    msgs = obj.get("messages") if src.format == "chat" else None
    last = msgs[-1] if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else None
    if last is not None and isinstance(last.get("content"), list) and all(isinstance(p, str) for p in last["content"]):
        where, value = "the last message's content", last["content"]
    elif key is not None and (not isinstance(obj.get(key), str) and (task.kind == "multilabel" or isinstance(obj.get(key), list))):
        where, value = f"'{key}'", obj.get(key)
    else:
        return obj
    if task.kind == "classification":
        raise RowError("wrong_type", f"{where} is a list; a classification answer is one label (task.kind multilabel reads label lists)")
    try:
        answer = canonical_answer(value, task)
    except LabelError as exc:
        raise RowError(exc.rule, f"{where}: {exc}") from None
    if last is not None and where.startswith("the last"):
        return {**obj, "messages": [*msgs[:-1], {**last, "content": answer}]}
    return {**obj, key: answer}


def _label_answer(rec: dict[str, Any], src, task) -> None:
    """The row's answer as a label (classification: trimmed) or label set (multilabel: canonical form), then the
    source's `drop_labels` (RowError `dropped_label`) and `label_map`. Rows without one answer are left alone."""
    from tunegate.evals.labels import LabelError, canonical_answer, canonical_labels, label_set
    from tunegate.evals.metrics import normalize_answer

    if rec.get("tools") or ("messages" in rec and rec["messages"][-1].get("tool_calls")):
        raise RowError("tool_calls", "a tool-call row has no label answer (task.kind classification / multilabel read labels)")
    if "messages" in rec and rec["messages"][-1]["role"] == "assistant" and "rejected" not in rec:
        get, put = (lambda: rec["messages"][-1]["content"]), (lambda v: rec["messages"][-1].update(content=v))
    elif "completion" in rec:
        get, put = (lambda: rec["completion"]), (lambda v: rec.update(completion=v))
    else:
        return
    if task.kind == "multilabel":
        try:
            answer = canonical_answer(get(), task)
        except LabelError as exc:
            raise RowError(exc.rule, f"answer: {exc}") from None
        labels = list(label_set(answer, task))
    else:
        answer = get().strip()
        labels = [normalize_answer(answer)]
    dropped = {normalize_answer(label) for label in src.drop_labels}
    hit = sorted(set(labels) & dropped)
    if hit:
        raise RowError("dropped_label", f"answer label {hit[0]!r} is in this source's drop_labels")
    if src.label_map:
        mapping = {normalize_answer(k): v for k, v in src.label_map.items()}
        if task.kind == "multilabel":
            parts = [p.strip() for p in answer.split(task.separator.strip())]
            answer = canonical_answer(task.separator.join(mapping.get(normalize_answer(p), p) for p in parts), task)
        else:
            answer = mapping.get(normalize_answer(answer), answer)
    if task.labels is not None:  # a closed set given: an answer outside it is a fault of the data, not a new class
        declared = {normalize_answer(label): label for label in [*task.labels, *([task.abstain_label] if task.abstain_label else [])]}
        found = label_set(answer, task) if task.kind == "multilabel" else {normalize_answer(answer)}
        unknown = sorted(found - set(declared))
        if unknown:
            raise RowError("unknown_label", f"answer label {unknown[0]!r} is not in task.labels")
        # written as task.labels spells them: one training target per label, whatever the source's case
        answer = canonical_labels([declared[k] for k in found], task) if task.kind == "multilabel" else declared[normalize_answer(answer)]
    put(answer)


def _parse_row(obj: Any, src, default_id: str, source: str) -> dict[str, Any]:
    tabular = src.path is not None and Path(src.path).suffix in (".csv", ".tsv")
    if tabular and src.format == "kto" and isinstance(obj.get("label"), str):  # CSV cells are text: true/false, 1/0
        cell = obj["label"].strip().lower()
        if cell in ("true", "false", "1", "0"):
            obj = {**obj, "label": cell in ("true", "1")}
    if src.format == "csv":
        if not isinstance(obj, dict):
            raise RowError("wrong_type", f"a row must be an object, got {type(obj).__name__}")
        messages = [{"role": "user", "content": obj.get(src.prompt_column) or ""},
                    {"role": "assistant", "content": obj.get(src.completion_column) or ""}]
        rec = {"id": default_id, "source": source, "messages": normalize_messages(messages), "meta": {}}
    else:
        rec = record_from_object(obj, src.format, default_id, source, src.text_column)
    if src.instruction and "messages" in rec:
        if rec["messages"][0]["role"] == "system":
            raise RowError("role_order", "the source sets an instruction and the row has its own system message")
        rec["messages"] = [{"role": "system", "content": src.instruction}, *rec["messages"]]
    return rec


def held_out(row_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a row id falls in the held-out part of a split by id (config.HoldoutConfig): the first 8 bytes of
    sha256("<seed>:<id>") as a number in [0, 1) is below `fraction`. Depends on the id alone."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def read_source(src, role: str = "train", limit: int | None = None) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Read one configured source (a `config.SourceConfig`). Returns (records, rejections); never raises on a row.

    limit: read only the first `limit` rows (after the header), as `tunegate validate` does; `holdout` (a split by
    id, `held_out`) and `sample` still apply, in that order.

    Raises:
        TunegateError: the file or folder is missing or unreadable, a mapped column is not in the header, or a
            Hub dataset cannot be loaded.
    """
    if src.path is not None and not Path(src.path).exists():
        raise TunegateError(f"{src.path}: data file not found (data.{'golden' if role == 'golden' else 'sources'}.path)")
    where, rows = _rows(src)
    name = Path(where).name if src.path is not None else where.removeprefix("hf://")
    stem = Path(src.path).stem if src.path is not None and Path(src.path).is_file() else name.rsplit("/", 1)[-1].replace(":", "-")
    records: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    for lineno, obj, err in itertools.islice(rows, limit):
        default_id = f"{stem}:{lineno}"
        rid = str(obj.get("id")) if isinstance(obj, dict) and "id" in obj else None
        if err is None:
            size, surrogate, depth, control = _text_scan(obj)
            if depth > MAX_ROW_DEPTH:  # parsed, but every recursive step after (copy, pickle, JSON) would fail
                err, obj = RowError("too_deep", f"nested {depth} levels deep; at most {MAX_ROW_DEPTH}"), f"(nested {depth} levels deep)"
            elif size > src.max_row_bytes:  # a JSON array's or Parquet row, already in memory
                err, obj = _too_large(size, src.max_row_bytes), _clip_raw(obj)
            elif surrogate:
                err = RowError("invalid_unicode", "a string holds a lone surrogate (a \\ud800-\\udfff escape): not text")
            elif control:
                err = RowError("control_character", f"a string {control}")
        if err is None:
            try:
                rec = parse_row(obj, src, default_id, name)
                rec["meta"] = {**rec["meta"], "file": where, "line": lineno}
                if src.license:
                    rec["meta"]["license"] = src.license
                records.append(rec)
                continue
            except RowError as exc:
                err = exc
            except (RecursionError, MemoryError, ValueError, TypeError, KeyError, AttributeError) as exc:
                # a row no rule foresaw: rejected with what went wrong, never a traceback that stops the stage
                err = RowError("unreadable_row", f"{type(exc).__name__}: {str(exc)[:200]}")
        rejected.append(Rejection(where, lineno, rid, err.rule, err.detail, raw=obj))
    if src.holdout is not None:
        h = src.holdout
        records = [r for r in records if held_out(r["id"], h.fraction, h.seed) == (h.part == "held_out")]
    if src.sample is not None and src.sample < len(records):
        rng = random.Random(src.seed)
        keep = sorted(rng.sample(range(len(records)), src.sample))
        records = [records[i] for i in keep]
    return records, rejected


_WS = re.compile(r"\s+")


_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")  # soft hyphen, zero-width and direction marks


def normalize_text(text: str) -> str:
    """Unicode NFKC (a decomposed "café" is the composed one, a full-width letter the letter), invisible characters
    removed (zero-width spaces, soft hyphens), lower case, whitespace collapsed: the key for exact-after-
    normalisation overlap and duplicate checks (case C23)."""
    import unicodedata

    if not text.isascii():
        text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return _WS.sub(" ", text).strip().lower()


def record_kind(record: dict[str, Any]) -> str:
    """chat, plain, preference, kto or text (see the module docstring)."""
    if "text" in record:
        return "text"
    if "messages" not in record:
        return "plain"
    if "rejected" in record:
        return "preference"
    if "label" in record:
        return "kto"
    return "chat"


def text_slots(record: dict[str, Any]) -> list[tuple[Any, str]]:
    """Every free-text field of a record as (where, text); `where` is a message index or a field name.

    What PII redaction scans and rewrites (`with_texts`), so no kind of record leaves a field unscanned.
    """
    if "text" in record:
        return [("text", record["text"])]
    if "messages" not in record:
        return [("prompt", record["prompt"]), ("completion", record["completion"])]
    slots: list[tuple[Any, str]] = [(i, m["content"]) for i, m in enumerate(record["messages"])]
    if "rejected" in record:
        slots.append(("rejected", record["rejected"]))
    return slots


def with_texts(record: dict[str, Any], texts: dict[Any, str]) -> dict[str, Any]:
    """A copy of the record with the fields named by `text_slots` replaced."""
    out = dict(record)
    if "messages" in record:
        out["messages"] = [{**m, "content": texts.get(i, m["content"])} for i, m in enumerate(record["messages"])]
    for key in ("text", "prompt", "completion", "rejected"):
        if key in texts:
            out[key] = texts[key]
    return out


def prompt_text(record: dict[str, Any]) -> str:
    """Everything the model is shown, without the answer: the user turns (system excluded), or the prompt.

    Raw text (continued pretraining) is all prompt: a golden prompt inside it is contamination.
    """
    if "text" in record:
        return record["text"]
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")
    return record["prompt"]


def row_text(record: dict[str, Any]) -> str:
    """What duplicate detection compares: every turn's text (system turns excluded; a rejected answer and a KTO
    label included, so opposite labels are not duplicates), prompt + completion, or raw text."""
    if "text" in record:
        return record["text"]
    if "messages" in record:
        extra = ([record["rejected"]] if "rejected" in record else []) + ([f"label: {record['label']}"] if "label" in record else [])
        return "\n".join([turn_text(m) for m in record["messages"] if m["role"] != "system"] + extra)
    return record["prompt"] + "\n" + record["completion"]


def turn_text(message: dict[str, Any]) -> str:
    """A turn's text, with the JSON of its tool calls when it has any (what duplicate detection compares)."""
    calls = message.get("tool_calls")
    return message["content"] + ("\n" + json.dumps(calls, ensure_ascii=False, sort_keys=True) if calls else "")


def reference_answer(record: dict[str, Any]) -> str:
    """What a golden row's answer is scored against: the final assistant turn's text, or the completion.

    A row with `tools` is scored on its calls: the reference is the JSON text of the expected calls of its final
    turn as a BFCL ground truth ([{name: {arg: [allowed values]}}], tunegate.evals.toolcall), the row's own
    `ground_truth` when it has one (BFCL), else the final turn's calls each allowing its own values only; `[]`
    when that turn calls nothing."""
    if "tools" in record and "messages" in record:
        from tunegate.evals.toolcall import ground_truth_of_calls

        truth = record.get("ground_truth")
        if truth is None:
            truth = ground_truth_of_calls([c["function"] for c in record["messages"][-1].get("tool_calls", ())])
        return json.dumps(truth, ensure_ascii=False)
    if "messages" in record:
        return record["messages"][-1]["content"]
    return record["completion"]


def row_hash(record: dict[str, Any]) -> str:
    """sha256 of what a golden row says (its prompt and answer), independent of file position."""
    import hashlib

    body = {k: record[k] for k in ("messages", "prompt", "completion", "rejected", "label", "text", "tools", "ground_truth") if k in record}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def dedupe_ids(records: list[dict[str, Any]]) -> None:
    """Row ids must be unique (every step after reading finds rows by id): the source's name prefixes a repeated
    id, and an id still repeated (twice in one file, or 1 and "1") gets its line too: `train.jsonl:7@12`."""
    seen: Counter[str] = Counter(r["id"] for r in records)
    for r in records:
        if seen[r["id"]] > 1:
            r["id"] = f"{r['source']}:{r['id']}"
    seen = Counter(r["id"] for r in records)
    for r in records:
        if seen[r["id"]] > 1:
            r["id"] = f"{r['id']}@{r['meta'].get('line', '?')}"
