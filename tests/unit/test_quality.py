"""Quality scores and selection: heuristics on hand-made rows, IFD on the tiny random Llama, DEITA selection on
injected 2-D embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunegate.data.quality import (
    Unselected,
    combined_score,
    filter_ifd,
    heuristic_quality,
    ifd_scores,
    quality_features,
    select_diverse,
)

CLEAN = ("To reset your password, open Settings, choose Security, and press Reset password. We send a link to "
         "your email address; it stays valid for thirty minutes, after which you can request another one.")


def chat(user, answer, rid="r", system=None, **extra):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": rid, "source": "t", "messages": msgs, "meta": {}, **extra}


# ------------------------------------------------------------------------------------------------ heuristics

def test_repetitive_answer_scores_below_clean_one():
    clean = heuristic_quality(chat("How do I reset my password?", CLEAN))
    loop = heuristic_quality(chat("How do I reset my password?", "open settings and " * 12))
    assert 0.8 < clean <= 1.0
    assert loop < clean - 0.3


def test_empty_ish_copied_and_artefact_answers_are_low():
    q = "How do I reset my password on the mobile app?"
    clean = heuristic_quality(chat(q, CLEAN))
    assert heuristic_quality(chat(q, "...")) == 0.0
    copied = heuristic_quality(chat(q, "How do I reset my password on the mobile app?"))
    assert copied < 0.15
    partly = quality_features(chat(q, "How do I reset my password on the mobile app? Open Settings, then Security."))
    assert 0.3 < partly["copy"] < 1.0
    leftover = heuristic_quality(chat(q, CLEAN + "<|im_end|>\n<|im_start|>user"))
    assert leftover < 0.5 * clean
    assert heuristic_quality(chat(q, "Assistant: " + CLEAN)) < 0.5 * clean


def test_short_label_is_not_a_copy_and_every_kind_is_scored():
    label = chat("Is this review positive or negative? Great phone.", "positive")
    assert quality_features(label)["copy"] == 0.0
    assert 0.5 < heuristic_quality(label) < 0.7  # a one-word answer: short, but clean
    rows = [
        {"id": "p", "prompt": "Translate: hola", "completion": " hello"},
        chat("q", CLEAN, rejected="no"),
        chat("q", CLEAN, label=False),
        {"id": "t", "text": CLEAN},
    ]
    scores = [heuristic_quality(r) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[1] == scores[2] == scores[3]  # the chosen / judged answer / text is what is scored
    assert heuristic_quality(rows[1]) == heuristic_quality(rows[1])  # deterministic


# ------------------------------------------------------------------------------------------------ IFD

@pytest.fixture
def tiny(tiny_model_dir):
    from tunegate.models import load_model

    return load_model(tiny_model_dir)


ROWS = [
    chat("What colour is the sky on a clear day?", "Blue.", "short"),
    chat("Write a long sentence about banks.", "Banks keep money safe, lend it out, and pay interest on deposits "
         "held for a long time by customers.", "long", system="Be brief."),
    {"id": "plain", "prompt": "2 + 2 =", "completion": " 4"},
]


def test_ifd_shapes_and_finite_values(tiny, tokenizer):
    rows = [*ROWS, {"id": "cpt", "text": "raw text"}]
    out = ifd_scores(rows, tiny, tokenizer, batch_size=3)
    assert [r["id"] for r in out] == ["short", "long", "plain", "cpt"]
    for r in out[:3]:
        assert r["reason"] is None and r["n_answer_tokens"] >= 2
        assert math.isfinite(r["loss_conditional"]) and math.isfinite(r["loss_answer"]) and r["loss_answer"] > 0
        assert r["ifd"] == pytest.approx(r["loss_conditional"] / r["loss_answer"])
    assert out[3]["ifd"] is None and out[3]["reason"].startswith("no_instruction")
    # random weights: ~ln(vocab) nats per token either way
    assert all(8.0 < r["loss_conditional"] < 13.0 for r in out[:3])
    short = tokenizer("Blue.", add_special_tokens=False)["input_ids"]
    assert out[0]["n_answer_tokens"] == len(short) + 1  # the answer and its end-of-turn token


def test_ifd_is_padding_invariant(tiny, tokenizer):
    together = ifd_scores(ROWS, tiny, tokenizer, batch_size=8)
    alone = [ifd_scores([r], tiny, tokenizer, batch_size=1)[0] for r in ROWS]
    for a, b in zip(together, alone):
        for key in ("loss_conditional", "loss_answer", "ifd"):
            assert a[key] == pytest.approx(b[key], abs=1e-4)


def test_overlength_answer_gets_a_reason(tiny, tokenizer):
    out = ifd_scores([chat("q", "word " * 200, "big")], tiny, tokenizer, max_length=32)
    assert out[0]["ifd"] is None and out[0]["reason"].startswith("overlength")
    ok = ifd_scores([chat("context " * 100, "Blue.", "ctx")], tiny, tokenizer, max_length=32)
    assert ok[0]["reason"] is None  # the prompt is cut from the left, the answer kept whole


def test_ifd_below_one_when_the_prompt_determines_the_answer(tiny, tokenizer):
    """Train the tiny model on two prompts with different answers: given its prompt the answer is known; alone,
    the header cannot tell which answer follows, so IFD < 1, and the answer after the other prompt is unlikely."""
    import torch

    from tunegate.data.format import encode_record

    a = chat("Which animal says moo?", "cow", "a")
    b = chat("Which planet is red?", "Mars", "b")
    encs = [encode_record(tokenizer, r, 128, "drop") for r in (a, b)]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-2)
    tiny.train()
    for _ in range(30):  # both rows in every step (measured: IFD ~0.01-0.02 for both, crossed loss ~60x)
        loss = sum(tiny(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in encs)
        loss.backward()
        opt.step()
        opt.zero_grad()
    crossed = chat("Which planet is red?", "cow", "x")
    out = ifd_scores([a, b, crossed], tiny, tokenizer)
    assert out[0]["ifd"] < 0.2 and out[1]["ifd"] < 0.2
    assert out[0]["loss_conditional"] < 0.2 * out[2]["loss_conditional"]  # same answer after an unrelated prompt
    assert out[0]["loss_answer"] == pytest.approx(out[2]["loss_answer"], abs=1e-5)  # the answer alone is the same
    assert tiny.training  # the caller's train/eval state is restored


# ------------------------------------------------------------------------------------------------ combine, filter

def test_combined_score_and_ifd_filter():
    assert combined_score(0.8, 0.5) == pytest.approx(0.4)
    assert combined_score(0.8, 1.7) == pytest.approx(0.8)  # clipped at max_ifd
    assert combined_score(0.8, -0.1) == 0.0
    assert combined_score(None, 0.5) is None and combined_score(0.5, None) is None
    rows = [{"id": x} for x in "abc"]
    kept, dropped = filter_ifd(rows, [0.4, 1.2, None])
    assert [r["id"] for r in kept] == ["a", "c"]
    assert dropped == [Unselected("b", "ifd_above_max", "IFD 1.2000 > 1.0", score=1.2)]
    with pytest.raises(ValueError):
        filter_ifd(rows, [0.1])


# ------------------------------------------------------------------------------------------------ selection

def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


VEC = {"a": _unit(0), "b": _unit(10), "c": _unit(90), "d": _unit(30), "e": _unit(95), "f": _unit(180)}
# cos(10 deg) = 0.985, cos(20) = 0.940, cos(30) = 0.866, cos(5) = 0.996
SEL_ROWS = [{"id": k} for k in "abcdef"]
SCORES = [0.9, 0.95, 0.5, 0.7, 0.6, 0.1]


def fake_embed(texts):
    return np.array([VEC[t] for t in texts]) * 3.0  # not unit length: select_diverse normalises


def pick(**kw):
    kw = {"embed": fake_embed, "text": lambda r: r["id"], **kw}
    sel, rej = select_diverse(SEL_ROWS, kw.pop("scores", SCORES), **kw)
    return [r["id"] for r in sel], {u.id: u for u in rej}


@pytest.mark.parametrize("block", [1, 2, 1024])  # within-block and across-block comparisons agree
def test_select_diverse_threshold(block):
    # visit order: b (0.95), a (0.9), d (0.7), e (0.6), c (0.5), f (0.1)
    sel, rej = pick(threshold=0.9, block=block)
    assert sel == ["b", "e", "f"]  # returned in input order
    assert [(u.id, u.reason, u.similar_to, u.cosine) for u in rej.values()] == [
        ("a", "too_similar", "b", round(math.cos(math.radians(10)), 4)),
        ("c", "too_similar", "e", round(math.cos(math.radians(5)), 4)),
        ("d", "too_similar", "b", round(math.cos(math.radians(20)), 4)),
    ]
    assert rej["a"].score == 0.9
    sel, rej = pick(threshold=0.95, block=block)  # cos(20 deg) = 0.940 < 0.95: d is diverse enough now
    assert sel == ["b", "d", "e", "f"] and set(rej) == {"a", "c"}


def test_select_diverse_row_budget():
    sel, rej = pick(threshold=0.9, budget_rows=2)
    assert sel == ["b", "e"]
    assert {k: u.reason for k, u in rej.items()} == {"a": "too_similar", "c": "over_budget", "d": "too_similar", "f": "over_budget"}
    assert "row budget (2 rows)" in rej["c"].detail
    sel, rej = pick(budget_rows=0)
    assert sel == [] and all(u.reason == "over_budget" for u in rej.values()) and len(rej) == 6


def test_select_diverse_token_budget():
    counts = [5, 10, 5, 5, 20, 3]  # a b c d e f
    sel, rej = pick(threshold=0.9, budget_tokens=30, token_counts=counts)
    assert sel == ["b", "e"] and rej["f"].reason == "over_budget" and "token budget (30 tokens)" in rej["f"].detail
    sel, rej = pick(threshold=0.9, budget_tokens=29, token_counts=counts)  # e (20) no longer fits: stop there
    assert sel == ["b"]
    assert {k: u.reason for k, u in rej.items()} == {"a": "too_similar", "c": "over_budget", "d": "too_similar",
                                                     "e": "over_budget", "f": "over_budget"}
    with pytest.raises(ValueError, match="token_counts"):
        pick(budget_tokens=10)


def test_select_diverse_ties_and_missing_scores_are_deterministic():
    sel, rej = pick(scores=[0.5] * 6, threshold=0.9)  # all tied: input order a b c d e f
    assert sel == ["a", "c", "d", "f"]
    assert (rej["b"].similar_to, rej["e"].similar_to) == ("a", "c")
    sel, rej = pick(scores=[None, 0.5, None, 0.5, 0.5, 0.5], threshold=0.9)  # None last: b d e f, then a c
    assert sel == ["b", "e", "f"]
    assert {k: u.similar_to for k, u in rej.items()} == {"a": "b", "c": "e", "d": "b"}
    with pytest.raises(ValueError):
        pick(scores=[0.1])
