"""GRPO verifiers: built-ins, the file verifier, the TRL reward adapter and the zero-variance smoke check."""

import hashlib
import json
import subprocess
import sys

import pytest

from tunegate import TunegateError
from tunegate.config import GrpoConfig
from tunegate.verifiers import (
    BUILTINS,
    Verifier,
    build_verifier,
    exact_label,
    numeric,
    reward_function,
    reward_variance_smoke,
)


def row(answer="", meta=None, user="Q?", id="r1"):
    return {"id": id, "source": "t", "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "meta": meta or {}}


def build(tmp_path, **kw):
    return build_verifier(GrpoConfig(**kw), tmp_path)


# --- numeric -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, reference, expected", [
    ("The answer is 1234.", "Work: 1000 + 234\n#### 1,234", 1.0),
    ("#### $1,234", "#### 1234", 1.0),
    ("12 + 30 = 42, so #### 42", "#### 42", 1.0),       # the number after ####
    ("It is 42, not 41", "#### 42", 0.0),               # no ####: the last number (41) is the answer
    ("The change is -3.5 degrees.", "#### -3.5", 1.0),
    ("The change is 3.5 degrees.", "#### -3.5", 0.0),    # the sign counts
    ("-3.50", "-3.5", 1.0),
    ("I don't know", "#### 7", 0.0),                     # no number in the completion
    ("7", "no number here", 0.0),                        # no number in the reference
    ("#### 5 (the answer)\nsteps: 9", "#### 5", 0.0),  # the last number after #### counts: 9
])
def test_numeric_gsm8k(completion, reference, expected):
    assert numeric(completion, reference, {}) == expected


def test_numeric_uses_the_last_hash_marker_and_tolerance(tmp_path):
    assert numeric("#### 3 then #### 4", "#### 4", {}) == 1.0
    v = build(tmp_path, verifier="numeric", tolerance=0.01)
    assert v.fn("3.141", "#### 3.14", {}) == 1.0
    assert v.fn("3.16", "#### 3.14", {}) == 0.0
    assert build(tmp_path, verifier="numeric").fn("3.141", "#### 3.14", {}) == 0.0  # default 1e-6
    assert v.info()["tolerance"] == 0.01 and v.sha256 is None


# --- exact_label ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, reference, expected", [
    ("Card_Arrival", "card_arrival", 1.0),
    ('  "card_arrival."  ', "card_arrival", 1.0),
    ("Card  \n Arrival", "card arrival", 1.0),
    ("card_arrivals", "card_arrival", 0.0),
    ("The label is card_arrival", "card_arrival", 0.0),
    ("", "card_arrival", 0.0),
])
def test_exact_label(completion, reference, expected):
    assert exact_label(completion, reference, {}) == expected


# --- json_schema ---------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"intent": {"type": "string"}, "score": {"type": "number"}},
          "required": ["intent"], "additionalProperties": False}


def test_json_schema_verifier(tmp_path):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "out.json").write_text(json.dumps(SCHEMA))
    v = build(tmp_path, verifier="json_schema", json_schema="schemas/out.json")  # relative to the project root
    assert v.fn('{"intent": "refund", "score": 0.5}', "", {}) == 1.0
    assert v.fn('```json\n{"intent": "refund"}\n```', "", {}) == 1.0        # fenced
    assert v.fn('{"intent": "refund",}', "", {}) == 0.0                       # invalid JSON
    assert v.fn('{"score": 0.5}', "", {}) == 0.0                              # required key missing
    assert v.fn('{"intent": 3}', "", {}) == 0.0                               # wrong type
    assert v.fn('{"intent": "x", "extra": 1}', "", {}) == 0.0                 # additionalProperties
    info = v.info()
    assert info["schema"] == str((tmp_path / "schemas" / "out.json").resolve())
    assert info["schema_sha256"] == hashlib.sha256((tmp_path / "schemas" / "out.json").read_bytes()).hexdigest()


def test_json_schema_is_draft_2020_12_by_default(tmp_path):
    # prefixItems exists only from Draft 2020-12; under an older draft it is ignored and [1, "a"] would pass.
    (tmp_path / "s.json").write_text(json.dumps({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}]}))
    v = build(tmp_path, verifier="json_schema", json_schema="s.json")
    assert v.fn("[1, 2]", "", {}) == 1.0
    assert v.fn('[1, "a"]', "", {}) == 0.0


def test_json_schema_config_errors_name_the_key(tmp_path):
    with pytest.raises(TunegateError, match=r"train\.grpo\.json_schema"):
        build(tmp_path, verifier="json_schema")
    with pytest.raises(TunegateError, match=r"train\.grpo\.json_schema: .*missing\.json: file not found"):
        build(tmp_path, verifier="json_schema", json_schema="missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TunegateError, match=r"train\.grpo\.json_schema: .*bad\.json: not JSON"):
        build(tmp_path, verifier="json_schema", json_schema="bad.json")
    (tmp_path / "invalid.json").write_text(json.dumps({"type": "no-such-type"}))
    with pytest.raises(TunegateError, match="not a valid JSON Schema"):
        build(tmp_path, verifier="json_schema", json_schema="invalid.json")


# --- regex ---------------------------------------------------------------------------------------------------

def test_regex_verifier(tmp_path):
    v = build(tmp_path, verifier="regex", pattern=r"<answer>\d+</answer>")
    assert v.fn("thinking... <answer>42</answer>", "", {}) == 1.0   # search, not match
    assert v.fn("<answer>forty</answer>", "", {}) == 0.0
    assert v.info()["pattern"] == r"<answer>\d+</answer>"


def test_regex_config_errors_name_the_key(tmp_path):
    with pytest.raises(TunegateError, match=r"train\.grpo\.pattern: the regex verifier needs a pattern"):
        build(tmp_path, verifier="regex")
    with pytest.raises(TunegateError, match=r"train\.grpo\.pattern: '\(unclosed' is not a valid regular expression"):
        build(tmp_path, verifier="regex", pattern="(unclosed")


# --- ifeval --------------------------------------------------------------------------------------------------

def test_ifeval_scores_the_fraction_of_instructions_followed(tmp_path):
    v = build(tmp_path, verifier="ifeval")
    one = row(meta={"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, user="Write without commas.")
    assert v.fn("no commas here at all", "", one) == 1.0
    assert v.fn("a comma, here", "", one) == 0.0
    two = row(meta={"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]})
    text = "this answer is written entirely in lowercase letters and it has no commas at all"
    assert v.fn(text, "", two) == 1.0
    assert v.fn(text.replace("this", "This"), "", two) == 0.5     # strict: one of two followed
    assert v.fn("", "", two) == 0.0                              # an empty response follows nothing


def test_ifeval_without_instructions_is_a_counted_error(tmp_path):
    v = build(tmp_path, verifier="ifeval")
    assert v.score("anything", "", row(meta={})) == 0.0
    assert v.errors == 1 and "instruction_id_list" in v.last_error


# --- file verifier -------------------------------------------------------------------------------------------

def test_file_verifier_loads_by_path_and_hashes_the_file(tmp_path):
    (tmp_path / "verifiers").mkdir()
    f = tmp_path / "verifiers" / "reward.py"
    f.write_text("def score(completion, reference, row):\n    return float(reference in completion)\n")
    v = build(tmp_path, verifier="verifiers/reward.py:score")
    assert v.fn("the answer is Paris", "Paris", {}) == 1.0
    assert v.fn("the answer is Rome", "Paris", {}) == 0.0
    assert v.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    info = v.info()
    assert info["sha256"] == v.sha256 and info["path"] == str(f.resolve()) and info["function"] == "score"
    json.dumps(info)  # JSON-ready
    assert reward_function(v).__name__ == "verifier_verifiers_reward_py_score"


def test_file_verifier_hash_changes_with_the_file(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def score(c, r, row):\n    return 1.0\n")
    first = build(tmp_path, verifier="r.py:score")
    f.write_text("def score(c, r, row):\n    return 0.0\n")
    second = build(tmp_path, verifier="r.py:score")
    assert first.sha256 != second.sha256
    assert (first.fn("", "", {}), second.fn("", "", {})) == (1.0, 0.0)


@pytest.mark.parametrize("source, spec, message", [
    (None, "nope.py:score", r"train\.grpo\.verifier: .*nope\.py: verifier file not found"),
    ("def other(c, r, row):\n    return 1.0\n", "r.py:score", r"train\.grpo\.verifier: .*r\.py: no function 'score'"),
    ("score = 3\n", "r.py:score", r"train\.grpo\.verifier: .*r\.py: 'score' is not callable"),
    ("def score(c, r, row)\n    return 1.0\n", "r.py:score", r"train\.grpo\.verifier: .*r\.py:1: syntax error"),
    ("raise RuntimeError('boom')\n", "r.py:score", r"train\.grpo\.verifier: .*r\.py: import failed \(RuntimeError: boom\)"),
    ("def score(c):\n    return 1.0\n", "r.py:score", r"train\.grpo\.verifier: .*r\.py: score must take \(completion, reference, row\)"),
    ("def score(c, r, row):\n    return 1.0\n", "r.py", r"train\.grpo\.verifier: 'r\.py': a file verifier is written"),
])
def test_file_verifier_errors_name_the_file_and_key(tmp_path, source, spec, message):
    if source is not None:
        (tmp_path / "r.py").write_text(source)
    with pytest.raises(TunegateError, match=message):
        build(tmp_path, verifier=spec)


def test_unknown_verifier_lists_the_builtins(tmp_path):
    with pytest.raises(TunegateError) as e:
        build(tmp_path, verifier="numerc")
    msg = str(e.value)
    assert "train.grpo.verifier" in msg and "'numerc'" in msg
    assert all(name in msg for name in BUILTINS)


# --- TRL reward adapter --------------------------------------------------------------------------------------

def test_reward_function_string_and_conversational_completions(tmp_path):
    v = build(tmp_path, verifier="numeric")
    reward = reward_function(v)
    assert reward.__name__ == "verifier_numeric"
    rows = [json.dumps(row("#### 4", id="a")), json.dumps(row("#### 9", id="b"))]
    kwargs = {"reference": ["#### 4", "#### 9"], "row_json": rows, "trainer_state": None}
    assert reward(["p1", "p2"], ["2 + 2 = 4", "it is 8"], **kwargs) == [1.0, 0.0]
    conversational = [[{"role": "assistant", "content": "#### 4"}],
                      [{"role": "assistant", "content": "draft 8"}, {"role": "assistant", "content": "#### 9"}]]
    assert reward([[{"role": "user", "content": "p"}]] * 2, conversational, **kwargs) == [1.0, 1.0]
    assert v.errors == 0 and v.calls == 4


def test_reward_function_passes_the_decoded_row(tmp_path):
    seen = []
    v = Verifier("spy", lambda c, r, rw: seen.append(rw) or 1.0)
    reward_function(v)(["p"], ["x"], reference=["ref"], row_json=[json.dumps(row("ref", meta={"k": 1}, id="z"))])
    assert seen[0]["id"] == "z" and seen[0]["meta"] == {"k": 1}


def test_a_failing_verifier_scores_zero_and_is_counted():
    def flaky(completion, reference, row):
        if completion == "boom":
            raise RuntimeError("bad completion")
        return 1.0

    v = Verifier("flaky", flaky)
    logged = {}
    reward = reward_function(v)
    out = reward(["p"] * 3, ["ok", "boom", "ok"], reference=["r"] * 3, row_json=[json.dumps(row(id="q"))] * 3,
                 log_metric=lambda name, value: logged.__setitem__(name, value))
    assert out == [1.0, 0.0, 1.0]
    assert v.errors == 1 and "RuntimeError: bad completion" in v.last_error and "'q'" in v.last_error
    assert logged == {"verifier_errors": pytest.approx(1 / 3)}
    assert v.info()["errors"] == 1


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), None, "high"])
def test_out_of_range_scores_are_errors(value):
    v = Verifier("bad", lambda c, r, rw: value)
    assert v.score("x", "r", {}) == 0.0
    assert v.errors == 1


def test_reward_function_needs_the_columns():
    reward = reward_function(Verifier("exact_label", exact_label))
    with pytest.raises(ValueError, match="'reference' and 'row_json'"):
        reward(["p"], ["x"], reference=["x"])
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        reward(["p", "p"], ["x", "y"], reference=["x"], row_json=["{}"])


# --- zero-variance smoke (C18 in docs/cases.md) -------------------------------------------------------------

def test_reward_variance_smoke():
    assert reward_variance_smoke([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0], [0.5]]) == {
        "groups": 4, "zero_variance_groups": 3, "fraction": 0.75}
    assert reward_variance_smoke([[0.0, 0.25], [1.0, 0.0]]) == {"groups": 2, "zero_variance_groups": 0, "fraction": 0.0}
    with pytest.raises(ValueError, match="no groups"):
        reward_variance_smoke([])
    with pytest.raises(ValueError, match="group 1 has no scores"):
        reward_variance_smoke([[1.0], []])


def test_import_is_light():
    code = "import sys, tunegate.verifiers; print(any(m in sys.modules for m in ('torch', 'trl', 'jsonschema', 'lm_eval')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
