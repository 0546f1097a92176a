"""Exact and near-duplicate removal.

Exact: sha256 of the normalised text (lower case, whitespace collapsed). Near, two rules, each verified before a
row is dropped:
  - Jaccard: MinHash LSH (Broder 1997; `datasketch`) over word shingles, 128 permutations, Jaccard threshold
    0.8. Shingles adapt to length: `shingle_words`-word shingles (5) for texts of at least 4 x that many words,
    single words and word pairs for shorter ones (one word added to a 12-word text leaves a 5-shingle Jaccard of
    0.6 but 0.88 on words and pairs; the pairs keep word order). A pair with one text on each side of 20 words
    is compared by the one-word rule only. The LSH bands are chosen for the threshold (`lsh_params`): a pair at exactly the
    threshold becomes a candidate with probability >= 0.99 (datasketch's own choice missed pairs at 0.867 about
    one time in five); every candidate is verified by its true Jaccard.
  - One-word variants: texts of ONE_WORD_MIN to ONE_WORD_MAX words that differ in exactly one word (a number,
    a place, a name) at the same position, found exactly by indexing each text with one word blanked out.
    Jaccard cannot see these in short texts: one word of six is a Jaccard of 0.71.
A text under ONE_WORD_MIN words only takes the exact path, so distinct short texts ("block my card", "cancel
my card") are never merged (case C20 in docs/cases.md). The first row of a cluster, in input order, is kept;
the others are dropped with the id of the row they duplicate. Recall on planted variants: bench/dedup_short.py.

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


ONE_WORD_MIN, ONE_WORD_MAX = 6, 40  # words of a text the one-word-variant rule applies to


def shingles(text: str, size: int) -> set[str]:
    """Word `size`-grams of the normalised text; empty when the text has fewer than `size` words."""
    words = normalize_text(text).split()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def adaptive_shingles(words: list[str], size: int) -> set[str]:
    """`size`-word shingles for a text of at least 4 x size words; for a shorter one its single words and its
    word pairs (the pairs keep word order: "from savings to checking" is not "from checking to savings"); empty
    under 2 words (such a text takes the exact path only)."""
    if len(words) < 2:
        return set()
    if len(words) < 4 * size:
        return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def lsh_params(threshold: float, num_perm: int, max_miss: float = 0.01) -> tuple[int, int]:
    """(bands b, rows per band r) for MinHash LSH: the largest r (fewest candidates to verify) with b = num_perm // r
    such that a pair of Jaccard exactly `threshold` is missed with probability (1 - t^r)^b <= `max_miss`; pairs
    above the threshold are missed less often still (Leskovec, Rajaraman & Ullman, Mining of Massive Datasets,
    ch. 3.4)."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if (1 - threshold**r) ** b <= max_miss:
            best = (b, r)
    return best


def _one_word_keys(words: list[str]) -> list[int]:
    """A hash of the text with each word in turn blanked: two texts differing in one word at one position share a
    key. Hashes (8 bytes, not the text) keep the index small; a shared key is checked word by word
    (`_one_word_apart`)."""
    t = tuple(words)
    return [hash((len(t), i, t[:i], t[i + 1 :])) for i in range(len(t))]


def _one_word_apart(a: list[str], b: list[str]) -> bool:
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def dedup(
    rows: Sequence[dict[str, Any]],
    text: Callable[[dict[str, Any]], str],
    near: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle_words: int = 5,
    seed: int = 1,
    one_word_variants: bool = True,
) -> tuple[list[dict[str, Any]], list[Duplicate]]:
    """Returns (kept rows in input order, dropped duplicates). `text(row)` is what is compared (see the module
    docstring for the rules; `one_word_variants` False turns the one-word rule off). A near duplicate's
    `jaccard` is the Jaccard of the two texts' shingles."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm)) if near else None
    exact: dict[str, str] = {}
    variants: dict[int, list[str]] = {}  # one-word-blanked key -> the kept rows holding it
    kept_words: dict[str, list[str]] = {}  # kept rows of the one-word rule: their words
    kept_shingles: dict[str, set[str]] = {}
    kept, dropped = [], []
    for row in rows:
        norm = normalize_text(text(row))
        key = hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()
        if key in exact:
            dropped.append(Duplicate(row["id"], exact[key], "exact", 1.0))
            continue
        words = norm.split()
        sh = adaptive_shingles(words, shingle_words) if near else set()
        keys = _one_word_keys(words) if near and one_word_variants and ONE_WORD_MIN <= len(words) <= ONE_WORD_MAX else []
        match = next((rid for k in keys for rid in variants.get(k, ()) if _one_word_apart(words, kept_words[rid])), None)
        if match is not None:
            dropped.append(Duplicate(row["id"], match, "near", round(_jaccard(sh, kept_shingles.get(match, set())), 4)))
            continue
        if sh:
            mh = MinHash(num_perm=num_perm, seed=seed)
            mh.update_batch([s.encode("utf-8", "surrogatepass") for s in sh])
            best = None
            for cand in lsh.query(mh):
                j = _jaccard(sh, kept_shingles[cand])
                if j >= threshold and (best is None or j > best[1]):
                    best = (cand, j)
            if best is not None:
                dropped.append(Duplicate(row["id"], best[0], "near", round(best[1], 4)))
                continue
            lsh.insert(row["id"], mh)
        kept_shingles[row["id"]] = sh
        if keys:
            kept_words[row["id"]] = words
        for k in keys:
            variants.setdefault(k, []).append(row["id"])
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
