"""The BFCL-style tool-call checker (tunegate.evals.toolcall) and its row metric `tool_call`."""

import json

import pytest

from tests.conftest import shared_data
from tunegate.evals.metrics import ROW_METRICS
from tunegate.evals.toolcall import (
    CallParseError,
    calls_of_ground_truth,
    check_calls,
    ground_truth_of_calls,
    parse_calls,
    parse_ground_truth,
    standardize,
    tool_call,
)

SIMPLE = json.dumps([{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}])
PARALLEL = json.dumps([{"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}},
                       {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}}])


def block(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_simple_call_right_and_wrong_argument():
    assert tool_call(block("calculate_triangle_area", base=10, height=5, unit="units"), SIMPLE) == 1.0
    assert tool_call(block("calculate_triangle_area", base=10, height=6), SIMPLE) == 0.0  # wrong value
    assert tool_call(block("calculate_area", base=10, height=5), SIMPLE) == 0.0  # wrong function
    assert tool_call(block("calculate_triangle_area", base=10, height=5, colour="red"), SIMPLE) == 0.0  # unexpected arg


def test_optional_argument_may_be_left_out_a_required_one_may_not():
    assert tool_call(block("calculate_triangle_area", base=10, height=5), SIMPLE) == 1.0  # unit allows ""
    assert tool_call(block("calculate_triangle_area", base=10), SIMPLE) == 0.0  # height does not


def test_numbers_compare_by_value_booleans_and_strings_do_not():
    assert tool_call(block("calculate_triangle_area", base=10.0, height=5), SIMPLE) == 1.0  # int vs float
    assert tool_call(block("calculate_triangle_area", base="10", height=5), SIMPLE) == 0.0  # a string is not a number
    flag = json.dumps([{"f": {"x": [True]}}])
    assert tool_call(block("f", x=True), flag) == 1.0
    assert tool_call(block("f", x=1), flag) == 0.0  # 1 is not True


def test_strings_are_standardized_as_bfcl_does():
    assert standardize("April 1, 2024") == standardize("april 1 2024")
    ref = json.dumps([{"weather": {"city": ["New York, NY"]}}])
    assert tool_call(block("weather", city="new york ny"), ref) == 1.0
    assert tool_call(block("weather", city="Boston"), ref) == 0.0


def test_multiple_functions_the_right_one_must_be_called():
    ref = json.dumps([{"get_weather": {"city": ["Paris"]}}])
    assert tool_call(block("get_weather", city="Paris"), ref) == 1.0
    assert tool_call(block("get_time", city="Paris"), ref) == 0.0
    assert tool_call(block("get_weather", city="Paris") + block("get_weather", city="Paris"), ref) == 0.0  # one too many


def test_parallel_calls_match_in_any_order_and_count_must_match():
    a = block("spotify.play", artist="Taylor Swift", duration=20)
    b = block("spotify.play", artist="Maroon 5", duration=15)
    assert tool_call(a + "\n" + b, PARALLEL) == 1.0
    assert tool_call(b + "\n" + a, PARALLEL) == 1.0
    assert tool_call(a, PARALLEL) == 0.0
    assert tool_call(a + a, PARALLEL) == 0.0  # the same call twice does not cover the second expected one


def test_order_free_matching_finds_a_match_a_greedy_pass_would_miss():
    # expected 0 accepts either call, expected 1 only the first: greedy 0 -> first would leave 1 unmatched
    ref = [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}]
    calls = [{"name": "f", "arguments": {"x": 1}}, {"name": "f", "arguments": {"x": 2}}]
    assert check_calls(calls, ref)


def test_irrelevance_no_call_is_right_a_call_is_wrong():
    assert tool_call("None of the functions can do that.", "[]") == 1.0
    assert tool_call("", "[]") == 1.0
    assert tool_call(block("determine_body_mass_index", weight=70, height=1.8), "[]") == 0.0


def test_malformed_answers_score_zero_never_raise():
    assert tool_call("<tool_call>{not json</tool_call>", SIMPLE) == 0.0
    assert tool_call("<tool_call>{not json</tool_call>", "[]") == 0.0  # an attempted call, even on irrelevance
    assert tool_call('<tool_call>{"name": "f", "arguments": "{bad"}</tool_call>', SIMPLE) == 0.0
    assert tool_call('<tool_call>{"arguments": {}}</tool_call>', SIMPLE) == 0.0
    assert tool_call("[1, 2", SIMPLE) == 0.0
    assert tool_call("[" * 100_000, SIMPLE) == 0.0  # nested past the parser's limit


def test_answer_shapes_json_openai_bfcl_and_an_unclosed_last_block():
    args = {"base": 10, "height": 5}
    for answer in (json.dumps({"name": "calculate_triangle_area", "arguments": args}),
                   "```json\n" + json.dumps([{"name": "calculate_triangle_area", "parameters": args}]) + "\n```",
                   json.dumps({"type": "function", "function": {"name": "calculate_triangle_area", "arguments": json.dumps(args)}}),
                   json.dumps({"calculate_triangle_area": args}),
                   'Sure.\n<tool_call>\n{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}'):
        assert tool_call(answer, SIMPLE) == 1.0, answer
    assert parse_calls('{"answer": 42}') == []  # JSON that is not a call: a text answer


def test_nested_objects_and_lists_of_objects():
    ref = json.dumps([{"f": {"budget": [{"min": [300000], "max": [400000, ""]}], "tags": [["a", "b"]]}}])
    assert tool_call(block("f", budget={"min": 300000}, tags=["A", "b"]), ref) == 1.0
    assert tool_call(block("f", budget={"min": 300000}, tags=["b", "a"]), ref) == 0.0  # lists keep their order
    assert tool_call(block("f", budget={"max": 400000}, tags=["a", "b"]), ref) == 0.0  # min is not optional


def test_a_reference_that_is_not_a_ground_truth_raises():
    with pytest.raises(CallParseError, match="not JSON"):
        tool_call("x", "card_arrival")
    with pytest.raises(CallParseError, match="allowed values must be a list"):
        parse_ground_truth('[{"f": {"x": 1}}]')


def test_registered_as_a_row_metric():
    assert ROW_METRICS["tool_call"] is tool_call


def test_round_trips():
    calls = [{"name": "f", "arguments": {"x": 1, "nested": {"a": "b"}, "rows": [{"k": 1}]}}]
    assert check_calls(calls, ground_truth_of_calls(calls))
    assert not check_calls([{"name": "f", "arguments": {"x": 2, "nested": {"a": "b"}, "rows": [{"k": 1}]}}], ground_truth_of_calls(calls))
    gt = [{"f": {"x": ["", 3], "y": [1, 2]}}]
    assert calls_of_ground_truth(gt) == [{"name": "f", "arguments": {"y": 1}}]


@pytest.mark.real_data
def test_every_bfcl_ground_truth_accepts_its_canonical_call():
    folder = shared_data("bfcl", "possible_answer")
    n = 0
    for path in sorted(folder.glob("*.json")):
        for line in path.read_text().splitlines():
            gt = json.loads(line)["ground_truth"]
            assert check_calls(calls_of_ground_truth(gt), gt), line[:120]
            n += 1
    assert n == 800


def test_tool_call_is_scored_with_cis_and_sliced_by_category():
    from tunegate.config import EvalConfig
    from tunegate.evals.gate import score_metrics, score_slices

    refs = [SIMPLE, "[]", "[]", PARALLEL]
    base = ["no", "no", block("f"), "no"]
    cand = [block("calculate_triangle_area", base=10, height=5), "no", "no", "no"]
    summary, per_row = score_metrics(["tool_call"], base, cand, refs, n_samples=200)
    assert summary["tool_call"]["baseline"]["mean"] == 0.25 and summary["tool_call"]["candidate"]["mean"] == 0.75
    slices = score_slices(per_row, ["simple", "irrelevance", "irrelevance", "parallel"], n_samples=200)
    assert list(slices) == ["irrelevance", "parallel", "simple"]
    assert slices["irrelevance"]["n"] == 2 and slices["irrelevance"]["tool_call"]["baseline"]["mean"] == 0.5
    assert slices["simple"]["tool_call"]["delta"]["mean"] == 1.0
    assert "slice_by" not in EvalConfig().model_dump() and EvalConfig(slice_by="category").model_dump()["slice_by"] == "category"
