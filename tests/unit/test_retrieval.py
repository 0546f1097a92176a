"""Retrieval for the audit: bm25s, MiniLM (offline), reciprocal rank fusion, recall@k, the kNN vote."""

import numpy as np
import pytest

from tunegate.retrieval import Bm25Index, DenseIndex, knn_classify, recall_at_k, reciprocal_rank_fusion

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Great Barrier Reef is the world's largest coral reef system, off Australia.",
    "Python is a programming language that emphasises code readability.",
]
QUERIES = ["Which city has the iron lattice tower?", "How do plants turn light into energy?", "Where is the largest coral reef?"]


def test_bm25_ranks_the_document_sharing_the_rare_words_first():
    ids, scores = Bm25Index(DOCS).search(QUERIES, 2)
    assert ids.shape == (3, 2) and list(ids[:, 0]) == [0, 1, 2]
    assert (scores[:, 0] >= scores[:, 1]).all()


def test_minilm_loads_offline_and_ranks_by_meaning():
    index = DenseIndex(DOCS)
    assert index.vectors.shape == (4, 384)
    assert np.allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-4)
    ids, sims = index.search(["a snake-named language for writing software", *QUERIES], 4)
    assert list(ids[:, 0]) == [3, 0, 1, 2]
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # best first


def test_reciprocal_rank_fusion_rewards_agreement():
    a = np.array([[0, 1, 2]])
    b = np.array([[2, 1, 0]])
    # docs 0 and 2: 1/61 + 1/63 = 0.032266 each; doc 1, second in both: 2/62 = 0.032258
    fused = reciprocal_rank_fusion([a, b], 3)
    assert set(fused[0][:2]) == {0, 2} and fused[0][2] == 1
    fused = reciprocal_rank_fusion([np.array([[5, 7]]), np.array([[7, 9]])], 1)
    assert fused.tolist() == [[7]]  # in both lists beats first in one


def test_recall_at_k_counts_the_gold_document_within_the_first_k():
    retrieved = np.array([[3, 1, 2], [0, 2, 1]])
    assert recall_at_k(retrieved, [1, 1], 1) == [0.0, 0.0]
    assert recall_at_k(retrieved, [1, 1], 2) == [1.0, 0.0]
    assert recall_at_k(retrieved, [1, 1], 3) == [1.0, 1.0]


def test_knn_vote_is_similarity_weighted_and_k_limited():
    labels = [["a", "b", "b"]]
    sims = np.array([[0.9, 0.5, 0.45]])
    assert knn_classify(labels, sims, 1) == ["a"]
    assert knn_classify(labels, sims, 3) == ["b"]  # 0.95 > 0.9
    assert knn_classify([["a", "b"]], np.array([[0.5, 0.5]]), 2) == ["a"]  # a tie goes to the nearer neighbour


@pytest.mark.parametrize("k", [1, 10])
def test_search_depth_is_capped_by_the_corpus_size(k):
    ids, _ = Bm25Index(DOCS).search(QUERIES[:1], k)
    assert ids.shape == (1, min(k, 4))
