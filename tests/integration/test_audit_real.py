"""The audit's retrieval baselines on the real shared datasets (marked real_data; skipped when absent)."""

import csv
import json

import numpy as np
import pytest

from conftest import shared_data


@pytest.mark.real_data
def test_banking77_minilm_knn_classifier_reaches_the_published_baseline():
    """A plain MiniLM kNN classifier scores about 0.92 on the full banking77 test set (docs/design.md#shared-data)."""
    from tunegate.retrieval import DenseIndex, knn_classify

    folder = shared_data("banking77")
    train = list(csv.DictReader(open(folder / "train.csv", encoding="utf-8")))
    test = list(csv.DictReader(open(folder / "test.csv", encoding="utf-8")))
    index = DenseIndex([r["text"] for r in train])
    ids, sims = index.search([r["text"] for r in test], 5)
    labels = [[train[j]["category"] for j in row] for row in ids]
    accuracy = np.mean([p == r["category"] for p, r in zip(knn_classify(labels, sims, 5), test)])
    assert len(test) == 3080
    assert 0.91 <= accuracy <= 0.93, accuracy  # measured 0.919


@pytest.mark.real_data
def test_squad_retrieval_recall_bm25_dense_and_hybrid():
    """All 1,190 XQuAD questions against the 240 paragraphs: the gold paragraph is usually in the top 3."""
    from tunegate.retrieval import Bm25Index, DenseIndex, recall_at_k, reciprocal_rank_fusion

    data = json.loads((shared_data("squad_xquad_en") / "xquad.en.json").read_text(encoding="utf-8"))["data"]
    paragraphs = [p for a in data for p in a["paragraphs"]]
    docs = [p["context"] for p in paragraphs]
    questions = [(qa["question"], i) for i, p in enumerate(paragraphs) for qa in p["qas"]]
    queries, gold = [q for q, _ in questions], [g for _, g in questions]
    assert (len(docs), len(queries)) == (240, 1190)
    bm25 = Bm25Index(docs).search(queries, 10)[0]
    dense = DenseIndex(docs).search(queries, 10)[0]
    hybrid = reciprocal_rank_fusion([bm25, dense], 10)
    recall = {name: np.mean(recall_at_k(r, gold, 3)) for name, r in (("bm25", bm25), ("dense", dense), ("hybrid", hybrid))}
    assert recall["bm25"] > 0.8 and recall["dense"] > 0.8, recall
    assert recall["hybrid"] >= max(recall["bm25"], recall["dense"]) - 0.02, recall
