"""Where eval prompts get answered: the local model in-process, or any OpenAI-compatible chat server.

Both backends answer a list of conversations (OpenAI `messages` lists) greedily and return the texts in
input order. `prefill` starts the assistant's answer with a fixed text (the local model continues it; a
remote server gets it as an instruction, since the chat API has no portable prefill), used by the judge to
ask for `[[A]]`-style verdicts.

The remote backend serves vLLM (`vllm serve BASE --enable-lora --lora-modules NAME=PATH`: the adapter is the
model NAME), TGI, llama.cpp's server or a hosted provider, through the `openai` client.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

Messages = list[dict[str, str]]


class LocalChat:
    """A transformers model (optionally a PeftModel) answering with tunegate's batched generation."""

    def __init__(self, model, tokenizer, batch_size: int = 16, name: str = "local", adapter_off: bool = False, adapter: str | None = None):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.adapter_off = adapter_off  # answer as the base model: a PeftModel with its adapter disabled
        self.adapter = adapter  # which of the PeftModel's loaded adapters answers (None: the active one)

    def complete(self, conversations: Sequence[Messages], max_new_tokens: int, prefill: str = "", desc: str = "generating") -> list[str]:
        from tunegate.evals.generate import generate

        prompts = [self.tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) + prefill for m in conversations]
        with self.answering():
            return generate(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size, desc=desc)

    def answering(self):
        """The model as this system: adapter disabled (base model), or merged into the weights for the
        candidate so each decoding step is one matmul per layer (an unmerged DoRA adapter recomputes weight
        norms at every step); unmerged again afterwards."""
        import contextlib

        if self.adapter_off:
            return self.model.disable_adapter()
        if self.adapter is not None:
            self.model.set_adapter(self.adapter)
        if hasattr(self.model, "merge_adapter"):
            return _merged(self.model)
        return contextlib.nullcontext()


class LocalClassifier:
    """A classify run's adapter (tunegate.recipes.classify): answers each prompt with one label from one forward pass
    of its classification head, no generation. `head`: the adapter's tunegate_classify.json (labels, abstention)."""

    def __init__(self, model, tokenizer, head: dict[str, Any], batch_size: int = 16, name: str = "candidate"):
        self.model, self.tokenizer, self.head, self.batch_size, self.name = model, tokenizer, head, batch_size, name

    def classify(self, rows: Sequence[dict[str, Any]], desc: str = "classifying") -> tuple[list[str], list[float]]:
        """(label, its probability) per row (golden-set rows: chat messages or prompt/completion), in order."""
        from tunegate.recipes.classify import encode_prompts, predict_labels, probabilities

        ids = encode_prompts(self.tokenizer, rows, self.head["max_length"])
        return predict_labels(probabilities(self.model, ids, self.tokenizer.pad_token_id, self.batch_size, desc), self.head)

    def complete(self, conversations: Sequence[Messages], max_new_tokens: int, prefill: str = "", desc: str = "generating") -> list[str]:
        """The label for each conversation (its final turn the user's); `max_new_tokens` and `prefill` do not apply:
        a classification head writes no text. Raises TunegateError for a prefill (the judge's form)."""
        from tunegate import TunegateError

        if prefill:
            raise TunegateError("a classification head answers labels; it cannot continue a prefilled answer")
        rows = [{"messages": [*m, {"role": "assistant", "content": ""}]} for m in conversations]
        return self.classify(rows, desc)[0]


class OpenAIChat:
    """An OpenAI-compatible /v1/chat/completions endpoint, temperature 0, `concurrency` requests in flight.

    Raises TunegateError naming the URL when the server cannot be reached or answers with an error.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout_s: float = 120):
        self.base_url, self.model, self.concurrency = base_url, model, concurrency
        self.name = f"{model}@{base_url}"
        self._api_key = os.environ.get(api_key_env) or "EMPTY"  # vLLM and llama.cpp accept any key
        self._timeout = timeout_s

    def complete(self, conversations: Sequence[Messages], max_new_tokens: int, prefill: str = "", desc: str = "generating") -> list[str]:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self._timeout, max_retries=2)

        def one(messages: Messages) -> str:
            if prefill:
                messages = list(messages[:-1]) + [{**messages[-1], "content": messages[-1]["content"] + f"\n\nBegin your answer with: {prefill}"}]
            resp = client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_new_tokens, temperature=0)
            text = resp.choices[0].message.content or ""
            return text[len(prefill):] if prefill and text.startswith(prefill) else text

        return map_requests(one, conversations, self.concurrency, desc, f"{self.base_url}: OpenAI-compatible server for model {self.model!r}")


def map_requests(one: Callable[[Any], str], items: Sequence[Any], concurrency: int, desc: str, server: str) -> list[str]:
    """`one(item)` for every item, `concurrency` requests in flight, answers in input order, under a progress bar.

    server: names the server in the error. Raises TunegateError("<server> failed: ...") when a request raises an
    `openai.OpenAIError` (the server cannot be reached, or answers with an error after the client's retries).
    """
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from tunegate import TunegateError
    from tunegate.core.console import progress

    out: list[str] = []
    try:
        with ThreadPoolExecutor(concurrency) as pool, progress(desc, len(items)) as advance:
            for text in pool.map(one, items):
                out.append(text)
                advance()
    except openai.OpenAIError as e:
        raise TunegateError(f"{server} failed: {e}") from None
    return out


from contextlib import contextmanager


@contextmanager
def _merged(model):
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def served_models(base_url: str, api_key_env: str = "OPENAI_API_KEY") -> dict[str, dict]:
    """The server's /v1/models as {id: card}; vLLM's cards of LoRA modules carry `root` (the adapter path) and
    `parent` (the base). Raises TunegateError naming the URL when the server cannot be reached."""
    import openai

    from tunegate import TunegateError

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY", max_retries=1, timeout=30)
    try:
        return {m.id: m.model_dump() for m in client.models.list()}
    except openai.OpenAIError as e:
        raise TunegateError(f"{base_url}: cannot list the served models: {e}") from None


def check_served_adapter(base_url: str, model: str, adapter_dir, api_key_env: str = "OPENAI_API_KEY") -> None:
    """The server's `model` must be this run's adapter: its card's `root` must hold adapter weights with the
    same sha256 as `adapter_dir`'s. Raises TunegateError otherwise (rule: only the evaluated adapter is promoted)."""
    from pathlib import Path

    from tunegate import TunegateError
    from tunegate.core.manifest import sha256_file

    cards = served_models(base_url, api_key_env)
    if model not in cards:
        raise TunegateError(f"{base_url}: serves {sorted(cards)}, not the candidate {model!r}")
    root = cards[model].get("root")
    served = Path(root) / "adapter_model.safetensors" if root else None
    ours = Path(adapter_dir) / "adapter_model.safetensors"
    if served is None or not served.is_file():
        raise TunegateError(f"{base_url}: cannot verify that {model!r} is this run's adapter (its card has no readable `root` adapter path: "
                            f"{root!r}); serve it with `--lora-modules {model}={Path(adapter_dir).resolve()}`")
    if sha256_file(served) != sha256_file(ours):
        raise TunegateError(f"{base_url}: {model!r} serves {served}, whose weights differ from {ours}; rule: the gate scores this run's adapter")


def user_turns(texts: Sequence[str], system: str | None = None) -> list[Messages]:
    """One single-turn conversation per text (with an optional system prompt)."""
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": t}] for t in texts]
