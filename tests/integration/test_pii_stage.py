"""The data stage with `data.pii` set: redacted rows are trained on, rows the re-scan flags are rejected,
counts reach stats.json and the data card, and a golden copy hidden by redaction is still caught."""

import json

from conftest import chat

from tunegate.config import load_project
from tunegate.pipeline import run_pipeline


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_data_stage_redacts_rejects_on_rescan_and_reports(tiny_project):
    with open(tiny_project / "train.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in [
            chat("please call me on 020 7946 0958 about topic alpha", "alpha", "pii1"),
            chat("write to ann@example.com about topic beta", "beta", "pii2"),
            chat("golden question 3 on alpha, from bob@example.com", "alpha", "leak"),  # a golden row plus an e-mail
        ])
    with open(tiny_project / "golden.jsonl", "a") as f:  # a new golden row: the lock is written on first run
        f.write(json.dumps(chat("golden question 3 on alpha, from bob@example.com", "alpha", "g-leak")) + "\n")
    overrides = ["data.pii={mode: mask, entities: [EMAIL_ADDRESS, PHONE_NUMBER]}", "data.max_rejected_fraction=0.2"]
    run_pipeline(load_project(tiny_project / "tunegate.yaml", overrides), until="data")
    out = tiny_project / "runs/default/data"
    rows = {r["id"]: r for r in _rows(out / "train.jsonl") + _rows(out / "val.jsonl")}
    assert rows["pii1"]["messages"][0]["content"] == "please call me on <PHONE_NUMBER> about topic alpha"
    assert rows["pii2"]["messages"][0]["content"] == "write to <EMAIL_ADDRESS> about topic beta"
    rejected = _rows(out / "rejected.jsonl")
    assert [(r["id"], r["rule"]) for r in rejected] == [("leak", "golden_overlap")]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pii"]["found_by_type"] == {"EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1}
    assert stats["pii"]["rows_with_pii"] == 3 and stats["pii"]["rows_dropped_rescan"] == 0
    assert stats["pii"]["golden_rows_with_pii"] == 1 and "seconds" not in stats["pii"]  # reported, not redacted
    card = (out / "data_card.md").read_text()
    assert "## PII" in card and "| EMAIL_ADDRESS | 2 | 0 |" in card and "| PHONE_NUMBER | 1 | 0 |" in card


def test_rescan_rejections_go_to_rejected_jsonl(tiny_project):
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write(json.dumps(chat("reach me at 020 7946 0958 about topic gamma", "gamma", "planted")) + "\n")
    overrides = ["data.pii={entities: [PHONE_NUMBER], score_threshold: 0.9, rescan_score_threshold: 0.3}"]
    run_pipeline(load_project(tiny_project / "tunegate.yaml", overrides), until="data")
    out = tiny_project / "runs/default/data"
    rejected = _rows(out / "rejected.jsonl")
    assert [(r["id"], r["rule"], r["detail"]) for r in rejected] == [
        ("planted", "pii_rescan", "re-scan after mask still finds PHONE_NUMBER x1 (values not logged)")]
    assert "7946" not in (out / "train.jsonl").read_text() + (out / "val.jsonl").read_text()
    assert "7946" not in (out / "rejected.jsonl").read_text()
