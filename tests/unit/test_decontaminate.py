"""n-gram decontamination against the golden set (case C23 in docs/cases.md): re-wrapped, padded and re-punctuated copies go."""

import os
from pathlib import Path

import pytest
from conftest import REPO, chat

from tunegate.config import DataConfig, SourceConfig
from tunegate.data import golden
from tunegate.data.records import read_source

CASES = Path(os.environ.get("TUNEGATE_SHARED_CASES", REPO.parent / "shared" / "cases"))
CONTAMINATED = CASES / "inputs" / "contaminated"

LONG = ("Please explain why the transfer I made to my landlord last Friday morning has still not arrived in "
        "his account and what I should do next")  # 26 words


def test_c23_contaminated_inputs_are_all_caught():
    if not (CONTAMINATED / "train.jsonl").is_file():
        pytest.skip(f"case inputs not found at {CONTAMINATED} (set TUNEGATE_SHARED_CASES to the shared cases folder)")
    train, rej = read_source(SourceConfig(path=CONTAMINATED / "train.jsonl"))
    gold, grej = read_source(SourceConfig(path=CONTAMINATED / "golden.jsonl"))
    assert not rej and not grej
    hits = golden.ngram_overlap(train, gold)
    assert [(t, g) for t, g, _ in hits] == [("t1", "g1"), ("t2", "g2")]  # t2 is the re-wrapped, re-spaced copy


def test_padded_and_repunctuated_long_prompt_shares_a_13_gram():
    gold = [chat(LONG, "transfer_not_received_by_recipient", "g1")]
    train = [
        chat("Hi there!! " + LONG.upper().replace(" ", "\n ") + ". Thanks, Ana", "x", "padded"),
        chat(LONG.replace(" ", ", ", 3) + "?", "x", "punct"),
        chat("Please explain why the transfer I made to my landlord last Friday has not arrived", "x", "twelve_shared"),
        chat("How do I freeze my card?", "x", "clean"),
    ]
    hits = golden.ngram_overlap(train, gold, n=13)
    assert [(t, g) for t, g, _ in hits] == [("padded", "g1"), ("punct", "g1")]
    assert hits[0][2] == "please explain why the transfer i made to my landlord last friday morning"
    assert len(hits[0][2].split()) == 13


def test_short_golden_prompt_falls_back_to_exact_normalised_match():
    gold = [chat("How do I freeze my card?", "lost_or_stolen_card", "g1")]  # 6 words < 13
    train = [chat("how do i FREEZE my card", "x", "same"), chat("Tell me: how do I freeze my card?", "x", "padded_short"),
             chat("How do I freeze my account?", "x", "other")]
    assert golden.ngram_overlap(train, gold) == [("same", "g1", "how do i freeze my card")]


def test_ngram_size_is_configurable_and_on_by_default():
    cfg = DataConfig(sources=[{"path": "a.jsonl"}], golden={"path": "g.jsonl"})
    assert cfg.decontaminate is not None and cfg.decontaminate.ngram == 13
    off = DataConfig(sources=[{"path": "a.jsonl"}], golden={"path": "g.jsonl"}, decontaminate=None)
    assert off.decontaminate is None
    gold = [chat("one two three four five six", "x", "g1")]
    train = [chat("zero two three four nine", "x", "t1"), chat("zero two three nine", "x", "t2")]
    assert [t for t, _, _ in golden.ngram_overlap(train, gold, n=3)] == ["t1"]
