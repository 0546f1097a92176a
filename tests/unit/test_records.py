"""Structural validation (cases C04-C07 in docs/cases.md): each bad row is rejected with file, line and rule; no crash."""

from tunegate.config import SourceConfig
from tunegate.data.records import normalize_text, read_source

from conftest import chat, write_jsonl


def read(tmp_path, rows, fmt="chat", **kw):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    return read_source(SourceConfig(path=path, format=fmt, **kw))


def test_c05_bad_roles_each_rejected_with_rule_and_line(tmp_path):
    rows = [
        {"id": "r1", "messages": [{"role": "user", "content": "Hello"}, {"role": "user", "content": "Anyone?"}, {"role": "assistant", "content": "Yes."}]},
        {"id": "r2", "messages": [{"role": "assistant", "content": "Hi"}]},
        {"id": "r3", "messages": [{"role": "customer", "content": "Refund"}, {"role": "assistant", "content": "request_refund"}]},
        {"id": "r4", "messages": [{"role": "user", "content": "Fine row"}, {"role": "assistant", "content": "ok"}]},
        "not json at all",
        {"id": "r6", "messages": "should be a list"},
        {"id": "r7", "messages": [{"role": "user", "content": "no answer"}]},
    ]
    records, rejected = read(tmp_path, rows)
    assert [r["id"] for r in records] == ["r4"]
    got = {(r.line, r.id, r.rule) for r in rejected}
    assert got == {
        (1, "r1", "role_order"),
        (2, "r2", "role_order"),
        (3, "r3", "unknown_role"),
        (5, None, "invalid_json"),
        (6, "r6", "wrong_type"),
        (7, "r7", "role_order"),
    }
    assert all(r.file.endswith("in.jsonl") for r in rejected)
    assert "customer" in next(r.detail for r in rejected if r.id == "r3")


def test_c06_list_of_text_parts_is_joined(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]},
    ]
    records, rejected = read(tmp_path, rows)
    assert records[0]["messages"][0]["content"] == "Part one. Part two."
    assert records[0]["messages"][1]["content"] == "ok"
    assert [(r.line, r.rule) for r in rejected] == [(2, "non_text_content"), (3, "wrong_type")]


def test_c07_empty_and_whitespace_turns_are_dropped(tmp_path):
    rows = [
        chat("What is the exchange rate?", ""),
        chat("   ", "exchange_rate"),
        chat("What is the exchange rate?", " \n\t "),
        chat("What is the exchange rate?", "exchange_rate"),
    ]
    records, rejected = read(tmp_path, rows)
    assert len(records) == 1
    assert [r.rule for r in rejected] == ["empty_turn"] * 3


def test_invalid_utf8_is_a_rejected_row_not_a_crash(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n' + (
        '{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}\n').encode())
    records, rejected = read_source(SourceConfig(path=path))
    assert len(records) == 1 and rejected[0].rule == "invalid_utf8" and rejected[0].line == 1


def test_prompt_completion_rows(tmp_path):
    rows = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "x"}, {"prompt": "y", "completion": 3}]
    records, rejected = read(tmp_path, rows, fmt="prompt_completion")
    assert records[0]["prompt"] == "2+2=" and records[0]["completion"] == " 4"
    assert [r.rule for r in rejected] == ["missing_field", "wrong_type"]


def test_csv_mapping_with_instruction_and_seeded_sample(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,category\n" + "".join(f"msg {i},label_{i % 3}\n" for i in range(50)) + ",empty_text\n")
    cfg = dict(path=path, format="csv", prompt_column="text", completion_column="category", instruction="Label?")
    records, rejected = read_source(SourceConfig(**cfg))
    assert len(records) == 50 and rejected[0].rule == "empty_turn" and rejected[0].line == 52
    assert records[0]["messages"] == [
        {"role": "system", "content": "Label?"},
        {"role": "user", "content": "msg 0"},
        {"role": "assistant", "content": "label_0"},
    ]
    a, _ = read_source(SourceConfig(**cfg, sample=10, seed=1))
    b, _ = read_source(SourceConfig(**cfg, sample=10, seed=1))
    c, _ = read_source(SourceConfig(**cfg, sample=10, seed=2))
    assert [r["id"] for r in a] == [r["id"] for r in b] != [r["id"] for r in c]


def test_csv_missing_column_names_file_and_header(tmp_path):
    import pytest

    from tunegate import TunegateError

    path = tmp_path / "d.csv"
    path.write_text("text,label\nhi,x\n")
    with pytest.raises(TunegateError, match=r"d.csv:1: column\(s\) category not in the header"):
        read_source(SourceConfig(path=path, format="csv", prompt_column="text", completion_column="category"))


def test_missing_file_is_one_clear_error(tmp_path):
    import pytest

    from tunegate import TunegateError

    with pytest.raises(TunegateError, match="nope.jsonl: data file not found"):
        read_source(SourceConfig(path=tmp_path / "nope.jsonl"))


def test_normalize_text():
    assert normalize_text("Can I get a refund for\nan item I   returned?") == normalize_text("can i get a refund for an item i returned?")
