"""IFEval scoring with lm-eval's checkers, offline (no NLTK data download)."""

import pytest

from tunegate.evals import ifeval

ROWS = [
    {"key": 1, "prompt": "Write without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Answer in exactly 3 sentences, all lowercase.",
     "instruction_id_list": ["length_constraints:number_sentences", "change_case:english_lowercase"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}, {}]},
    {"key": 3, "prompt": "Use at least 2 capital words.", "instruction_id_list": ["change_case:capital_word_frequency"],
     "kwargs": [{"capital_relation": "at least", "capital_frequency": 2}]},
]


def test_scores_follow_the_checkers_without_network(monkeypatch):
    import nltk

    def no_download(*a, **k):  # the checkers must not need NLTK data from the network
        raise AssertionError("nltk.download called")

    monkeypatch.setattr(nltk, "download", no_download)
    responses = [
        "no commas here at all",                      # follows
        "this is one. this is two. this is three.",   # 3 sentences: not < 3; lowercase ok
        "THIS and THAT are LOUD.",                    # 3 capital words >= 2
    ]
    s = ifeval.score(ROWS, responses)
    assert s["ifeval_prompt_strict"] == [1.0, 0.0, 1.0]
    assert s["ifeval_inst_strict"] == [1.0, 0.0, 1.0, 1.0]
    summary = ifeval.summary(s)
    assert summary["ifeval_prompt_strict"] == pytest.approx(2 / 3)
    assert summary["ifeval_inst_strict"] == pytest.approx(3 / 4)
    assert summary["ifeval_average"] == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_loose_accepts_a_chatty_first_line():
    rows = [{"key": 9, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    s = ifeval.score(rows, ["Sure, here it is:\nno commas in the answer"])
    assert s["ifeval_prompt_strict"] == [0.0] and s["ifeval_prompt_loose"] == [1.0]


def test_empty_response_follows_nothing_and_lengths_must_match():
    s = ifeval.score(ROWS[:1], [""])
    assert s["ifeval_prompt_strict"] == [0.0]
    with pytest.raises(ValueError, match="1 IFEval rows but 2 responses"):
        ifeval.score(ROWS[:1], ["a", "b"])


def test_by_instruction_groups_instruction_rows():
    s = ifeval.score(ROWS, ["no commas", "x. y. z.", "lower only"])
    table = ifeval.by_instruction(ROWS, s)
    assert table["punctuation:no_comma"] == {"n": 1, "accuracy": 1.0}
    assert table["change_case:capital_word_frequency"] == {"n": 1, "accuracy": 0.0}


def test_load_prompts_names_the_bad_line(tmp_path):
    from tunegate import TunegateError

    p = tmp_path / "input_data.jsonl"
    p.write_text('{"key": 1, "prompt": "x", "instruction_id_list": [], "kwargs": []}\n{"key": 2}\n')
    with pytest.raises(TunegateError, match=r"input_data.jsonl:2: IFEval row lacks \['instruction_id_list', 'kwargs', 'prompt'\]"):
        ifeval.load_prompts(p)


@pytest.mark.real_data
def test_every_upstream_instruction_has_a_checker():
    from conftest import shared_data

    rows = ifeval.load_prompts(shared_data("ifeval", "input_data.jsonl"))
    assert len(rows) == 541 and sum(len(r["instruction_id_list"]) for r in rows) == 834
    ifeval.checkers()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    assert {i for r in rows for i in r["instruction_id_list"]} <= set(INSTRUCTION_DICT)
    assert len({i for r in rows for i in r["instruction_id_list"]}) == 25
    empty = ifeval.summary(ifeval.score(rows, [""] * len(rows)))
    assert empty["ifeval_average"] == 0.0  # an empty response follows nothing


def test_a_row_whose_checker_draws_a_random_argument_scores_the_same_every_time():
    """Upstream key 1129 asks for the 'letter' '!': lm-eval's checker then picks a random letter. Seeded per row."""
    import random

    row = {"key": 1129, "prompt": "p", "instruction_id_list": ["keywords:letter_frequency"],
           "kwargs": [{"let_relation": "at least", "letter": "!", "let_frequency": 6}]}
    response = "a" * 6 + "e" * 6 + "s" * 6 + "t" * 6 + " some more words"
    results = set()
    for seed in range(20):
        random.seed(seed)  # whatever the caller's random state
        results.add(tuple(ifeval.score([row], [response])["ifeval_inst_strict"]))
    assert len(results) == 1
    random.seed(5)
    before = random.random()
    random.seed(5)
    ifeval.score([row], [response])
    assert random.random() == before  # the caller's random state is left as it was
