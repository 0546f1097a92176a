"""Alpaca, ShareGPT and OpenAI request/response logs; JSON arrays, TSV, Parquet and `datasets` folders with a
column mapping. Every shape lands in the one canonical record, and a bad row is a rejection naming its rule."""

import json

import pytest

from tunegate import TunegateError
from tunegate.config import SourceConfig
from tunegate.data.records import read_source, source_files

from conftest import write_jsonl

USER_ASSISTANT = [{"role": "user", "content": "Where is my card?"}, {"role": "assistant", "content": "card_arrival"}]


def test_alpaca_input_follows_the_instruction_and_system_is_kept(tmp_path):
    rows = [
        {"instruction": "Classify the intent.", "input": "Where is my card?", "output": "card_arrival"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
        {"instruction": "No output here."},
        {"instruction": "Empty answer.", "output": "  "},
        {"instruction": 3, "output": "x"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))  # Alpaca ships as one JSON array
    records, rejected = read_source(SourceConfig(path=path, format="alpaca", license="CC-BY-NC-4.0"))
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Classify the intent.\n\nWhere is my card?"}, {"role": "assistant", "content": "card_arrival"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    ]
    assert [(r.line, r.rule) for r in rejected] == [(3, "missing_field"), (4, "empty_turn"), (5, "wrong_type")]
    assert records[0]["meta"] == {"file": str(path), "line": 1, "license": "CC-BY-NC-4.0"}
    assert records[0]["id"] == "alpaca:1"


def test_sharegpt_maps_speakers_and_rejects_tool_turns(tmp_path):
    rows = [
        {"id": "a", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                                      {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "{}"}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        {"id": "d", "turns": []},
    ]
    records, rejected = read_source(SourceConfig(path=write_jsonl(tmp_path / "sg.jsonl", rows), format="sharegpt"))
    assert [m["role"] for m in records[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert records[0]["messages"][-1]["content"] == "A2" and records[0]["meta"] == {"file": str(tmp_path / "sg.jsonl"), "line": 1}
    assert [(r.id, r.rule) for r in rejected] == [("b", "unknown_role"), ("c", "role_order"), ("d", "missing_field")]


def _log(answer="card_arrival", finish="stop", **extra):
    return {
        "request": {"model": "tg-banking", "messages": [{"role": "developer", "content": "Label it."}, {"role": "user", "content": "Where is my card?"}]},
        "response": {"id": "chatcmpl-1", "model": "tg-banking", "created": 1700000000,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
                     "usage": {"prompt_tokens": 9, "completion_tokens": 3}},
        **extra,
    }


def test_openai_logs_become_chats_with_provenance_and_unusable_answers_are_rejected(tmp_path):
    batch_line = {"custom_id": "req-7", "request": {"body": _log()["request"]}, "response": {"status_code": 200, "body": _log("lost_card")["response"]}}
    rows = [
        _log(),
        batch_line,
        _log(finish="length"),
        _log(answer=None),
        {"custom_id": "req-9", "request": {"body": _log()["request"]}, "response": {"status_code": 500, "body": {}}},
        {"request": {"messages": []}},
    ]
    records, rejected = read_source(SourceConfig(path=write_jsonl(tmp_path / "log.jsonl", rows), format="openai_log"))
    first, batch = records
    assert first["messages"] == [{"role": "system", "content": "Label it."}, {"role": "user", "content": "Where is my card?"},
                                 {"role": "assistant", "content": "card_arrival"}]
    assert first["id"] == "chatcmpl-1" and first["meta"]["model"] == "tg-banking" and first["meta"]["usage"]["completion_tokens"] == 3
    assert batch["id"] == "req-7" and batch["messages"][-1]["content"] == "lost_card"
    assert [(r.line, r.rule) for r in rejected] == [(3, "truncated_response"), (4, "non_text_content"), (5, "failed_response"), (6, "missing_field")]


def test_tsv_and_column_mapping_for_prompt_completion(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text("question\tanswer\textra\nWhat is 2+2?\t4\tx\nCapital of France?\tParis\ty\n")
    records, rejected = read_source(SourceConfig(path=path, format="prompt_completion", columns={"prompt": "question", "completion": "answer"}))
    assert rejected == []
    assert [(r["prompt"], r["completion"], r["meta"]["extra"], r["meta"]["line"]) for r in records] == [
        ("What is 2+2?", "4", "x", 2), ("Capital of France?", "Paris", "y", 3)]
    with pytest.raises(TunegateError, match=r"qa.tsv:1: column\(s\) reply not in the header"):
        read_source(SourceConfig(path=path, format="prompt_completion", columns={"prompt": "question", "completion": "reply"}))


def test_parquet_with_csv_style_columns_and_a_parquet_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["Where is my card?", "I lost my card", ""], "category": ["card_arrival", "lost_card", "x"]})
    pq.write_table(table, tmp_path / "train.parquet")
    src = SourceConfig(path=tmp_path / "train.parquet", format="csv", prompt_column="text", completion_column="category", instruction="Label?")
    records, rejected = read_source(src)
    assert [r["messages"] for r in records][0] == [{"role": "system", "content": "Label?"}, *USER_ASSISTANT]
    assert [(r.line, r.rule) for r in rejected] == [(3, "empty_turn")]
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(0, 1), folder / "part-0.parquet")
    pq.write_table(table.slice(1, 1), folder / "part-1.parquet")
    recs2, _ = read_source(SourceConfig(path=folder, format="csv", prompt_column="text", completion_column="category"))
    assert [r["meta"]["line"] for r in recs2] == [1, 2] and recs2[1]["messages"][0]["content"] == "I lost my card"
    assert source_files(SourceConfig(path=folder)) == [folder / "part-0.parquet", folder / "part-1.parquet"]
    with pytest.raises(TunegateError, match="column"):
        read_source(SourceConfig(path=tmp_path / "train.parquet", format="csv", prompt_column="question", completion_column="category"))


def test_datasets_folder_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"messages": USER_ASSISTANT, "id": "t1"}]),
        "test": datasets.Dataset.from_list([{"messages": USER_ASSISTANT, "id": "s1"}]),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    (rec,), rej = read_source(SourceConfig(path=tmp_path / "ds", format="chat"))
    assert rej == [] and rec["id"] == "t1" and rec["messages"] == USER_ASSISTANT
    (rec,), _ = read_source(SourceConfig(path=tmp_path / "ds", format="chat", split="test"))
    assert rec["id"] == "s1"
    with pytest.raises(TunegateError, match="no split 'validation'; it has train, test"):
        read_source(SourceConfig(path=tmp_path / "ds", split="validation"))


def test_a_source_is_a_path_or_a_hub_id_and_the_golden_set_a_local_file(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of"):
        SourceConfig(format="chat")
    with pytest.raises(ValidationError, match="exactly one of"):
        SourceConfig(path=tmp_path / "a.jsonl", hub="org/name")
    assert SourceConfig(hub="org/name").name == "hf://org/name:train"


def test_tabular_values_become_json_and_nulls_are_rejections_not_crashes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import datetime as dt

    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["Say hi.", None], "output": ["Hi!", "x"],
                             "ts": [dt.datetime(2026, 1, 2, 3, 4, 5), dt.datetime(2026, 1, 2)], "blob": [b"\x00\x01", b""]}),
                   tmp_path / "a.parquet")
    (rec,), (bad,) = read_source(SourceConfig(path=tmp_path / "a.parquet", format="alpaca"))
    assert rec["meta"]["ts"] == "2026-01-02T03:04:05" and rec["meta"]["blob"] == "AAE="
    assert bad.rule == "missing_field" and bad.line == 2
    json.dumps(rec), json.dumps(bad.to_json())  # nothing left that JSON lines cannot hold


def test_csv_columns_rename_before_the_header_check_and_kto_labels_from_cells(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhere is my card?,card_arrival\n")
    (rec,), _ = read_source(SourceConfig(path=path, format="csv", columns={"prompt": "question", "completion": "answer"}))
    assert rec["messages"] == USER_ASSISTANT
    kto = tmp_path / "kto.csv"
    kto.write_text("prompt,completion,label\nQ1,A1,true\nQ2,A2,False\nQ3,A3,maybe\n")
    recs, rej = read_source(SourceConfig(path=kto, format="kto"))
    assert [r["label"] for r in recs] == [True, False] and [(r.line, r.rule) for r in rej] == [(4, "wrong_type")]


def test_a_hub_snapshot_folder_reads_only_the_configured_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "snap" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"messages": [USER_ASSISTANT], "id": [split]}), tmp_path / "snap" / "data" / f"{split}-00000-of-00001.parquet")
    train, _ = read_source(SourceConfig(path=tmp_path / "snap"))
    test, _ = read_source(SourceConfig(path=tmp_path / "snap", split="test"))
    assert [r["id"] for r in train] == ["train"] and [r["id"] for r in test] == ["test"]
    assert train[0]["meta"]["file"] == f"{tmp_path / 'snap'}:train" != test[0]["meta"]["file"]
    with pytest.raises(TunegateError, match="no 'validation' Parquet files; it has test, train"):
        read_source(SourceConfig(path=tmp_path / "snap", split="validation"))
