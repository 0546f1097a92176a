"""data.select in the data stage (DEITA-style scoring and diverse selection), and dedup keeping the best row of a
group: what is kept, why the rest went, and that deliberate selection does not trip max_rejected_fraction."""

import json

from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

from conftest import chat


def _data(tiny_project, *overrides):
    run_pipeline(load_project(tiny_project / "tunegate.yaml", list(overrides)), until="data")
    out = tiny_project / "runs/default/data"
    rows = [json.loads(line) for name in ("train.jsonl", "val.jsonl") for line in (out / name).read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return rows, rejected, json.loads((out / "stats.json").read_text())


def test_ifd_selection_to_a_row_budget_scores_every_kept_row(tiny_project):
    rows, rejected, stats = _data(tiny_project, "data.select={complexity: ifd, budget_rows: 20, diversity_threshold: 0.999}")
    assert len(rows) == 20
    assert {r["rule"] for r in rejected} == {"over_budget"} and len(rejected) == 40  # 60 rows, no fault
    for r in rows:
        assert 0 < r["meta"]["ifd"] < 10 and 0 <= r["meta"]["quality"] <= 1
        assert r["meta"]["selection_score"] == round(r["meta"]["quality"] * min(r["meta"]["ifd"], 1.0), 4) or abs(
            r["meta"]["selection_score"] - r["meta"]["quality"] * min(r["meta"]["ifd"], 1.0)) < 2e-4
    sel = stats["selection"]
    assert sel["rows_in"] == 60 and sel["rows_selected"] == 20 and sel["unselected_by_reason"] == {"over_budget": 40}
    # the budget is spent best score first: every selected row scores at least as high as every unselected one
    worst_kept = min(r["meta"]["selection_score"] for r in rows)
    assert stats["steps"][-1]["step"].startswith("quality selection (IFD x quality")
    assert worst_kept > 0


def test_diversity_threshold_drops_paraphrases_and_names_the_kept_row(tiny_project):
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write(json.dumps(chat("message number 0 about topic alpha!", "alpha", "para")) + "\n")
    rows, rejected, stats = _data(tiny_project, "data.select={complexity: none, diversity_threshold: 0.98}")
    too_similar = {r["id"]: r["detail"] for r in rejected if r["rule"] == "too_similar"}
    assert "para" in too_similar or "t0" in too_similar  # one of the pair goes, naming the other
    gone, kept_twin = ("para", "t0") if "para" in too_similar else ("t0", "para")
    assert kept_twin in too_similar[gone] and kept_twin in {r["id"] for r in rows}
    assert stats["rows_rejected"] == len(rejected)  # max_rejected_fraction 0.05 was not tripped by these


def test_near_duplicates_keep_the_higher_quality_row_not_the_first_seen(tiny_project):
    from tunegate.data.quality import heuristic_quality

    prompt = "please read this long customer request about topic alpha which goes on for a while so that the two rows share most of their words"
    rep, good = "alpha alpha alpha alpha", "alpha, the first topic"
    rows = [chat(prompt, rep, "first-repetitive"), chat(prompt, good, "second-clean")]
    assert heuristic_quality(rows[0]) < heuristic_quality(rows[1])
    with open(tiny_project / "train.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # 0.7: the pair's 5-word-shingle Jaccard is 0.72; the tiny project's own rows (one-word variants of a template,
    # word-and-pair Jaccard 0.6) are kept with one_word_variants off
    rows, rejected, _ = _data(tiny_project, "data.dedup={threshold: 0.7, one_word_variants: false}", "data.max_rejected_fraction=0.2")
    ids = {r["id"] for r in rows}
    assert "second-clean" in ids and "first-repetitive" not in ids
    (dup,) = [r for r in rejected if r["id"] == "first-repetitive"]
    assert dup["rule"] == "duplicate" and "second-clean" in dup["detail"]
