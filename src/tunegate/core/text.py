"""Text normalisation shared by the config (label settings) and the metrics (tunegate.evals.metrics)."""

from __future__ import annotations

import re
import string

_WS = re.compile(r"\s+")
_EDGE = string.punctuation + "\u201c\u201d\u2018\u2019"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation and quotes: 'Card_Arrival.' -> 'card_arrival'."""
    return _WS.sub(" ", text).strip().lower().strip(_EDGE).strip()
