"""Exact and near-duplicate removal.

Exact: sha256 of the normalised text (lower case, whitespace collapsed). Near: MinHash LSH (Broder 1997;
`datasketch`) over word shingles, field practice: 5-word shingles, 128 permutations, Jaccard threshold 0.8.
Every LSH candidate is verified by its true Jaccard similarity before a row is dropped. A text with fewer
words than the shingle size has no shingles: it only takes the exact path, so distinct short texts are never
merged into one cluster (case C20 in docs/cases.md). The first row of a cluster, in input order, is kept; the others are
dropped with the id of the row they duplicate.

Semantic (optional, `semantic_dedup`): SemDeDup (Abbas et al. 2023) over MiniLM sentence embeddings, k-means
clusters and a cosine threshold; the kept row of a group is the highest quality score, then the first seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tunegate.data.records import normalize_text


@dataclass(frozen=True)
class Duplicate:
    id: str
    duplicate_of: str
    kind: str  # "exact", "near" or "semantic"
    jaccard: float  # the similarity: Jaccard for "exact" / "near", cosine for "semantic"


def shingles(text: str, size: int) -> set[str]:
    """Word `size`-grams of the normalised text; empty when the text has fewer than `size` words."""
    words = normalize_text(text).split()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def dedup(
    rows: Sequence[dict[str, Any]],
    text: Callable[[dict[str, Any]], str],
    near: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle_words: int = 5,
    seed: int = 1,
) -> tuple[list[dict[str, Any]], list[Duplicate]]:
    """Returns (kept rows in input order, dropped duplicates). `text(row)` is what is compared."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if near else None
    exact: dict[str, str] = {}
    kept_shingles: dict[str, set[str]] = {}
    kept, dropped = [], []
    for row in rows:
        t = text(row)
        key = hashlib.sha256(normalize_text(t).encode()).hexdigest()
        if key in exact:
            dropped.append(Duplicate(row["id"], exact[key], "exact", 1.0))
            continue
        sh = shingles(t, shingle_words) if near else set()
        if sh:
            mh = MinHash(num_perm=num_perm, seed=seed)
            mh.update_batch([s.encode() for s in sh])
            best = None
            for cand in lsh.query(mh):
                other = kept_shingles[cand]
                j = len(sh & other) / len(sh | other)
                if j >= threshold and (best is None or j > best[1]):
                    best = (cand, j)
            if best is not None:
                dropped.append(Duplicate(row["id"], best[0], "near", round(best[1], 4)))
                continue
            lsh.insert(row["id"], mh)
            kept_shingles[row["id"]] = sh
        exact[key] = row["id"]
        kept.append(row)
    return kept, dropped


def semantic_dedup(
    rows: Sequence[dict[str, Any]],
    text: Callable[[dict[str, Any]], str],
    threshold: float = 0.95,
    clusters: int | None = None,
    seed: int = 0,
    quality: Callable[[dict[str, Any]], float | None] | None = None,
    embed: Callable[[list[str]], Any] | None = None,
) -> tuple[list[dict[str, Any]], list[Duplicate]]:
    """SemDeDup (Abbas et al. 2023, "SemDeDup: data-efficient learning at web-scale through semantic deduplication").

    Each row's normalised text is embedded (all-MiniLM-L6-v2, unit-normalised, so a dot product is the cosine),
    the embeddings are clustered by k-means (scikit-learn, `seed`, k = `clusters` or round(sqrt(len(rows)))), and
    within each cluster rows are visited best first: highest `quality(row)` (None counts as lowest), then input
    order. A row whose cosine to a row already kept in its cluster is >= `threshold` is dropped, naming the kept
    row it is closest to (kind "semantic", the cosine in the `jaccard` field). Pairs split across clusters are
    not compared: that is the method's approximation.

    Returns (kept rows in input order, dropped duplicates in input order). `embed(texts)` returns an array of
    shape (len(texts), dim), unit-normalised; the default is tunegate.retrieval.embed (MiniLM on CPU).
    """
    import numpy as np

    if len(rows) < 2:
        return list(rows), []
    if embed is None:
        from tunegate.retrieval import embed
    vecs = np.asarray(embed([normalize_text(text(r)) for r in rows]), dtype=np.float32)  # (n, dim)
    k = min(len(rows), clusters if clusters is not None else max(1, round(len(rows) ** 0.5)))
    if k > 1:
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=k, random_state=seed, n_init=1).fit_predict(vecs)  # (n,)
    else:
        labels = np.zeros(len(rows), dtype=int)
    q = [quality(r) if quality is not None else None for r in rows]
    drop_of: dict[int, tuple[int, float]] = {}  # dropped row index -> (kept row index, cosine)
    for c in np.unique(labels):
        members = sorted(np.flatnonzero(labels == c), key=lambda i: (q[i] is None, -(q[i] or 0.0), i))
        kept_idx: list[int] = []
        for i in members:
            if kept_idx:
                sims = vecs[kept_idx] @ vecs[i]  # (len(kept_idx),)
                j = int(np.argmax(sims))
                if sims[j] >= threshold:
                    drop_of[int(i)] = (kept_idx[j], float(sims[j]))
                    continue
            kept_idx.append(int(i))
    kept = [r for i, r in enumerate(rows) if i not in drop_of]
    dropped = [Duplicate(rows[i]["id"], rows[j]["id"], "semantic", round(cos, 4)) for i, (j, cos) in sorted(drop_of.items())]
    return kept, dropped
