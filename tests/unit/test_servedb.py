"""The serving database: tenant keys, exactly-once feedback under concurrent writers, and the feedback export
in the formats the data stage reads."""

import json
import threading

import pytest

from tunegate import TunegateError
from tunegate.config import SourceConfig
from tunegate.core.io import atomic_write_jsonl
from tunegate.data.records import read_source
from tunegate.serve import db as servedb

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def db(tmp_path):
    return servedb.connect(servedb.default_url(tmp_path))


def trace(db, tid, tenant="acme", adapter="a1", response="Lyon."):
    servedb.write_trace(db, id=tid, tenant=tenant, model=adapter or "base", adapter=adapter, adapter_sha256="ab" * 32,
                        messages=MSGS, params={}, response=response, finish_reason="stop", prompt_tokens=9,
                        completion_tokens=3, latency_ms=12.5)


def test_sqlite_uses_wal_and_a_busy_timeout(db, tmp_path):
    with db.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA busy_timeout").scalar() == int(servedb.BUSY_TIMEOUT_S * 1000)
        assert con.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert (tmp_path / "serve.db").is_file()


def test_tenant_key_is_shown_once_and_only_its_hash_is_stored(db, tmp_path):
    key = servedb.add_tenant(db, "acme", ["a1", "a2", "a1"])
    assert key.startswith("tg-") and len(key) > 40
    raw = (tmp_path / "serve.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("serve.db-*"))
    assert key.encode() not in raw and servedb.key_hash(key).encode() in raw
    t = servedb.tenant_for_key(db, key)
    assert t.name == "acme" and t.adapters == ("a1", "a2") and not t.allow_base
    assert t.may_use("a1") and not t.may_use("b1") and not t.may_use(None)
    assert servedb.tenant_for_key(db, key + "x") is None
    other = servedb.add_tenant(db, "globex", [], allow_base=True)
    assert other != key and servedb.tenant_for_key(db, other).may_use(None)
    with pytest.raises(TunegateError, match="already exists"):
        servedb.add_tenant(db, "acme", ["a1"])
    with pytest.raises(TunegateError, match="at least one adapter"):
        servedb.add_tenant(db, "empty", [])
    listed = servedb.list_tenants(db)
    assert [x["name"] for x in listed] == ["acme", "globex"] and "key" not in json.dumps(listed).replace("key_sha256", "")
    servedb.revoke_tenant(db, "acme")
    assert servedb.tenant_for_key(db, key) is None
    with pytest.raises(TunegateError, match="already revoked"):
        servedb.revoke_tenant(db, "acme")
    with pytest.raises(TunegateError, match="no tenant nobody"):
        servedb.revoke_tenant(db, "nobody")


def test_feedback_idempotency_key_replay_and_conflict(db):
    trace(db, "chatcmpl-1")
    row, replayed = servedb.record_feedback(db, "acme", "chatcmpl-1", "down", "Paris.", "key-1")
    assert not replayed
    again, replayed = servedb.record_feedback(db, "acme", "chatcmpl-1", "down", "Paris.", "key-1")
    assert replayed and again["id"] == row["id"]
    with pytest.raises(servedb.FeedbackConflict, match="different feedback body"):
        servedb.record_feedback(db, "acme", "chatcmpl-1", "up", None, "key-1")
    # no key: the body is the key, so a blind retry is one row; a different body is a new submission
    a, r1 = servedb.record_feedback(db, "acme", "chatcmpl-1", "up", None, None)
    b, r2 = servedb.record_feedback(db, "acme", "chatcmpl-1", "up", None, None)
    assert (r1, r2) == (False, True) and a["id"] == b["id"]
    assert servedb.count_feedback(db) == 2


def test_without_a_key_up_down_up_is_three_rows_and_the_export_reads_up(db, tmp_path):
    trace(db, "chatcmpl-t")
    ratings = []
    for rating in ("up", "up", "down", "up", "up"):  # the repeated ones are retries of the one before
        row, replayed = servedb.record_feedback(db, "acme", "chatcmpl-t", rating, None, None)
        ratings.append((rating, replayed))
    assert ratings == [("up", False), ("up", True), ("down", False), ("up", False), ("up", True)]
    assert servedb.count_feedback(db) == 3
    _, kto, _ = servedb.export_feedback(db)
    assert [r["label"] for r in kto] == [True]


def test_concurrent_retries_without_a_key_are_one_row(tmp_path):
    url = servedb.default_url(tmp_path)
    db = servedb.connect(url)
    trace(db, "chatcmpl-c")
    results, errors = [], []

    def post():
        try:
            results.append(servedb.record_feedback(servedb.connect(url), "acme", "chatcmpl-c", "down", "Paris.", None))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and servedb.count_feedback(db) == 1
    assert sum(1 for _, replayed in results if not replayed) == 1


def test_concurrent_feedback_is_written_exactly_once(tmp_path):
    url = servedb.default_url(tmp_path)
    db = servedb.connect(url)
    for i in range(16):
        trace(db, f"chatcmpl-{i}")
    results, errors = [], []

    def post(i):
        eng = servedb.connect(url)  # each thread its own engine: separate connections, as separate processes would be
        try:
            for attempt in range(3):  # every submission retried 3 times, all at once
                results.append(servedb.record_feedback(eng, "acme", f"chatcmpl-{i}", "up" if i % 2 else "down", None, f"k{i}"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert servedb.count_feedback(db) == 16
    assert sum(1 for _, replayed in results if not replayed) == 16 and len(results) == 48


def test_export_gives_preference_and_kto_rows_the_reader_accepts(db, tmp_path):
    trace(db, "chatcmpl-a", response="Lyon.")
    trace(db, "chatcmpl-b", tenant="globex", adapter=None, response="Paris is the capital.")
    trace(db, "chatcmpl-c", response="Marseille.")
    trace(db, "chatcmpl-d", response="Nice.")  # no feedback: not exported
    servedb.record_feedback(db, "acme", "chatcmpl-a", "down", None, None)
    servedb.record_feedback(db, "acme", "chatcmpl-a", "down", "Paris.", None)  # a later edit on the same trace
    servedb.record_feedback(db, "globex", "chatcmpl-b", "up", None, None)
    servedb.record_feedback(db, "acme", "chatcmpl-c", "down", "Marseille.", None)  # an edit that changes nothing
    pairs, kto, counts = servedb.export_feedback(db)
    sft = counts.pop("sft")
    assert counts == {"feedback_rows": 4, "traces_with_feedback": 3, "kto_rows": 3, "kto_up": 1, "kto_down": 2,
                      "preference_rows": 1, "edits_identical_to_answer": 1, "rejected_by_rule": {}, "rejected": []}
    assert [(r["id"], r["messages"]) for r in sft] == [("chatcmpl-a-sft", [*MSGS, {"role": "assistant", "content": "Paris."}])]
    atomic_write_jsonl(tmp_path / "pref.jsonl", pairs)
    atomic_write_jsonl(tmp_path / "kto.jsonl", kto)
    recs, rej = read_source(SourceConfig(path=tmp_path / "pref.jsonl", format="preference"))
    assert not rej and len(recs) == 1
    r = recs[0]
    assert r["messages"] == [*MSGS, {"role": "assistant", "content": "Paris."}] and r["rejected"] == "Lyon."
    assert r["meta"]["source"] == "feedback" and r["meta"]["trace_id"] == "chatcmpl-a"
    assert r["meta"]["tenant"] == "acme" and r["meta"]["adapter"] == "a1"
    recs, rej = read_source(SourceConfig(path=tmp_path / "kto.jsonl", format="kto"))
    assert not rej
    labels = {x["meta"]["trace_id"]: x["label"] for x in recs}
    assert labels == {"chatcmpl-a": False, "chatcmpl-b": True, "chatcmpl-c": False}
    base_row = next(x for x in recs if x["meta"]["trace_id"] == "chatcmpl-b")
    assert base_row["meta"]["adapter"] is None and base_row["messages"][-1]["content"] == "Paris is the capital."
    # filter by adapter; "base" names the base model
    assert [x["trace_id"] for x in servedb.export_feedback(db, ["base"])[1]] == ["chatcmpl-b"]


def test_an_answer_cut_short_is_left_out_of_the_export(tmp_path):
    """Found by trying it: a thumbs-up on an answer cut by max_tokens became a KTO row labelled good, and the cut
    answer the rejected side of a pair; the openai_log reader rejects such answers (truncated_response)."""
    db = servedb.connect(f"sqlite:///{tmp_path / 'serve.db'}")
    servedb.add_tenant(db, "acme", [], True)
    for tid, reason in (("t-cut", "length"), ("t-ok", "stop")):
        servedb.write_trace(db, id=tid, tenant="acme", model="base", adapter=None, adapter_sha256=None, messages=MSGS,
                            params={}, response="Hello there! How can I", finish_reason=reason, prompt_tokens=9,
                            completion_tokens=6, latency_ms=1.0)
        servedb.record_feedback(db, "acme", tid, "up", "Hello there! How can I help?", None)
    pairs, kto, counts = servedb.export_feedback(db)
    assert [k["trace_id"] for k in kto] == ["t-ok"] and [p["trace_id"] for p in pairs] == ["t-ok"]
    assert counts["rejected_by_rule"] == {"truncated_response": 2}


def test_a_database_from_before_the_version_column_gains_it(tmp_path):
    """A serving database made before traces had `version`: connect adds the column, old rows read NULL, new
    traces store the label and the export carries it as adapter_version."""
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE traces (id VARCHAR(64) PRIMARY KEY, tenant VARCHAR(200) NOT NULL, model VARCHAR(300) NOT NULL,"
                " adapter VARCHAR(200), adapter_sha256 VARCHAR(64), messages JSON NOT NULL, params JSON NOT NULL,"
                " response TEXT NOT NULL, finish_reason VARCHAR(20) NOT NULL, prompt_tokens INTEGER NOT NULL,"
                " completion_tokens INTEGER NOT NULL, created_at DATETIME NOT NULL, latency_ms FLOAT NOT NULL)")
    con.execute("INSERT INTO traces VALUES ('old', 't', 'm', 'a', NULL, '[]', '{}', 'r', 'stop', 1, 1, '2026-01-01 00:00:00', 1.0)")
    con.commit()
    con.close()
    db = servedb.connect(f"sqlite:///{path}")
    assert servedb.get_trace(db, "old")["version"] is None
    servedb.write_trace(db, id="new", tenant="t", model="svc", adapter="svc", version="svc-v2", adapter_sha256=None,
                        messages=[{"role": "user", "content": "hi"}], params={}, response="yes", finish_reason="stop",
                        prompt_tokens=1, completion_tokens=1, latency_ms=1.0)
    servedb.record_feedback(db, "t", "new", "up", None, None)
    _, kto, _ = servedb.export_feedback(db)
    assert [(k["trace_id"], k["adapter_version"]) for k in kto] == [("new", "svc-v2")]
