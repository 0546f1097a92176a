"""Frozen golden sets: a changed one is refused with the row ids (issue 2), overlap with training (C23 in docs/cases.md)."""

import json

import pytest

from tunegate import TunegateError
from tunegate.config import SourceConfig
from tunegate.data import golden
from tunegate.data.records import read_source

from conftest import chat, write_jsonl

GOLDEN = [chat("I still have not received my new card, it has been two weeks.", "card_arrival", "g1"),
          chat("Can I get a refund for an item I returned?", "refund_not_showing_up", "g2"),
          chat("Why is there a fee on my cash withdrawal?", "cash_withdrawal_charge", "g3")]


def load(path):
    rows, rejected = read_source(SourceConfig(path=path))
    assert not rejected
    return rows


def test_freeze_then_unchanged_passes(tmp_path):
    cfg = SourceConfig(path=write_jsonl(tmp_path / "golden.jsonl", GOLDEN))
    lock, new = golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json")
    assert new and lock["n_rows"] == 3 and set(lock["rows"]) == {"g1", "g2", "g3"}
    _, new_again = golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json")
    assert not new_again


def test_edited_golden_set_is_refused_naming_the_rows(tmp_path):
    cfg = SourceConfig(path=write_jsonl(tmp_path / "golden.jsonl", GOLDEN))
    golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json")
    edited = [GOLDEN[0], chat("Can I get a refund for an item I returned?", "request_refund", "g2"),
              chat("new row", "x", "g9")]
    write_jsonl(cfg.path, edited)
    with pytest.raises(TunegateError) as e:
        golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json")
    msg = str(e.value)
    assert "golden.jsonl" in msg and "1 changed: g2" in msg and "1 added: g9" in msg and "1 removed: g3" in msg
    # a deliberate new version is accepted with force
    lock, new = golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json", force=True)
    assert new and json.loads((tmp_path / "golden.lock.json").read_text())["rows"]["g2"] == lock["rows"]["g2"]


def test_a_changed_copy_under_an_existing_id_and_extra_rows_are_refused(tmp_path):
    """Found by trying it: the lock kept one hash per id and the last row with an id won, so a tampered row with
    the original appended after it under the same id (and 300 more copies of another row) matched the lock."""
    cfg = SourceConfig(path=write_jsonl(tmp_path / "golden.jsonl", GOLDEN))
    golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json")
    tampered = [chat(GOLDEN[0]["messages"][0]["content"], "TAMPERED", "g1"), *GOLDEN[1:], GOLDEN[0], *[GOLDEN[1]] * 30]
    write_jsonl(cfg.path, tampered)
    with pytest.raises(TunegateError, match=r"2 id\(s\) on more than one row: g1, g2; 34 rows, 3 frozen"):
        golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json")
    with pytest.raises(TunegateError, match="every golden row has its own id"):  # nor can such a set be frozen
        golden.freeze(cfg, load(cfg.path), tmp_path / "golden.lock.json", force=True)


def test_training_ids_repeated_in_one_file_are_made_unique():
    from tunegate.data.records import dedupe_ids

    rows = [{"id": i, "source": "a.jsonl", "meta": {"line": n}} for n, i in enumerate(["x", "x", "1", "y"], start=1)]
    rows.append({"id": "x", "source": "b.jsonl", "meta": {"line": 1}})
    dedupe_ids(rows)
    assert [r["id"] for r in rows] == ["a.jsonl:x@1", "a.jsonl:x@2", "1", "y", "b.jsonl:x"]


def test_c23_overlap_catches_verbatim_and_rewrapped_copies():
    train = [chat("I still have not received my new card, it has been two weeks.", "card_arrival", "t1"),
             chat("Can I get a refund for\nan item I   returned?", "refund_not_showing_up", "t2"),
             chat("How do I freeze my card?", "lost_or_stolen_card", "t3"),
             chat("  WHY is there a fee on my cash withdrawal?  ", "other_label", "t4")]
    assert sorted(golden.overlap(train, GOLDEN)) == [("t1", "g1"), ("t2", "g2"), ("t4", "g3")]
