"""Abstention by confidence: a system answers the abstain label (task.abstain_label, e.g. `oos`) when it is unsure.

Two systems abstain this way. A classification head (train.method classify, tunegate.recipes.classify) uses its
largest label probability (the maximum-softmax-probability baseline, Hendrycks & Gimpel 2017). A generating
candidate (eval.abstain, config.AbstainConfig) uses the length-normalised probability of its greedy answer: the
geometric mean of its tokens' probabilities through the stop token (`answer_confidences`; Malinin & Gales 2021,
"Uncertainty estimation in autoregressive structured prediction"). Either way the threshold is fixed in the project
file or tuned on in-scope validation rows, never on the golden set (`tune_threshold`).

For a generating candidate the eval stage writes the rule it used to `eval/abstain.json` (ABSTAIN_FILE); the release
copies it into the bundle (`eval/abstain.json`, signed with the rest), and the embedded server applies it to every
answer of that adapter (tunegate.serve.engine). vLLM cannot, and refuses such a bundle (tunegate.serve.vllm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

ABSTAIN_FILE = "abstain.json"  # in the eval stage's folder and in a bundle's eval/: the rule a generating candidate used
CONFIDENCE = ("the geometric mean of the greedy answer's token probabilities through its stop token "
              "(length-normalised sequence probability)")


def tune_threshold(confidences: Sequence[float], rate: float) -> float:
    """The threshold under which the `rate` share of these in-scope rows' confidences fall: the floor(rate * n)-th
    smallest (0.0, never abstain, when that is no row). confidences: one per in-scope validation row, in [0, 1]."""
    k = math.floor(rate * len(confidences))
    return 0.0 if k == 0 else float(sorted(confidences)[k])


def answer_confidences(step_logits, new_tokens, stop_ids: Sequence[int]) -> list[float]:
    """Each generated answer's confidence: exp(mean log-probability of its tokens), through its first stop token.

    step_logits: one (B, V) tensor per generated position (transformers' `generate(output_logits=True)`: the raw
    logits, before sampling's warpers), new_tokens: (B, N) the generated token ids, N = len(step_logits). Positions
    after a row's first stop token (padding) do not count. Returns B floats in (0, 1]; 1.0 for a row with no token.
    """
    import torch

    if not step_logits:
        return [1.0] * int(new_tokens.shape[0])
    n = len(step_logits)
    tokens = new_tokens[:, :n]
    # one step at a time: a (B, V) log-softmax each, never a (B, N, V) copy of the logits
    token_logp = torch.stack([torch.log_softmax(x.float(), dim=-1).gather(-1, tokens[:, i : i + 1]).squeeze(-1)
                              for i, x in enumerate(step_logits)], dim=1)  # (B, N)
    is_stop = torch.isin(tokens, torch.tensor(list(stop_ids), device=new_tokens.device))
    # a position counts while no stop token came before it (the first stop token itself counts)
    before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()
    counted = (before == 0).float()
    return torch.exp((token_logp * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1.0)).tolist()


def apply(answers: Sequence[str], confidences: Sequence[float], rule: dict[str, Any]) -> list[str]:
    """The answers with each one whose confidence is under rule["threshold"] replaced by rule["abstain_label"]."""
    return [rule["abstain_label"] if c < rule["threshold"] else a for a, c in zip(answers, confidences)]


def read_rule(folder: Path | str) -> dict[str, Any] | None:
    """The abstention rule in `folder`/ABSTAIN_FILE (an eval stage's folder, or a bundle's eval/), else None."""
    path = Path(folder) / ABSTAIN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def tuned_rule(settings, label: str, rows: Sequence[dict[str, Any]], confidences_of: Callable[[list], list[float]],
               rows_name: str, max_rows: int | None = None) -> dict[str, Any]:
    """A generating candidate's rule: {abstain_label, confidence, threshold, rule, and val_rows when tuned}.

    settings: config.AbstainConfig. The threshold is settings.threshold, or the settings.val_abstain_rate quantile
    (`tune_threshold`) of `confidences_of(in-scope rows)` over the rows of `rows` whose reference is not `label`
    (at most `max_rows`, a sample by id hash: a source may be sorted by label). rows_name names them in the rule and
    in errors ("validation rows", "dev rows"): never the golden set.

    Raises:
        TunegateError: no in-scope row to tune on.
    """
    import hashlib

    from tunegate import TunegateError
    from tunegate.core.text import normalize_answer
    from tunegate.data.records import reference_answer

    rule = {"abstain_label": label, "confidence": CONFIDENCE}
    if settings.threshold is not None:
        return {**rule, "threshold": settings.threshold, "rule": "eval.abstain.threshold"}
    in_scope = [r for r in rows if normalize_answer(reference_answer(r)) != normalize_answer(label)]
    if max_rows is not None and len(in_scope) > max_rows:
        in_scope = sorted(in_scope, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())[:max_rows]
    if not in_scope:
        raise TunegateError(f"eval.abstain: no in-scope {rows_name} to tune the abstain threshold on; rule: never on the "
                            "golden set (give it more such rows, or set eval.abstain.threshold)")
    rate = settings.val_abstain_rate
    return {**rule, "threshold": float(f"{tune_threshold(confidences_of(in_scope), rate):.6g}"), "val_rows": len(in_scope),
            "rule": f"eval.abstain.val_abstain_rate {rate:g}: that share of the {len(in_scope)} in-scope {rows_name} "
                    "answered with a confidence under the threshold"}
