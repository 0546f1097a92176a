"""Tool calling (function calling): reading a model's calls from its answer, and checking them against the
allowed values of a ground truth, in the manner of the Berkeley Function Calling Leaderboard's AST checker
(BFCL, Patil et al., "The Berkeley Function Calling Leaderboard (BFCL): From Tool Use to Agentic Evaluation of
Large Language Models", ICML 2025; github.com/ShishirPatil/gorilla, `bfcl_eval/eval_checker/ast_eval/`).

Shapes:
    a call          {"name": str, "arguments": {arg: value}}
    a ground truth  [{function name: {arg: [allowed value, ...]}}, ...]: one entry per expected call; `""` among an
                    argument's allowed values means it may be left out. `[]` means no call is expected (BFCL's
                    irrelevance rows: none of the given functions applies).

An answer holds calls in one of two ways (`parse_calls`):
    - `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, one call each (or a JSON list of calls),
      the format of Hermes-style and Qwen2.5 chat templates and of tunegate's own fallback rendering
      (`tunegate.data.format.TOOL_FALLBACK`); text around the blocks is ignored;
    - the whole answer as JSON (a ```json fence allowed): one call object or a list of them.
A call object is {"name", "arguments"} (also "parameters"; arguments as an object or a JSON string), OpenAI's
{"type": "function", "function": {"name", "arguments"}}, or BFCL's {name: {arg: value}}. An answer with neither
holds no call (a text answer). A `<tool_call>` block that does not parse is an attempted call that cannot be
read: the answer scores 0 on every row, irrelevance rows included.

`check_calls` follows BFCL's rules without the function schemas (a row metric sees only answer and reference):
the count of calls must equal the count expected; the calls are matched to the expected ones in any order (an
exact bipartite matching; BFCL matches greedily, which can only miss a match this finds); a call matches when
its name is the expected one, every argument it passes is allowed with one of its allowed values, and every
expected argument it leaves out has `""` among its allowed values. Values compare as BFCL's checker compares
them: strings after `standardize` (spaces and `,./-_*^` removed, lower case, `'` as `"`), lists element by
element in order, objects key by key against the allowed values of each key, numbers by value (BFCL converts an
int to a float where the schema says float; with no schema, 5 and 5.0 are equal either way), booleans only to
booleans.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_STANDARDIZE = re.compile(r"[ ,./\-_*^]")


class CallParseError(ValueError):
    """An answer's `<tool_call>` block, or a reference, that cannot be read as calls."""


def standardize(text: str) -> str:
    """BFCL's string comparison key: spaces and the characters `,./-_*^` removed, lower case, `'` as `"`
    ("April 1, 2024" == "april 1 2024")."""
    return _STANDARDIZE.sub("", text).lower().replace("'", '"')


def _call(obj: Any) -> dict[str, Any]:
    """One call object in any accepted shape -> {"name": str, "arguments": dict}. Raises CallParseError."""
    if not isinstance(obj, dict):
        raise CallParseError(f"a call must be an object, got {type(obj).__name__}")
    if obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if "name" in obj:
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise CallParseError(f"the arguments of {obj['name']!r} are not JSON") from None
        name = obj["name"]
    elif len(obj) == 1 and isinstance(next(iter(obj.values())), dict):  # BFCL's {name: {arg: value}}
        name, args = next(iter(obj.items()))
    else:
        raise CallParseError(f"a call needs a 'name' and 'arguments', got keys {sorted(obj)[:5]}")
    if not isinstance(name, str) or not name.strip():
        raise CallParseError("a call's name must be a non-empty string")
    if not isinstance(args, dict):
        raise CallParseError(f"the arguments of {name!r} must be an object, got {type(args).__name__}")
    return {"name": name, "arguments": args}


def _calls_of(value: Any) -> list[dict[str, Any]]:
    return [_call(v) for v in value] if isinstance(value, list) else [_call(value)]


def parse_calls(answer: str) -> list[dict[str, Any]]:
    """The calls an answer makes, in order, as [{"name": str, "arguments": dict}, ...]; [] for a text answer.

    Raises:
        CallParseError: a `<tool_call>` block whose content is not a call (or list of calls) in JSON.
    """
    blocks = TOOL_CALL_BLOCK.findall(answer)
    if blocks:
        calls = []
        for block in blocks:
            try:
                value = json.loads(block)
            except (ValueError, RecursionError):
                raise CallParseError(f"a <tool_call> block is not JSON: {block[:80]!r}") from None
            calls += _calls_of(value)
        return calls
    text = answer.strip()
    fence = _FENCE.match(text)
    text = fence.group(1) if fence else text
    if not text.startswith(("{", "[")):
        return []
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return []  # text that happens to start with a bracket: an answer in words, not a call
    try:
        return _calls_of(value)
    except CallParseError:
        return []  # JSON, but not calls (an answer that is data): no call


def parse_ground_truth(reference: str) -> list[dict[str, dict[str, list]]]:
    """A reference's JSON text -> BFCL's ground truth [{name: {arg: [allowed values]}}, ...] ([] = no call).

    Raises:
        CallParseError: not JSON, or not a list of one-key objects mapping arguments to lists of allowed values.
    """
    try:
        value = json.loads(reference)
    except (ValueError, TypeError, RecursionError):
        raise CallParseError(f"the reference is not JSON: {str(reference)[:80]!r} (metric tool_call needs a ground "
                             "truth such as [{\"fn\": {\"arg\": [1]}}], the reference of rows with tools)") from None
    if not isinstance(value, list):
        raise CallParseError(f"a ground truth is a list of expected calls, got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not (isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry.values())), dict)):
            raise CallParseError(f"ground truth [{i}] must be {{function name: {{argument: [allowed values]}}}}")
        for arg, allowed in next(iter(entry.values())).items():
            if not isinstance(allowed, list):
                raise CallParseError(f"ground truth [{i}] argument {arg!r}: the allowed values must be a list")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same_value(value: Any, allowed: Any) -> bool:
    """One value against one allowed value, by BFCL's rules (see the module docstring)."""
    if isinstance(value, str) and isinstance(allowed, str):
        return standardize(value) == standardize(allowed)
    if _is_number(value) and _is_number(allowed):
        return float(value) == float(allowed)
    if isinstance(value, list) and isinstance(allowed, list):
        return len(value) == len(allowed) and all(_same_value(v, a) for v, a in zip(value, allowed))
    if isinstance(value, dict) and isinstance(allowed, dict):
        return _arguments_match(value, allowed)
    return type(value) is type(allowed) and value == allowed  # booleans, None


def _allowed(value: Any, allowed_values: list) -> bool:
    """Whether `value` equals one of an argument's allowed values (a nested object's values are themselves lists
    of allowed values, as in BFCL's ground truth)."""
    return any(_same_value(value, a) for a in allowed_values if not (isinstance(a, str) and a == ""))


def _arguments_match(arguments: dict[str, Any], expected: dict[str, list]) -> bool:
    for arg, value in arguments.items():
        allowed = expected.get(arg)
        if not isinstance(allowed, list) or not _allowed(value, allowed):
            return False  # an argument not expected, or a value not allowed
    return all(arg in arguments or "" in allowed for arg, allowed in expected.items())


def call_matches(call: dict[str, Any], expected: dict[str, dict[str, list]]) -> bool:
    """Whether one call ({"name", "arguments"}) is the one expected call ({name: {arg: [allowed]}})."""
    (name, args), = expected.items()
    return call["name"] == name and _arguments_match(call["arguments"], args)


def check_calls(calls: list[dict[str, Any]], ground_truth: list[dict[str, dict[str, list]]]) -> bool:
    """Whether `calls` are the expected calls of `ground_truth`, in any order (see the module docstring).

    An empty ground truth is right exactly when there is no call. Shapes: calls [{"name", "arguments"}, ...],
    ground_truth [{name: {arg: [allowed values]}}, ...].
    """
    if len(calls) != len(ground_truth):
        return False
    fits = [[j for j, call in enumerate(calls) if call_matches(call, exp)] for exp in ground_truth]
    taken: dict[int, int] = {}  # call index -> expected index; Kuhn's augmenting paths

    def assign(i: int, seen: set[int]) -> bool:
        for j in fits[i]:
            if j not in seen:
                seen.add(j)
                if j not in taken or assign(taken[j], seen):
                    taken[j] = i
                    return True
        return False

    return all(assign(i, set()) for i in range(len(ground_truth)))


def tool_call(prediction: str, reference: str) -> float:
    """Row metric `tool_call`: 1.0 when the answer's calls are the reference's expected calls (BFCL's AST
    accuracy; "no call" is right on a row whose reference is `[]`), else 0.0. An answer that cannot be read
    scores 0.0.

    reference: the JSON text of a ground truth (`parse_ground_truth`), as `records.reference_answer` gives it for
    a row with tools. Raises CallParseError (a ValueError) when the reference is not one: a golden set without
    tool calls, scored with this metric by mistake.
    """
    expected = parse_ground_truth(reference)
    try:
        calls = parse_calls(prediction)
    except CallParseError:
        return 0.0
    return float(check_calls(calls, expected))


def _allow_exactly(value: Any) -> Any:
    """A concrete value as an allowed value: an object's values become one-element lists of allowed values."""
    if isinstance(value, dict):
        return {k: [_allow_exactly(v)] for k, v in value.items()}
    if isinstance(value, list):
        return [_allow_exactly(v) for v in value]
    return value


def _concrete(allowed: Any) -> Any:
    """An allowed value as a concrete one: an object's keys take their first allowed value (left out when `""`)."""
    if isinstance(allowed, dict):
        return {k: _concrete(v[0]) for k, v in allowed.items() if isinstance(v, list) and v and v[0] != ""}
    if isinstance(allowed, list):
        return [_concrete(v) for v in allowed]
    return allowed


def ground_truth_of_calls(calls: list[dict[str, Any]]) -> list[dict[str, dict[str, list]]]:
    """Concrete calls [{"name", "arguments"}] as the ground truth that allows exactly them: each value the only
    allowed one. The reference of a chat row with tools and no `ground_truth` of its own."""
    return [{c["name"]: {arg: [_allow_exactly(v)] for arg, v in c["arguments"].items()}} for c in calls]


def calls_of_ground_truth(ground_truth: list[dict[str, dict[str, list]]]) -> list[dict[str, Any]]:
    """One concrete call per expected call: each argument's first allowed value, left out when that value is `""`
    (optional; BFCL lists its canonical value first), nested objects alike. What a BFCL row's training answer
    calls; it passes `check_calls` against the ground truth it came from."""
    out = []
    for entry in ground_truth:
        (name, args), = entry.items()
        out.append({"name": name, "arguments": _concrete(args)})
    return out
