"""IFEval (Zhou et al. 2023, arXiv:2311.07911): 541 prompts with 25 kinds of verifiable instruction.

The checkers are lm-eval's port of Google's reference code (`lm_eval.tasks.ifeval`, extra `ifeval`).
Scores, each a fraction in [0, 1]:
    ifeval_prompt_strict   a prompt counts when the response follows all of its instructions
    ifeval_inst_strict     instructions followed over all instructions
    ifeval_prompt_loose / ifeval_inst_loose   the same, also accepting the response with its first or last line
                           removed or its `*` markdown stripped (the paper's loose criterion)
The leaderboard figure is the mean of prompt-level and instruction-level (strict) accuracy.

Offline: lm-eval downloads NLTK's `punkt_tab` sentence model at import. Without network that download is
skipped here, and the two checkers that split sentences use NLTK's Punkt algorithm untrained (no learned
abbreviation list), so "Dr. Smith" may count as two sentences; with `punkt_tab` installed the reference
model is used. `langdetect` is seeded so language checks are reproducible.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from tunegate import TunegateError
from tunegate.catalog import IFEVAL_METRICS
from tunegate.core.io import iter_jsonl


def load_prompts(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows {key, prompt, instruction_id_list, kwargs} of IFEval's input_data.jsonl. Raises TunegateError."""
    if not Path(path).is_file():
        raise TunegateError(f"{path}: IFEval input_data.jsonl not found")
    rows = []
    for n, row, error in iter_jsonl(path):
        if error is not None:
            raise TunegateError(f"{path}:{n}: not JSON ({error.msg})")
        if not isinstance(row, dict):
            raise TunegateError(f"{path}:{n}: an IFEval row is a JSON object, got {type(row).__name__}")
        missing = {"key", "prompt", "instruction_id_list", "kwargs"} - set(row)
        if missing:
            raise TunegateError(f"{path}:{n}: IFEval row lacks {sorted(missing)}")
        rows.append(row)
    if not rows:
        raise TunegateError(f"{path}: no IFEval rows")
    return rows[:limit] if limit else rows


def _punkt_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


@lru_cache(maxsize=1)
def checkers():
    """lm-eval's ifeval `utils` module, imported without network access (see the module docstring)."""
    import contextlib
    import io

    import langdetect
    import nltk

    langdetect.DetectorFactory.seed = 0
    real_download = nltk.download
    nltk.download = lambda *a, **k: False  # lm-eval calls it at import when punkt_tab is absent
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_util, utils
    except ImportError as e:
        raise TunegateError(f"IFEval needs lm-eval's checkers: pip install 'lm-eval[ifeval]' ({e})") from None
    finally:
        nltk.download = real_download
    if not _punkt_installed():
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        untrained = PunktSentenceTokenizer()
        instructions_util.count_sentences = lambda text: len(untrained.tokenize(text))
        instructions_util.nltk = _NltkWithoutPunkt(nltk)
    return utils


def sentence_splitter() -> str:
    """Which sentence splitter the checkers use: 'punkt_tab' (NLTK's trained English model, the reference) or
    'punkt-untrained' (offline fallback, no abbreviation list)."""
    return "punkt_tab" if _punkt_installed() else "punkt-untrained"


class _NltkWithoutPunkt:
    """The `nltk` module as lm-eval's checkers use it, with `word_tokenize` not splitting sentences first."""

    def __init__(self, nltk):
        self._nltk = nltk

    def __getattr__(self, name):
        return getattr(self._nltk, name)

    def word_tokenize(self, text, language="english", preserve_line=True):
        return self._nltk.word_tokenize(text, language, preserve_line=True)


def score(rows: Sequence[dict[str, Any]], responses: Sequence[str]) -> dict[str, list[float]]:
    """Per-row 0/1 scores for each of IFEVAL_METRICS. Prompt-level lists have len(rows) entries; instruction-level
    lists one entry per instruction, in row order. Raises ValueError when the lengths differ."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} IFEval rows but {len(responses)} responses")
    import random

    utils = checkers()
    out: dict[str, list[float]] = {m: [] for m in IFEVAL_METRICS}
    state = random.getstate()
    for row, response in zip(rows, responses):
        # Some upstream rows carry an argument a checker rejects (key 1129 asks for the "letter" "!"); the checker
        # then draws a random one. Seeding per row makes that draw, and so the score, reproducible.
        random.seed(f"ifeval:{row['key']}")
        inp = utils.InputExample(key=row["key"], instruction_id_list=row["instruction_id_list"], prompt=row["prompt"], kwargs=row["kwargs"])
        for mode, fn in (("strict", utils.test_instruction_following_strict), ("loose", utils.test_instruction_following_loose)):
            result = fn(inp, response)
            out[f"ifeval_prompt_{mode}"].append(float(result.follow_all_instructions))
            out[f"ifeval_inst_{mode}"].extend(float(x) for x in result.follow_instruction_list)
    random.setstate(state)
    return out


def summary(per_row: dict[str, list[float]]) -> dict[str, float]:
    """The four standard numbers plus the leaderboard average (strict prompt and instruction level), in [0, 1]."""
    means = {m: sum(v) / len(v) for m, v in per_row.items() if v}
    means["ifeval_average"] = (means["ifeval_prompt_strict"] + means["ifeval_inst_strict"]) / 2
    return means


def by_instruction(rows: Sequence[dict[str, Any]], per_row: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Strict accuracy per instruction id: {id: {"n": count, "accuracy": fraction}} (for the report)."""
    acc: dict[str, list[float]] = {}
    flat = iter(per_row["ifeval_inst_strict"])
    for row in rows:
        for iid in row["instruction_id_list"]:
            acc.setdefault(iid, []).append(next(flat))
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(acc.items())}
