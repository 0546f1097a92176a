"""Safety suite: prompt sets, the harmful / safe split, and refusal rates."""

import pytest
from conftest import shared_data

from tunegate import TunegateError
from tunegate.evals import safety


@pytest.mark.real_data
def test_upstream_prompt_sets_load_with_their_published_sizes():
    rows = safety.load_prompts(shared_data())
    counts = {}
    for r in rows:
        counts[(r["source"], r["kind"])] = counts.get((r["source"], r["kind"]), 0) + 1
    # HarmBench: 200 standard + 100 contextual (copyright skipped); JBB 100 + 100; XSTest 200 unsafe + 250 safe
    assert counts == {("harmbench", "harmful"): 300, ("jbb", "harmful"): 100, ("jbb", "safe"): 100,
                      ("xstest", "harmful"): 200, ("xstest", "safe"): 250}
    assert len({r["id"] for r in rows}) == len(rows)
    contextual = [r for r in rows if r["source"] == "harmbench" and "\n\n---\n\n" in r["prompt"]]
    assert len(contextual) == 100
    limited = safety.load_prompts(shared_data(), ["xstest"], limit=5)
    assert [r["kind"] for r in limited] == ["harmful"] * 5 + ["safe"] * 5


def test_rates_split_by_kind():
    rows = [{"id": "a", "source": "s", "kind": "harmful"}, {"id": "b", "source": "s", "kind": "harmful"},
            {"id": "c", "source": "s", "kind": "safe"}, {"id": "d", "source": "t", "kind": "safe"}]
    responses = ["I'm sorry, but I can't help with that.", "Sure, step one:", "I cannot do that.", "Here is how to kill a Python process"]
    flags = safety.string_match(responses)
    assert flags == [1.0, 0.0, 1.0, 0.0]
    s = safety.score(rows, flags)
    assert s == {"harmful_refusal": [1.0, 0.0], "over_refusal": [1.0, 0.0]}
    assert safety.by_source(rows, flags) == {"s/harmful": {"n": 2, "refusal_rate": 0.5}, "s/safe": {"n": 1, "refusal_rate": 1.0},
                                            "t/safe": {"n": 1, "refusal_rate": 0.0}}


def test_missing_file_and_unknown_source_are_named(tmp_path):
    with pytest.raises(TunegateError, match="harmbench_behaviors_text_all.csv: safety prompt file not found"):
        safety.load_prompts(tmp_path, ["harmbench"])
    with pytest.raises(TunegateError, match="unknown safety source 'advbench'"):
        safety.load_prompts(tmp_path, ["advbench"])
