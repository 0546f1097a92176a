"""Task metrics, one score per golden row."""

from __future__ import annotations

import re
import string

_WS = re.compile(r"\s+")
_EDGE = string.punctuation + "\u201c\u201d\u2018\u2019"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation and quotes: 'Card_Arrival.' -> 'card_arrival'."""
    return _WS.sub(" ", text).strip().lower().strip(_EDGE).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0 (accuracy for labels)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


METRICS = {"exact_match": exact_match}
