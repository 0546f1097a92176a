"""Preference pairs (case C08 in docs/cases.md), HH-RLHF transcripts, KTO rows and raw text: canonical records or rejections."""

import pytest

from tunegate.config import SourceConfig
from tunegate.data.records import parse_hh_transcript, read_source, record_kind, RowError, text_slots, with_texts

from conftest import write_jsonl

PROMPT = [{"role": "user", "content": "Summarise: the card arrived late."}]


def read(tmp_path, rows, fmt, **kw):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    return read_source(SourceConfig(path=path, format=fmt, **kw))


def test_c08_identical_pairs_are_rejected_after_whitespace_normalisation_and_near_ones_flagged(tmp_path):
    a = [{"role": "assistant", "content": "The card was late."}]
    rows = [
        {"id": "same", "prompt": PROMPT, "chosen": a, "rejected": a},
        {"id": "spaces", "prompt": PROMPT, "chosen": a, "rejected": [{"role": "assistant", "content": "The card  was LATE. "}]},
        {"id": "near", "prompt": PROMPT, "chosen": "The card was late; it came on Friday.", "rejected": "The card was late, it came on Friday."},
        {"id": "real", "prompt": PROMPT, "chosen": a, "rejected": [{"role": "assistant", "content": "Cards are made of plastic."}]},
    ]
    records, rejected = read(tmp_path, rows, "preference")
    assert [(r.id, r.rule) for r in rejected] == [("same", "identical_pair"), ("spaces", "identical_pair")]
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {"near", "real"}
    assert by_id["near"]["meta"]["near_identical"] >= 0.95 and "near_identical" not in by_id["real"]["meta"]
    real = by_id["real"]
    assert real["messages"] == [*PROMPT, a[0]] and real["rejected"] == "Cards are made of plastic."
    assert record_kind(real) == "preference"


def test_hh_rlhf_transcripts_share_their_prompt_and_differ_in_the_last_answer(tmp_path):
    chosen = "\n\nHuman: hi there\n\nAssistant: Hello! How can I help?\n\nHuman: a pen prank?\n\nAssistant: Swap the ink for water."
    rejected = "\n\nHuman: hi there\n\nAssistant: Hello! How can I help?\n\nHuman: a pen prank?\n\nAssistant: No."
    (rec,), rej = read(tmp_path, [{"chosen": chosen, "rejected": rejected}], "preference")
    assert rej == []
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rec["messages"][2]["content"] == "a pen prank?"
    assert rec["messages"][-1]["content"] == "Swap the ink for water." and rec["rejected"] == "No."


def test_a_pair_whose_conversations_share_no_prompt_is_rejected(tmp_path):
    rows = [{"id": "x", "chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}]
    records, rejected = read(tmp_path, rows, "preference")
    assert records == [] and [(r.id, r.rule) for r in rejected] == [("x", "missing_field")]


def test_parse_hh_transcript_refuses_text_without_turns():
    with pytest.raises(RowError) as err:
        parse_hh_transcript("just some text")
    assert err.value.rule == "hh_format"


def test_kto_rows_need_a_boolean_label(tmp_path):
    rows = [
        {"id": "up", "prompt": "Is the branch open?", "completion": "Yes, until 5pm.", "label": True},
        {"id": "down", "prompt": PROMPT, "completion": [{"role": "assistant", "content": "Maybe."}], "label": False},
        {"id": "str", "prompt": "q", "completion": "a", "label": "true"},
        {"id": "none", "prompt": "q", "completion": "a"},
    ]
    records, rejected = read(tmp_path, rows, "kto")
    assert [(r["id"], r["label"], record_kind(r)) for r in records] == [("up", True, "kto"), ("down", False, "kto")]
    assert [(r.id, r.rule) for r in rejected] == [("str", "wrong_type"), ("none", "missing_field")]


def test_raw_text_reads_the_named_column_and_rejects_empty_text(tmp_path):
    rows = [{"id": "a", "body": "The ledger posts transfers."}, {"id": "b", "body": "  "}, {"id": "c", "text": "wrong column"}]
    records, rejected = read(tmp_path, rows, "text", text_column="body")
    assert [(r["id"], r["text"], record_kind(r)) for r in records] == [("a", "The ledger posts transfers.", "text")]
    assert [(r.id, r.rule) for r in rejected] == [("b", "empty_turn"), ("c", "missing_field")]


def test_text_slots_cover_every_free_text_field_of_every_kind():
    pair = {"id": "p", "messages": [*PROMPT, {"role": "assistant", "content": "ok"}], "rejected": "no"}
    slots = dict(text_slots(pair))
    assert slots == {0: PROMPT[0]["content"], 1: "ok", "rejected": "no"}
    redacted = with_texts(pair, {w: t.upper() for w, t in slots.items()})
    assert redacted["rejected"] == "NO" and redacted["messages"][1]["content"] == "OK" and pair["rejected"] == "no"
    assert dict(text_slots({"id": "t", "text": "raw"})) == {"text": "raw"}


def test_method_and_source_format_must_fit(tmp_path):
    from tunegate import TunegateError
    from tunegate.config import load_project

    (tmp_path / "p.yaml").write_text("""
name: x
data:
  sources: [{path: train.jsonl, format: chat}]
  golden: {path: golden.jsonl}
train: {method: dpo}
""")
    with pytest.raises(TunegateError, match=r"format chat, which train.method dpo cannot train on; it takes: preference"):
        load_project(tmp_path / "p.yaml")


def test_hh_prompt_ending_in_assistant_and_ultrafeedback_rows_keep_only_the_answers(tmp_path):
    rows = [
        {"id": "hh", "prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"},
        {"id": "hh2", "prompt": "\n\nHuman: What is 2+2?\n\nAssistant: ", "chosen": " 4", "rejected": " 22"},
        {"id": "uf", "prompt": "Name a prime.", "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
         "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "9"}]},
    ]
    records, rejected = read(tmp_path, rows, "preference")
    assert rejected == []
    got = {r["id"]: (r["messages"], r["rejected"]) for r in records}
    assert got["hh"] == ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], "5")
    assert got["hh2"][0][0]["content"] == "What is 2+2?" and got["hh2"][1] == "22"
    assert got["uf"] == ([{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}], "9")


def test_kto_rows_with_opposite_labels_are_not_duplicates():
    from tunegate.data.records import row_text

    up = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}
    assert row_text(up) != row_text({**up, "label": False})
