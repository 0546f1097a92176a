"""Answer the golden set with a system: the prompts rendered exactly as training rendered them (in-process), or
the rows' chat messages (a server). The eval stage and `tunegate drift --golden` answer through here; the audit
builds its prompts with `golden_prompts`.
"""

from __future__ import annotations

from typing import Any

from tunegate import TunegateError
from tunegate.data.format import generation_prompt
from tunegate.evals.backends import LocalChat, LocalClassifier
from tunegate.evals.generate import generate


def golden_prompts(tokenizer, golden: list[dict[str, Any]]) -> list[str]:
    """Each golden row rendered with the chat template up to the assistant's turn, as training rendered it.

    tokenizer: a transformers tokenizer with a chat template. golden: rows with `messages` or `prompt`.
    Returns one prompt string per row, in order."""
    return [generation_prompt(tokenizer, r) for r in golden]


def answer_golden(backend, tokenizer, golden: list[dict[str, Any]], max_new_tokens: int, desc: str,
                  stopped: list[bool] | None = None, probabilities: list[float] | None = None,
                  confidences: list[float] | None = None) -> list[str]:
    """One answer per golden row from `backend`, greedy, at most `max_new_tokens` new tokens each.

    backend: a `tunegate.evals.backends.LocalChat` (in-process: prompts from `golden_prompts`, batched, with the
    backend's adapter switched on or off) or any chat backend with `complete(conversations, max_new_tokens,
    desc=...)`, such as `OpenAIChat` (the rows' messages without the reference answer). tokenizer: needed
    in-process only (None for a server). desc: the progress bar's label. stopped: in-process, filled with one
    bool per row, whether its answer ended at an end-of-turn / eos token (`generate`); left empty for a server.
    A `LocalClassifier` (method classify) answers each row with a label from one forward pass of its head, the
    prompt rendered as for generation; `probabilities` is then filled with each label's probability, and `stopped`
    with True (a label is a whole answer). confidences: in-process generation only, filled with each answer's
    confidence (tunegate.evals.abstain.answer_confidences).

    Raises:
        TunegateError: a server backend and golden rows that are prompt/completion text, not chat messages.
    """
    if isinstance(backend, LocalClassifier):
        labels, top = backend.classify(golden, desc)
        if probabilities is not None:
            probabilities[:] = top
        if stopped is not None:
            stopped[:] = [True] * len(labels)
        return labels
    if isinstance(backend, LocalChat):
        prompts = golden_prompts(tokenizer, golden)
        with backend.answering():
            return generate(backend.model, tokenizer, prompts, max_new_tokens, backend.batch_size, desc=desc, stopped=stopped,
                            confidences=confidences)
    if any("messages" not in r for r in golden):
        raise TunegateError("eval.server answers chat messages; this golden set is prompt/completion text (data.golden.format): "
                            "use a chat golden set, or evaluate in-process")
    if any(r.get("tools") for r in golden):  # the server request carries no schemas yet: its answers would be scored blind
        raise TunegateError("eval.server (and drift --golden) cannot answer tool rows: the request does not carry the rows' "
                            "tools; evaluate in-process")
    return backend.complete([r["messages"][:-1] for r in golden], max_new_tokens, desc=desc)
