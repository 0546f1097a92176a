"""Exact and near-duplicate removal.

Exact: sha256 of the normalised text (lower case, whitespace collapsed). Near: MinHash LSH (Broder 1997;
`datasketch`) over word shingles, field practice: 5-word shingles, 128 permutations, Jaccard threshold 0.8.
Every LSH candidate is verified by its true Jaccard similarity before a row is dropped. A text with fewer
words than the shingle size has no shingles: it only takes the exact path, so distinct short texts are never
merged into one cluster (case C20). The first row of a cluster, in input order, is kept; the others are
dropped with the id of the row they duplicate.
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
    kind: str  # "exact" or "near"
    jaccard: float


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
