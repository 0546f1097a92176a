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
    shared = "please explain why the transfer i made to my landlord last friday morning"
    assert hits[0][2] == f'turn 0 (user) holds a 13-word n-gram of golden row g1\'s prompt: "{shared}"'


def test_a_short_golden_prompt_is_found_inside_padded_training_text():
    """Issue 20: a golden prompt under 13 words was only caught as an exact copy; padded, it stayed in training.
    From min_words (5) words it is looked for whole inside every training turn."""
    gold = [chat("How do I freeze my card?", "lost_or_stolen_card", "g1")]  # 6 words < 13
    train = [chat("how do i FREEZE my card", "x", "same"), chat("Tell me: how do I freeze my card?", "x", "padded_short"),
             chat("How do I freeze my account?", "x", "other"), chat("how do I freeze card", "x", "five_of_six"), chat("so how do I freeze", "x", "four_of_six")]
    hits = golden.ngram_overlap(train, gold)
    assert [(t, g) for t, g, _ in hits] == [("same", "g1"), ("padded_short", "g1")]
    assert hits[1][2] == 'turn 0 (user) holds the whole golden row g1\'s prompt: "how do i freeze my card"'


def test_a_golden_prompt_quoted_in_an_answer_is_found_and_labels_are_not():
    gold = [chat("Why was my card payment declined at the shop?", "declined_card_payment", "g1"),
            chat("Which currencies are supported?", "fiat_currency_support", "g2")]  # 4 words: exact prompt copies only
    train = [
        chat("Summarise the ticket", 'The customer asked: "why was my card payment declined at the shop" and was upset.', "quoted"),
        chat("My card payment was declined", "declined_card_payment", "same_label"),  # a golden answer that is a label
        chat("Tell me which currencies are supported today", "fiat_currency_support", "padded_four"),
    ]
    hits = golden.ngram_overlap(train, gold)
    assert [(t, g) for t, g, _ in hits] == [("quoted", "g1")]
    assert hits[0][2].startswith("turn 1 (assistant) holds the whole golden row g1's prompt")


def test_a_long_golden_answer_is_looked_for_in_training_answers():
    answer = "Open the app, tap Card, then Freeze card; unfreezing works the same way from the same screen"
    gold = [chat("How do I stop my card for a while?", answer, "g1")]
    train = [chat("Something else entirely", "Sure. " + answer.lower() + " Anything else?", "copied_answer")]
    assert [(t, g) for t, g, _ in golden.ngram_overlap(train, gold)] == [("copied_answer", "g1")]


def test_ngram_size_is_configurable_and_on_by_default():
    cfg = DataConfig(sources=[{"path": "a.jsonl"}], golden={"path": "g.jsonl"})
    assert cfg.decontaminate is not None and cfg.decontaminate.ngram == 13
    off = DataConfig(sources=[{"path": "a.jsonl"}], golden={"path": "g.jsonl"}, decontaminate=None)
    assert off.decontaminate is None
    gold = [chat("one two three four five six", "x", "g1")]
    train = [chat("zero two three four nine", "x", "t1"), chat("zero two three nine", "x", "t2")]
    assert [t for t, _, _ in golden.ngram_overlap(train, gold, n=3)] == ["t1"]


def test_decomposed_and_zero_width_copies_are_found():
    """Found by trying it: an NFD "café" copy and a copy with zero-width spaces inside words stayed in training."""
    import unicodedata

    prompt = "Can I pay at the café near the station with my card?"
    gold = [chat(prompt, "card_payment", "g1")]
    train = [chat(unicodedata.normalize("NFD", prompt), "x", "nfd"), chat(prompt.replace("station", "sta\u200btion"), "x", "zw"),
             chat("Can I pay at the cafe near the station with my card?", "x", "no_accent")]
    assert [t for t, _, _ in golden.ngram_overlap(train, gold)] == ["nfd", "zw"]
