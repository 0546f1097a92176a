"""The audit's recommendation: measured numbers answer the tree's questions and overrule the user's answers."""

import pytest

from tunegate.decide import recommend


def cand(name, rows, trains=False):
    return {"name": name, "trains": trains, "mean": sum(rows) / len(rows), "rows": rows}


N = 200
ALL_RIGHT, ALL_WRONG = [1.0] * N, [0.0] * N


def frac(p):  # the first p*N rows right
    k = int(p * N)
    return [1.0] * k + [0.0] * (N - k)


def test_a_no_training_candidate_that_meets_the_bar_stops_training_and_overrules_the_user():
    rec = recommend([cand("zero_shot", frac(0.1)), cand("knn_classifier", frac(0.92)), cand("lora_probe", frac(0.6), trains=True)],
                    bar=0.8, min_gain=0.0, given={"changing_knowledge": "no", "prompt_meets_bar": "no"}, n_samples=500)
    assert rec["verdict"] == "NO_TRAIN"
    assert rec["decision"]["method"] == "prompt_optimization"
    assert rec["best_no_training"]["name"] == "knn_classifier"
    assert rec["gap"]["mean"] == pytest.approx(-0.32)
    assert rec["gap"]["ci_high"] < 0
    assert rec["overruled"] == [{"question": "prompt_meets_bar", "given": "no", "measured": "yes",
                                 "why": "knn_classifier scored 0.920 against a bar of 0.800"}]
    # the leaf's reason names the measurement that reached it, and a classifier is not passed off as a prompt
    assert rec["decision"]["why"].endswith("no training spend needed. Measured: knn_classifier scored 0.920 against a bar of 0.800.")
    assert len(rec["notes"]) == 1 and rec["notes"][0].startswith("the best option without training, knn_classifier, is not a prompt")


def test_nothing_meets_the_bar_and_the_probe_wins_so_training_goes_ahead_with_the_default_method():
    rec = recommend([cand("zero_shot", frac(0.1)), cand("prompt_optimization", frac(0.3)), cand("lora_probe", frac(0.7), trains=True)],
                    bar=0.8, min_gain=0.0, given={}, n_samples=500)
    assert rec["verdict"] == "TRAIN"
    assert rec["decision"]["method"] == "dora"
    assert rec["gap"]["ci_low"] > 0.3
    # unanswered questions are assumed, and say so
    assert rec["assumed"] == {"changing_knowledge": "no", "verifier": "no", "preference": "none", "demonstrations": "default"}
    assert rec["notes"] == []


def test_a_weak_probe_is_a_lower_bound_not_a_veto():
    rec = recommend([cand("zero_shot", frac(0.3)), cand("lora_probe", frac(0.2), trains=True)],
                    bar=0.8, min_gain=0.0, given={}, n_samples=500)
    assert rec["verdict"] == "TRAIN"
    assert "lower bound" in rec["notes"][0]


def test_rag_that_beats_every_closed_book_candidate_answers_the_knowledge_question():
    closed = frac(0.2)
    rec = recommend([cand("zero_shot", closed), cand("rag_hybrid", frac(0.6)), cand("lora_probe", frac(0.25), trains=True),
                     cand("lora_probe+rag", frac(0.55), trains=True)],
                    bar=None, min_gain=0.0, given={"changing_knowledge": "no"}, n_samples=500)
    assert rec["verdict"] == "NO_TRAIN" and rec["decision"]["method"] == "rag"
    assert rec["overruled"][0]["question"] == "changing_knowledge"
    assert "rag_hybrid scored 0.600 against 0.250" in rec["overruled"][0]["why"]
    assert "Measured: rag_hybrid scored 0.600 against 0.250" in rec["decision"]["why"]


def test_a_verifier_leads_to_grpo_when_prompting_falls_short():
    rec = recommend([cand("zero_shot", frac(0.02)), cand("prompt_optimization", frac(0.05))],
                    bar=0.5, min_gain=0.0, given={"changing_knowledge": "no", "verifier": "yes"}, n_samples=500)
    assert rec["verdict"] == "TRAIN" and rec["decision"]["method"] == "grpo"
    assert rec["gap"] is None and rec["best_training"] is None


def test_without_a_bar_meeting_it_means_fine_tuning_does_not_measurably_beat_prompting():
    same = frac(0.5)
    rec = recommend([cand("prompt_optimization", same), cand("lora_probe", same, trains=True)], bar=None, min_gain=0.0, given={}, n_samples=500)
    assert rec["verdict"] == "NO_TRAIN"
    rec = recommend([cand("prompt_optimization", frac(0.3)), cand("lora_probe", frac(0.9), trains=True)], bar=None, min_gain=0.0,
                    given={}, n_samples=500)
    assert rec["verdict"] == "TRAIN"
    # a required margin: a 0.6 gain does not clear min_gain 0.7
    rec = recommend([cand("prompt_optimization", frac(0.3)), cand("lora_probe", frac(0.9), trains=True)], bar=None, min_gain=0.7,
                    given={}, n_samples=500)
    assert rec["verdict"] == "NO_TRAIN"


def test_changing_knowledge_said_yes_is_never_overruled_by_a_measurement():
    rec = recommend([cand("zero_shot", frac(0.9))], bar=0.5, min_gain=0.0, given={"changing_knowledge": "yes"}, n_samples=500)
    assert rec["decision"]["method"] == "rag" and rec["overruled"] == []


def test_the_audit_needs_a_candidate_that_does_not_train():
    with pytest.raises(ValueError, match="at least one candidate that does not train"):
        recommend([cand("lora_probe", ALL_RIGHT, trains=True)], bar=None, min_gain=0.0, given={})


@pytest.mark.parametrize("k", [0, 1, 3])
def test_few_shot_picker_gives_exactly_k_examples_of_distinct_labels(k):
    from tunegate.stages.audit import _shot_picker

    pool = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "abc"[i % 3]}]}
            for i in range(30)]
    shots = _shot_picker(pool, ["a", "b", "c"], seed=0)(k)
    assert len(shots) == k
    assert len({s["messages"][-1]["content"] for s in shots}) == k
    assert _shot_picker(pool, ["a", "b", "c"], seed=0)(k) == shots  # seeded


def test_retrieval_plus_fine_tune_best_is_reported_as_a_combination_on_top_of_rag():
    rec = recommend([cand("zero_shot", frac(0.05)), cand("rag_bm25", frac(0.1)), cand("lora_probe", frac(0.11), trains=True),
                     cand("lora_probe+rag", frac(0.26), trains=True)],
                    bar=None, min_gain=0.0, given={"changing_knowledge": "no"}, n_samples=500)
    assert rec["decision"]["method"] == "rag" and rec["verdict"] == "NO_TRAIN"
    assert rec["notes"] == ["the best system combines both: lora_probe+rag beats rag_bm25 by +0.160 [+0.115, +0.205]; "
                            "fine-tune on top of retrieval (for the answer's form), never to store the facts"]
