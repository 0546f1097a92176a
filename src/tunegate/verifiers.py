"""Verifiers: score a completion against the row's reference answer, for GRPO (Shao et al. 2024, DeepSeekMath).

A verifier is a callable `(completion: str, reference: str, row: dict) -> float` in [0, 1]. `reference` is the
row's reference answer (`records.reference_answer`: its final assistant turn; for a row with tools, the JSON of
its expected calls); `row` is the whole training record {"id", "source", "messages", "meta"}.

Built-ins (`train.grpo.verifier`):
    numeric       GSM8K style: the final number (after `####` if present) within `train.grpo.tolerance`
    exact_label   normalised string equality (case, whitespace, surrounding quotes and punctuation ignored)
    json_schema   the completion is JSON (a ```json fence is allowed) valid against `train.grpo.json_schema`
    regex         `re.search(train.grpo.pattern, completion)`
    ifeval        fraction of the row's IFEval instructions followed, strict (Zhou et al. 2023)
    tool_call     the completion's function calls are the row's expected ones (BFCL's AST check, Patil et al. 2025;
                  the eval metric `tool_call`, tunegate.evals.toolcall)
Or a function in a file of the project: "verifiers/reward.py:score" (path relative to the project file). The
file is loaded by path, never by a dotted import, and its sha256 goes in the manifest.

The GRPO recipe builds its dataset with columns `prompt` (the conversation without the final assistant turn),
`reference` (that turn's text) and `row_json` (the training record, JSON-encoded); TRL's GRPOTrainer passes the
columns other than `prompt` to reward functions as keyword arguments, one list entry per completion, and
`reward_function(verifier)` turns a verifier into such a reward function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunegate import TunegateError
from tunegate.evals.metrics import final_number, json_schema_metric, normalize_answer

if TYPE_CHECKING:
    from tunegate.config import GrpoConfig

log = logging.getLogger(__name__)

Score = Callable[[str, str, dict], float]  # (completion, reference, row) -> score in [0, 1]

BUILTINS = ("numeric", "exact_label", "json_schema", "regex", "ifeval", "tool_call")
KEY = "train.grpo.verifier"


# --- built-ins -------------------------------------------------------------------------------------------------


def numeric(completion: str, reference: str, row: dict | None = None, *, tolerance: float = 1e-6) -> float:
    """GSM8K (Cobbe et al. 2021): 1.0 when the final numbers of completion and reference differ by <= `tolerance`.

    The final number is what follows the last `####` if present, else the last number in the text; commas, `$`
    and a sentence's full stop are ignored, negatives and decimals are read ("#### 1,234" == "The answer is
    1234."). 0.0 when either has no number. Same rule as the eval metric `numeric_match`.
    """
    a, b = final_number(completion), final_number(reference)
    return float(a is not None and b is not None and abs(a - b) <= tolerance)


def exact_label(completion: str, reference: str, row: dict | None = None) -> float:
    """Classification labels: 1.0 when completion and reference are equal after collapsing whitespace,
    case-folding and stripping surrounding quotes and punctuation ('"Card_Arrival."' == 'card_arrival'), else
    0.0. The normalisation is the eval metric `exact_match`'s (tunegate.evals.metrics.normalize_answer)."""
    return float(normalize_answer(completion).casefold() == normalize_answer(reference).casefold())


class JsonSchema:
    """Structured output: 1.0 when the completion (optionally inside a ```json fence) parses as JSON and is valid
    against `schema` (JSON Schema; the draft named by `$schema`, Draft 2020-12 when absent, via `jsonschema`'s
    `validator_for`), else 0.0. Raises TunegateError at construction when the schema itself is invalid."""

    def __init__(self, schema: dict[str, Any], source: str = "schema"):
        import jsonschema

        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise TunegateError(f"{source}: not a valid JSON Schema ({e.message})") from None
        self._metric = json_schema_metric(schema)

    def __call__(self, completion: str, reference: str = "", row: dict | None = None) -> float:
        return self._metric(completion, reference)


class Regex:
    """Format rewards: 1.0 when `re.search(pattern, completion)` finds a match, else 0.0 (Python `re` syntax)."""

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)  # re.error propagates; build_verifier names the config key

    def __call__(self, completion: str, reference: str = "", row: dict | None = None) -> float:
        return float(self.pattern.search(completion) is not None)


def ifeval(completion: str, reference: str, row: dict) -> float:
    """Verifiable instructions (IFEval, Zhou et al. 2023, arXiv:2311.07911): the fraction of the row's
    instructions the completion follows, strict criterion, with lm-eval's checkers (tunegate.evals.ifeval).

    `row["meta"]` holds IFEval's `instruction_id_list` (e.g. ["punctuation:no_comma"]) and `kwargs` (one dict per
    instruction, e.g. [{}]); the prompt handed to the checkers is the row's last user turn. Raises ValueError
    when the meta lacks them (scored 0.0 and counted as an error during training).
    """
    import random

    from tunegate.evals.ifeval import checkers

    meta = row.get("meta") or {}
    ids, kwargs = meta.get("instruction_id_list"), meta.get("kwargs")
    if not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(f"row {row.get('id')!r}: meta needs instruction_id_list and one kwargs dict per instruction")
    prompt = next((m.get("content", "") for m in reversed(row.get("messages", [])) if m.get("role") == "user"), "")
    utils = checkers()
    inp = utils.InputExample(key=row.get("id", 0), instruction_id_list=list(ids), prompt=prompt, kwargs=kwargs)
    # As in ifeval.score: a checker given an argument it rejects draws a random one; seed per row, restore after.
    state = random.getstate()
    random.seed(f"ifeval:{row.get('id')}")
    try:
        result = utils.test_instruction_following_strict(inp, completion)
    finally:
        random.setstate(state)
    return sum(result.follow_instruction_list) / len(ids)


def tool_call(completion: str, reference: str, row: dict | None = None) -> float:
    """Tool calling: 1.0 when the completion's calls (`<tool_call>` blocks or JSON) are the expected calls of
    `reference`, a BFCL ground truth in JSON ([{name: {arg: [allowed values]}}]; `[]`: no call expected), in any
    order, else 0.0. The checker is the eval metric's (tunegate.evals.toolcall.tool_call, after BFCL's AST
    checker, Patil et al. 2025), so training rewards what the gate measures. A reference that is not a ground
    truth raises ValueError (a row without tools; scored 0.0 and counted as an error during training)."""
    from tunegate.evals.toolcall import tool_call as check

    return check(completion, reference)


def load_file_verifier(spec: str, project_root: Path) -> tuple[Score, Path, str]:
    """Load "path/to/file.py:function" (path relative to `project_root`) by file location, not by dotted import
    (tunegate.project_code.load_project_function).

    Returns (function, resolved path, sha256 hex of the file's bytes); the bytes hashed are the bytes executed.
    Raises TunegateError naming the file and `train.grpo.verifier` when the spec is malformed, the file resolves
    outside the project folder (symbolic links followed), is missing or fails to import (syntax error, exception), or the function is missing, not callable, or cannot
    take (completion, reference, row).
    """
    from tunegate.project_code import load_project_function

    return load_project_function(spec, project_root, KEY, ("", "", {}), "(completion, reference, row)", "verifier")


# --- the verifier object ---------------------------------------------------------------------------------------


@dataclass
class Verifier:
    """A built verifier. `fn(completion, reference, row) -> float`; `sha256` of the file for file verifiers.

    `score` is the training-safe call: an exception, or a result that is not a number in [0, 1], scores 0.0 and is
    counted in `errors` (the first is logged, the last kept in `last_error`).
    """

    name: str
    fn: Score
    sha256: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # JSON-ready settings for the manifest
    errors: int = 0
    calls: int = 0
    last_error: str | None = None

    def score(self, completion: str, reference: str, row: dict) -> float:
        """The verifier's score in [0, 1]; 0.0 (counted in `errors`) when it raises or returns something else."""
        self.calls += 1
        try:
            value = self.fn(completion, reference, row)
            out = float(value)
            if not (0.0 <= out <= 1.0):  # also catches NaN
                raise ValueError(f"returned {value!r}, not a score in [0, 1]")
        except Exception as e:  # noqa: BLE001  one bad completion must not stop training
            self.errors += 1
            self.last_error = f"row {row.get('id') if isinstance(row, dict) else None!r}: {type(e).__name__}: {e}"
            if self.errors == 1:
                log.warning("verifier %s failed (scored 0.0; further failures are counted): %s", self.name, self.last_error)
            return 0.0
        return out

    def info(self) -> dict[str, Any]:
        """JSON-ready description for the manifest: name, sha256, settings and the error count so far."""
        return {"name": self.name, "sha256": self.sha256, **self.params, "calls": self.calls, "errors": self.errors}


def build_verifier(cfg: GrpoConfig, project_root: Path) -> Verifier:
    """The verifier `cfg.verifier` names, built and checked without scoring anything.

    Relative `cfg.json_schema` and file-verifier paths resolve against `project_root` (the project file's folder).
    Raises TunegateError: unknown name (the message lists the built-ins), `train.grpo.json_schema` or
    `train.grpo.pattern` missing or invalid for json_schema / regex, lm-eval missing for ifeval, and the file
    verifier errors of `load_file_verifier`.
    """
    name = cfg.verifier.strip()
    if name == "numeric":
        tol = cfg.tolerance

        def numeric_tol(completion: str, reference: str, row: dict) -> float:
            return numeric(completion, reference, row, tolerance=tol)

        return Verifier("numeric", numeric_tol, params={"tolerance": tol})
    if name == "exact_label":
        return Verifier("exact_label", exact_label)
    if name == "json_schema":
        if cfg.json_schema is None:
            raise TunegateError("train.grpo.json_schema: the json_schema verifier needs a JSON Schema file")
        path = cfg.json_schema if Path(cfg.json_schema).is_absolute() else (Path(project_root) / cfg.json_schema).resolve()
        if not path.is_file():
            raise TunegateError(f"train.grpo.json_schema: {path}: file not found")
        data = path.read_bytes()
        try:
            schema = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TunegateError(f"train.grpo.json_schema: {path}: not JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise TunegateError(f"train.grpo.json_schema: {path}: a JSON Schema is an object, got {type(schema).__name__}")
        fn = JsonSchema(schema, source=f"train.grpo.json_schema: {path}")
        return Verifier("json_schema", fn, params={"schema": str(path), "schema_sha256": hashlib.sha256(data).hexdigest()})
    if name == "regex":
        if cfg.pattern is None:
            raise TunegateError("train.grpo.pattern: the regex verifier needs a pattern")
        try:
            fn = Regex(cfg.pattern)
        except re.error as e:
            raise TunegateError(f"train.grpo.pattern: {cfg.pattern!r} is not a valid regular expression ({e})") from None
        return Verifier("regex", fn, params={"pattern": cfg.pattern})
    if name == "tool_call":
        return Verifier("tool_call", tool_call)
    if name == "ifeval":
        from tunegate.evals import ifeval as ifeval_eval

        ifeval_eval.checkers()  # fail now, with the install command, not as zero rewards mid-run
        return Verifier("ifeval", ifeval, params={"sentence_splitter": ifeval_eval.sentence_splitter()})
    if ":" in name or name.endswith(".py"):
        fn, path, sha256 = load_file_verifier(name, project_root)
        return Verifier(name, fn, sha256=sha256, params={"path": str(path), "function": name.rpartition(":")[2]})
    raise TunegateError(f"{KEY}: unknown verifier {name!r}; built-ins: {', '.join(BUILTINS)}, or 'path/to/file.py:function'")


# --- TRL adapter -----------------------------------------------------------------------------------------------


def _completion_text(completion: Any) -> str:
    """A completion as TRL hands it: a string, or a conversation [{"role": "assistant", "content": ...}, ...]
    whose last message's content is taken (a list of content parts is joined by its text parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return "" if content is None else str(content)
    return ""


def reward_function(verifier: Verifier) -> Callable[..., list[float]]:
    """A reward function for TRL's GRPOTrainer: `reward(prompts, completions, **kwargs) -> list[float]`.

    Needs the dataset columns `reference` (list[str]) and `row_json` (list[str], the JSON-encoded training record),
    which TRL passes as keyword arguments, one entry per completion. A completion the verifier fails on scores 0.0
    and is counted in `verifier.errors`; when TRL passes `log_metric`, the batch's error fraction is logged as
    `verifier_errors`. `__name__` is `verifier_<name>` (non-word characters as `_`), the name TRL logs rewards by.
    Raises ValueError when the columns are missing or their lengths differ from `completions`.
    """

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        refs, rows = kwargs.get("reference"), kwargs.get("row_json")
        if refs is None or rows is None:
            raise ValueError("reward function needs dataset columns 'reference' and 'row_json' (see tunegate.verifiers)")
        if not (len(refs) == len(rows) == len(completions)):
            raise ValueError(f"{len(completions)} completions but {len(refs)} references and {len(rows)} rows")
        errors_before = verifier.errors
        out = []
        for completion, ref, row_json in zip(completions, refs, rows):
            row = json.loads(row_json) if isinstance(row_json, str) else row_json
            out.append(verifier.score(_completion_text(completion), ref, row))
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and out:
            log_metric("verifier_errors", (verifier.errors - errors_before) / len(out))
        return out

    reward.__name__ = reward.__qualname__ = "verifier_" + re.sub(r"\W+", "_", verifier.name)
    return reward


def reward_variance_smoke(scores_by_prompt: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How many prompt groups have constant reward (C18 in docs/cases.md): in GRPO the advantage is the reward minus its group
    mean, so a constant group (or a single generation) gives every completion advantage 0 and no gradient.

    Returns {"groups": n, "zero_variance_groups": k, "fraction": k / n}. Raises ValueError for no groups or an
    empty group.
    """
    if not scores_by_prompt:
        raise ValueError("reward_variance_smoke: no groups")
    k = 0
    for i, group in enumerate(scores_by_prompt):
        if not group:
            raise ValueError(f"reward_variance_smoke: group {i} has no scores")
        if max(group) - min(group) <= 1e-12:
            k += 1
    n = len(scores_by_prompt)
    return {"groups": n, "zero_variance_groups": k, "fraction": k / n}
