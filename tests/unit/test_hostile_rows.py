"""Readers under hostile input (issue 23): a byte-order mark is read as UTF-8 in every format (kind 8), and a row
no rule foresaw is rejected with a rule instead of stopping the read (kind 2)."""

import json

import pytest

from tunegate.config import SourceConfig
from tunegate.core.io import iter_jsonl
from tunegate.data import records
from tunegate.data.records import read_source

CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BOM = "\ufeff"


@pytest.mark.parametrize("name, text, fmt", [
    ("a.jsonl", BOM + json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n", "chat"),
    ("a.json", BOM + json.dumps([CHAT, CHAT]), "chat"),
    ("a.csv", BOM + "prompt,completion\nq,a\nq2,a2\n", "prompt_completion"),
    ("a.tsv", BOM + "prompt\tcompletion\nq\ta\nq2\ta2\n", "prompt_completion"),
])
def test_a_byte_order_mark_loses_no_row(tmp_path, name, text, fmt):
    (tmp_path / name).write_text(text, encoding="utf-8")
    rows, rejected = read_source(SourceConfig(path=tmp_path / name, format=fmt))
    assert (len(rows), rejected) == (2, [])


def test_a_golden_file_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "golden.jsonl").write_text(BOM + json.dumps(CHAT) + "\n", encoding="utf-8")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "golden.jsonl", format="chat"), role="golden")
    assert len(rows) == 1 and rejected == []
    assert [v for _, v, e in iter_jsonl(tmp_path / "golden.jsonl")] == [CHAT]  # corpus, IFEval and seed files too


def test_nesting_past_the_parser_and_huge_integers_are_rejected_rows(tmp_path):
    lines = [json.dumps(CHAT), '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}", '{"id": ' + "7" * 5000 + "}",
             json.dumps(CHAT)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.jsonl", format="chat"))
    assert len(rows) == 2
    assert [(r.line, r.rule) for r in rejected] == [(2, "invalid_json"), (3, "invalid_json")]
    assert "nested deeper" in rejected[0].detail


def test_a_csv_field_over_the_limit_rejects_its_row_and_the_next_rows_are_read(tmp_path, monkeypatch):
    import csv

    monkeypatch.setattr(records, "CSV_FIELD_LIMIT", 1000)
    (tmp_path / "a.csv").write_text("prompt,completion\nq1,a1\nq2," + "x" * 5000 + "\nq3,a3\n")
    before = csv.field_size_limit()
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.csv", format="prompt_completion"))
    assert csv.field_size_limit() == before  # the reader leaves the process-wide limit as it found it
    assert [r["prompt"] for r in rows] == ["q1", "q3"]
    assert [(r.line, r.rule) for r in rejected] == [(3, "field_too_large")]


def test_a_row_no_rule_foresaw_is_rejected_and_the_read_goes_on(tmp_path, monkeypatch):
    """Whatever a row trips over inside the row parser (here a TypeError), it is rejected as unreadable_row."""
    real = records.parse_row

    def parse_row(obj, *args):
        if obj.get("id") == "bad":
            raise TypeError("unhashable type: 'dict'")
        return real(obj, *args)

    monkeypatch.setattr(records, "parse_row", parse_row)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({**CHAT, "id": i}) for i in ("a", "bad", "c")) + "\n")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.jsonl", format="chat"))
    assert [r["id"] for r in rows] == ["a", "c"]
    assert [(r.line, r.rule, r.detail) for r in rejected] == [(2, "unreadable_row", "TypeError: unhashable type: 'dict'")]
