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


def test_a_csv_line_over_the_row_limit_rejects_its_row_and_the_next_rows_are_read(tmp_path):
    import csv

    (tmp_path / "a.csv").write_text("prompt,completion\nq1,a1\nq2," + "x" * 5000 + "\nq3,a3\n")
    before = csv.field_size_limit()
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.csv", format="prompt_completion", max_row_bytes=1024))
    assert csv.field_size_limit() == before  # the reader leaves the process-wide limit as it found it
    assert [r["prompt"] for r in rows] == ["q1", "q3"]
    assert [(r.line, r.rule) for r in rejected] == [(3, "row_too_large")]
    assert "5,004 bytes > max_row_bytes 1,024" in rejected[0].detail


def test_a_csv_row_over_the_limit_across_lines_is_one_rejection_and_the_next_rows_are_read(tmp_path):
    """Every line is under the limit, the row they make is not: the row is rejected whole (memory stays bounded
    by the limit) and the parser stays in step, so the rest of the quoted field is not read as rows."""
    (tmp_path / "a.csv").write_text("prompt,completion\nq1,a1\nq2,\"" + ("y" * 600 + "\n") * 3 + "end\"\nq3,a3\n")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.csv", format="prompt_completion", max_row_bytes=1024))
    assert [r["prompt"] for r in rows] == ["q1", "q3"]
    assert [(r.line, r.rule) for r in rejected] == [(3, "row_too_large")]


def test_a_bad_line_inside_a_quoted_csv_field_rejects_that_row_only(tmp_path):
    """Found in review: a line that was not UTF-8 (or too long) inside a quoted field reset the parser, and the rest
    of the field became a row of its own ('world"', 'answer') that was kept."""
    for bad in (b"\xff\n", b"z" * 3000 + b'"x"\n'):
        (tmp_path / "a.csv").write_bytes(b'prompt,completion\nq1,a1\n"hello\n' + bad + b'world",answer\nq3,a3\n')
        rows, rejected = read_source(SourceConfig(path=tmp_path / "a.csv", format="prompt_completion", max_row_bytes=1024))
        assert [r["prompt"] for r in rows] == ["q1", "q3"], bad[:4]
        assert [r.line for r in rejected] == [3] and rejected[0].rule in ("invalid_utf8", "row_too_large")


def test_a_csv_file_with_old_mac_line_endings_is_read(tmp_path):
    (tmp_path / "a.csv").write_bytes(b'prompt,completion\rq1,a1\r"q\r2",a2\r')
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.csv", format="prompt_completion"))
    assert [r["prompt"] for r in rows] == ["q1", "q\r2"] and rejected == []


def test_a_csv_line_that_is_not_utf8_rejects_that_row_only(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"prompt,completion\nq1,a1\nq2,\xff\xfe bad\nq3,a3\n")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.csv", format="prompt_completion"))
    assert [r["prompt"] for r in rows] == ["q1", "q3"]
    assert [(r.line, r.rule) for r in rejected] == [(3, "invalid_utf8")]


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


# ---- kind 3: a row's size is bounded before it is parsed or tokenized ----------------------------------------

def test_a_jsonl_line_over_max_row_bytes_is_rejected_unparsed_and_the_next_lines_are_read(tmp_path):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "a"}]})
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps(CHAT), big, json.dumps(CHAT)]) + "\n", encoding="utf-8")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.jsonl", format="chat", max_row_bytes=1024))
    assert len(rows) == 2
    assert [(r.line, r.rule) for r in rejected] == [(2, "row_too_large")]
    assert f"{len(big) + 1:,} bytes" in rejected[0].detail  # the line's size, newline included
    assert len(rejected[0].raw) <= 200  # rejected.jsonl keeps the start of the row, not the row


def test_a_huge_line_without_a_newline_is_read_past_in_bounded_memory(tmp_path):
    """The last line has no newline and is 20 MB: reading it must not hold it whole (tracemalloc peak)."""
    import tracemalloc

    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps(CHAT) + "\n")
        f.write('{"messages": [{"role": "user", "content": "' + "z" * (20 * 2**20))
    tracemalloc.start()
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.jsonl", format="chat", max_row_bytes=1024))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == 1 and [(r.line, r.rule) for r in rejected] == [(2, "row_too_large")]
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MB while reading past a 20 MB line"


@pytest.mark.parametrize("name", ["a.json", "a.parquet"])
def test_rows_read_whole_by_their_format_are_checked_against_max_row_bytes(tmp_path, name):
    big = {"messages": [{"role": "user", "content": "é" * 3000}, {"role": "assistant", "content": "a"}]}  # 6,000 bytes
    if name == "a.json":
        (tmp_path / name).write_text(json.dumps([CHAT, big, CHAT]), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([CHAT, big, CHAT]), tmp_path / name)
    rows, rejected = read_source(SourceConfig(path=tmp_path / name, format="chat", max_row_bytes=4096))
    assert len(rows) == 2 and [(r.line, r.rule) for r in rejected] == [(2, "row_too_large")]
    assert "6,0" in rejected[0].detail and len(rejected[0].raw) <= 200


def test_text_bytes_counts_utf8_bytes():
    assert records.text_bytes({"ab": ["é", 12, None, [[["x"]]]]}) == 2 + 2 + 2 + 4 + 1
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert records.text_bytes(deep) == 0  # nested past the recursion limit: counted, not a RecursionError


def test_an_overlong_row_is_rejected_without_tokenizing_it(tokenizer, monkeypatch):
    """With `drop`, a row of more than max_length x the longest token's characters cannot fit: it is rejected
    before the tokenizer sees it (a 50 MB row once took minutes and gigabytes to tokenize)."""
    from tunegate.data import format as fmt

    calls = []
    real = fmt.token_ids
    monkeypatch.setattr(fmt, "token_ids", lambda tok, text: calls.append(len(text)) or real(tok, text))
    longest = fmt.max_token_chars(tokenizer)
    rec = {"messages": [{"role": "user", "content": "y" * (64 * longest + 1)}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(records.RowError) as err:
        fmt.encode_record(tokenizer, rec, max_length=64, policy="drop")
    assert err.value.rule == "overlength" and "not tokenized" in err.value.detail and calls == []
    with pytest.raises(records.RowError):  # cut_context_left keeps the answer whole: an answer that cannot fit
        fmt.encode_record(tokenizer, {"messages": [rec["messages"][1] | {"role": "user"},
                                                        {"role": "assistant", "content": rec["messages"][0]["content"]}]},
                          max_length=64, policy="cut_context_left")
    assert calls == []
    short = {"messages": [{"role": "user", "content": "y" * 300}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(records.RowError, match="tokens > max_length"):  # under the bound: tokenized, then dropped
        fmt.encode_record(tokenizer, short, max_length=64, policy="drop")
    assert calls


@pytest.mark.parametrize("line", [
    '{"messages": "\\ud800"}',  # a lone surrogate in a row of the wrong shape: rejected.jsonl keeps it, escaped
    '{"messages": [{"role": "user", "content": "x \\udfff"}, {"role": "assistant", "content": "a"}]}',
])
def test_a_lone_surrogate_is_invalid_unicode_and_rejected_jsonl_stays_utf8(tmp_path, line):
    """Found by the fuzz suite: a surrogate in a rejected row's raw text made writing rejected.jsonl raise
    UnicodeEncodeError, which stopped the data stage."""
    from tunegate.core.io import atomic_write_jsonl, read_jsonl

    (tmp_path / "a.jsonl").write_text(json.dumps(CHAT) + "\n" + line + "\n", encoding="utf-8")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.jsonl", format="chat"))
    assert len(rows) == 1 and [(r.line, r.rule) for r in rejected] == [(2, "invalid_unicode")]
    atomic_write_jsonl(tmp_path / "rejected.jsonl", [r.to_json() for r in rejected])
    (tmp_path / "rejected.jsonl").read_bytes().decode("utf-8")  # valid UTF-8
    assert read_jsonl(tmp_path / "rejected.jsonl")[0]["raw"] == json.loads(line)


@pytest.mark.parametrize("text, code", [("\x00 nul", 0x0), ("title \x1b]0;PWNED\x07", 0x1B), ("c1 \x9b2J", 0x9B), ("del \x7f", 0x7F)])
def test_a_control_character_is_rejected_and_tab_newline_form_feed_are_kept(tmp_path, text, code):
    """Found by the attacker pass on issue 22: a tenant's edit holding ESC sequences became a training row, and
    `data-preview` then printed them raw to the operator's terminal."""
    kept = {"messages": [{"role": "user", "content": "a\tb\nc\r\n\x0bd\x0c"}, {"role": "assistant", "content": "ok"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(kept) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.jsonl", format="chat"))
    assert len(rows) == 1 and [(r.line, r.rule) for r in rejected] == [(2, "control_character")]
    assert f"U+{code:04X}" in rejected[0].detail


def test_iter_jsonl_yields_every_bad_line_as_an_error_and_reads_on(tmp_path):
    """The reader of the corpus, IFEval and seed files: a line that is not UTF-8, nested past the parser, or
    longer than the limit is an error for that line (audit.read_corpus names it), never a UnicodeDecodeError."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n' + b"[" * 100_000 + b"\n" + b'"' + b"x" * 300_000 + b'"\n{"a": 2}\n')
    got = [(n, error is None) for n, _, error in iter_jsonl(path, max_line_bytes=200_000)]
    assert got == [(1, True), (2, False), (3, False), (4, False), (5, True)]
    errors = [str(e) for _, _, e in iter_jsonl(path, max_line_bytes=200_000) if e is not None]
    assert "not UTF-8" in errors[0] and "nested deeper" in errors[1] and "300,003 bytes" in errors[2]


@pytest.mark.parametrize("extra", ["messages", "meta_key"])
def test_a_row_nested_deep_but_within_the_parser_is_rejected_as_too_deep(tmp_path, extra):
    """Found in review: a row nested ~600 levels parses, then writing rejected.jsonl (a deep copy) or handing a kept
    row to a worker process (pickle) raised RecursionError, which stopped the data stage."""
    import pickle

    deep = "[" * 600 + "]" * 600
    line = ('{"messages": ' + deep + "}" if extra == "messages" else
            json.dumps(CHAT)[:-1] + ', "extra": ' + deep + "}")
    (tmp_path / "a.jsonl").write_text(json.dumps(CHAT) + "\n" + line + "\n", encoding="utf-8")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.jsonl", format="chat"))
    assert len(rows) == 1 and [(r.line, r.rule) for r in rejected] == [(2, "too_deep")]
    json.dumps(rejected[0].to_json())
    pickle.dumps(rows)


def test_a_parquet_cell_that_is_not_utf8_rejects_its_row_and_a_broken_file_is_one_line(tmp_path):
    """Found by trying it: a string cell with invalid UTF-8 raised UnicodeDecodeError for the whole batch, and a
    truncated .parquet file an ArrowInvalid traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunegate import TunegateError

    good = json.dumps(CHAT).encode()
    col = pa.array([good, b"bad \xff\xfe", good], type=pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"row": col}), tmp_path / "a.parquet")
    rows, rejected = read_source(SourceConfig(path=tmp_path / "a.parquet", format="text", text_column="row"))
    assert len(rows) == 2 and [(r.line, r.rule) for r in rejected] == [(2, "invalid_utf8")]
    (tmp_path / "b.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:40])
    with pytest.raises(TunegateError, match="b.parquet: not a readable Parquet file"):
        read_source(SourceConfig(path=tmp_path / "b.parquet", format="text", text_column="row"))
