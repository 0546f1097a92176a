"""The judge's parsing, both-order pairwise (case C22 in docs/cases.md), and calibration arithmetic, with scripted judges."""

import json
import re

import pytest

from tunegate.evals import judge as judging


class ScriptedBackend:
    """A chat backend whose answer is a function of the prompt it is shown."""

    name = "scripted"

    def __init__(self, answer):
        self.answer, self.seen = answer, []

    def complete(self, conversations, max_new_tokens, prefill="", desc=""):
        self.seen += [c[-1]["content"] for c in conversations]
        return [self.answer(c[-1]["content"]) for c in conversations]


def _answer_a(prompt):
    return re.search(r"\[The Start of Assistant A's Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)


def test_parse_verdict_forms():
    assert judging.parse_verdict("B]] because", ["A", "B", "C"]) == "B"  # prefilled '[[' continued
    assert judging.parse_verdict("The answer is good. Rating: [[7]]", [str(i) for i in range(1, 11)]) == "7"
    assert judging.parse_verdict("[[10]]", [str(i) for i in range(1, 11)]) == "10"
    assert judging.parse_verdict("I think so", ["A", "B", "C"]) is None
    assert judging.parse_verdict("[[D]]", ["A", "B", "C"]) is None


def test_c22_position_biased_judge_gives_ties_and_full_flip_rate():
    """C22: a judge that always prefers the first-shown answer must not make either answer win."""
    j = judging.Judge(ScriptedBackend(lambda p: "A]]"))
    out = j.pairwise(["q1", "q2"], ["short", "a much longer answer"], ["other", "x"])
    assert [o["winner"] for o in out] == ["tie", "tie"]
    assert all(o["flipped"] for o in out)
    assert [(o["ab"], o["ba"]) for o in out] == [("A", "A"), ("A", "A")]


def test_consistent_judge_names_a_winner_in_both_orders():
    # prefers whichever answer contains "good", wherever it is shown
    j = judging.Judge(ScriptedBackend(lambda p: "A]]" if "good" in _answer_a(p) else "B]]"))
    out = j.pairwise(["q", "q"], ["good answer", "bad"], ["bad", "good answer"])
    assert [o["winner"] for o in out] == ["first", "second"]
    assert not any(o["flipped"] for o in out)


def test_one_order_unparseable_is_a_tie():
    calls = iter(["A]]", "nonsense"])
    j = judging.Judge(ScriptedBackend(lambda p: next(calls)))
    (out,) = j.pairwise(["q"], ["x"], ["y"])
    assert out["winner"] == "tie" and out["flipped"]


def _rows():
    # two models answering three prompts; labels make two like-labelled pairs and one mixed pair
    rows = []
    for i, (la, lb) in enumerate([("full_compliance", "full_compliance"), ("full_refusal", "full_refusal"), ("full_compliance", "full_refusal")]):
        rows.append({"model": "m1", "id": f"p{i}", "prompt": f"question {i}", "completion": "long " * (10 + i), "label": la, "type": "t"})
        rows.append({"model": "m2", "id": f"p{i}", "prompt": f"question {i}", "completion": "short", "label": lb, "type": "t"})
    return rows


def test_calibration_of_a_perfect_refusal_judge_and_a_length_loving_pair_judge():
    rows = _rows()
    truth = {r["completion"] + r["prompt"]: r["label"] for r in rows}

    def answer(prompt):
        if "Classify" in prompt:
            q = re.search(r"\[User Request\]\n(.*?)\n", prompt).group(1)
            a = re.search(r"Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)
            return {"full_compliance": "A]]", "full_refusal": "B]]", "partial_refusal": "C]]"}[truth[a + q]]
        # pairwise: always the longer answer
        a = _answer_a(prompt)
        b = re.search(r"\[The Start of Assistant B's Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)
        return "A]]" if len(a) > len(b) else "B]]"

    cal = judging.calibrate(judging.Judge(ScriptedBackend(answer)), rows, n_pairs=None, min_kappa=0.6)
    assert cal["kappa"] == pytest.approx(1.0)
    assert cal["flip_rate"] == 0.0  # consistent in both orders
    # like-labelled pairs are p0 and p1: 2 pairs x 2 orders, the longer answer won all four
    assert cal["length_bias_decisions"] == 4
    assert cal["length_bias"] == pytest.approx(0.5)
    assert not cal["calibrated"]
    assert cal["reasons"] == ["too few labelled answers or pairs (6 < 200 or 3 < 50)", "|length bias| 0.500 > 0.1"]
    json.dumps(cal)  # JSON-ready


def test_calibration_status_requires_same_judge_same_prompts_and_a_pass(tmp_path):
    path = tmp_path / "cal.json"
    ok, why = judging.calibration_status(path, "local:x")
    assert not ok and "missing" in why
    good = {"judge": "local:x", "prompts_sha256": judging.prompts_sha256(), "max_answer_chars": 1500, "calibrated": True,
            "kappa": 0.8, "flip_rate": 0.1, "length_bias": 0.02, "reasons": []}
    path.write_text(json.dumps(good))
    assert judging.calibration_status(path, "local:x")[0]
    assert not judging.calibration_status(path, "local:other")[0]
    path.write_text(json.dumps({**good, "prompts_sha256": "0" * 64}))
    assert not judging.calibration_status(path, "local:x")[0]
    # the measured numbers are checked against today's thresholds, not the stored flag
    path.write_text(json.dumps({**good, "kappa": 0.1}))
    ok, why = judging.calibration_status(path, "local:x")
    assert not ok and "kappa 0.1 < 0.6" in why
    from tunegate.config import JudgeConfig

    path.write_text(json.dumps(good))
    ok, why = judging.calibration_status(path, "local:x", JudgeConfig(min_kappa=0.9))
    assert not ok and "kappa 0.8 < 0.9" in why
    assert not judging.calibration_status(path, "local:x", JudgeConfig(max_answer_chars=500))[0]  # another clip
    path.write_text("{not json")
    ok, why = judging.calibration_status(path, "local:x")
    assert not ok and "not a calibration file" in why


def test_a_judge_that_never_parses_pairwise_is_not_calibrated():
    """Unparseable pairwise verdicts are flips, and no decisive verdict leaves length bias unmeasured."""
    rows = []
    for i in range(60):
        for m in ("m1", "m2"):
            rows.append({"model": m, "id": f"p{i}", "prompt": f"q{i}", "completion": ("refuse " if i % 2 else "answer ") * (3 if m == "m1" else 5),
                         "label": "full_refusal" if i % 2 else "full_compliance", "type": "t"})
    rows = rows * 2  # 240 labelled answers

    def answer(prompt):
        if prompt.startswith(judging.SYSTEM) and "Classify" in prompt:
            return "B]]" if "refuse" in prompt.split("[The Start of Assistant's Answer]")[1] else "A]]"
        return "Sure"

    cal = judging.calibrate(judging.Judge(ScriptedBackend(answer)), rows, n_pairs=None)
    assert cal["kappa"] == pytest.approx(1.0) and cal["pairwise_parse_failures"] == 1.0
    assert cal["flip_rate"] == 1.0 and not cal["calibrated"]
    assert "no decisive pairwise verdict on like-labelled pairs: length bias unmeasured" in cal["reasons"]


def test_cohen_kappa_known_value():
    # 2x2 table [[20, 5], [10, 15]]: po = 0.7, pe = 0.5 -> kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert judging.cohen_kappa(a, b) == pytest.approx(0.4)
    assert judging.cohen_kappa(["y", "y"], ["y", "y"]) == 0.0  # undefined -> 0, not NaN


@pytest.mark.real_data
def test_xstest_completions_load_with_their_human_labels():
    from conftest import shared_data

    rows = judging.load_xstest_completions(shared_data("xstest", "model_completions"))
    assert len(rows) == 2250 and len({r["model"] for r in rows}) == 5
    counts = {k: sum(r["label"] == k for r in rows) for k in ("full_compliance", "full_refusal", "partial_refusal")}
    assert counts == {"full_compliance": 1091, "full_refusal": 983, "partial_refusal": 176}
    sample = judging.load_xstest_completions(shared_data("xstest", "model_completions"), limit_per_model=100)
    assert len(sample) == 500
    pairs = judging._pairs(sample, None, 0)
    assert all(a["id"] == b["id"] and a["model"] != b["model"] for a, b in pairs)
