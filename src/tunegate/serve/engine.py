"""The generation backend behind the serving API: the `Engine` protocol, and the embedded engine.

An engine serves one base model (`base_name`) and the adapters of verified release bundles (`adapters`); the
app (tunegate.serve.api) authenticates tenants, checks grants, writes traces and calls `Engine.complete`. Two
engines implement it: `EmbeddedEngine` here (transformers + PEFT in this process) and `VLLMEngine`
(tunegate.serve.vllm: a vLLM server on a private loopback port). An engine whose `runtime_adapters` is True
loads and unloads adapters while it runs (the admin endpoints); the others refuse `add_adapter` and
`remove_adapter` with a TunegateError, and the app does not offer the admin endpoints for them.

Concurrency of the embedded engine: one base model is loaded once, every adapter is attached to it by name
(PeftModel.load_adapter), and each request selects its adapter (set_adapter, or disable_adapter for the base
model). The active adapter is state of the one shared model, and transformers' generate is not thread-safe, so
generation runs under one lock: requests are answered one at a time, in arrival order, while authentication,
validation and the database writes of other requests (traces, feedback) go on beside it. This trades
throughput for simplicity; vLLM batches requests for different adapters together.
"""

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tunegate import TunegateError
from tunegate.serve.bundles import ServedAdapter, base_model_name, verify_bundles


class ApiError(Exception):
    """An error the API answers with HTTP `status` and OpenAI's error body {"error": {"message", "type", "code"}}.

    Raised by the app's endpoints and by an engine's `complete` (a vLLM engine that is unreachable: 502)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] | None = None  # the answer's token ids up to end of turn (embedded engine; smoke test)


class Engine(Protocol):
    """What the serving API needs of a generation backend."""

    kind: str  # the engine's name in GET /health: "embedded" or "vllm"
    base_name: str  # the base model's name in the API
    adapters: dict[str, ServedAdapter]  # adapter name -> what it was loaded from
    serves_base: bool  # False: only the adapters are served (vLLM's merged-model mode)
    runtime_adapters: bool  # add_adapter and remove_adapter work while it runs (the admin endpoints)
    special_tokens: frozenset[str]  # the base tokenizer's control-token strings; the API refuses text holding one

    def complete(self, adapter: str | None, messages: list[dict[str, str]], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None) -> Completion:
        """One chat answer with `adapter` (None: the base model), at most `max_new_tokens` tokens.

        Raises:
            ApiError: the backend failed or refused the request.
        """
        ...

    def add_adapter(self, name: str, bundle: Path) -> dict[str, Any]:
        """Verify the release bundle folder `bundle` and load its adapter as `name`; returns its release.json.

        Raises:
            TunegateError: refused, or `runtime_adapters` is False.
        """
        ...

    def remove_adapter(self, name: str) -> None:
        """Unload the adapter `name`. Raises TunegateError: not served, refused, or `runtime_adapters` is False."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a subprocess, private folders)."""
        ...


@dataclass
class EmbeddedEngine:
    """The base model with every adapter attached by name; `complete` is serialised by `lock`. Implements Engine."""

    model: Any
    tokenizer: Any
    base_name: str
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    kind: str = "embedded"
    serves_base: bool = True
    runtime_adapters: bool = False
    special_tokens: frozenset[str] = frozenset()  # default: the tokenizer's (tunegate.data.format.special_tokens)

    def __post_init__(self) -> None:
        if not self.special_tokens and self.tokenizer is not None:
            from tunegate.data.format import special_tokens

            self.special_tokens = special_tokens(self.tokenizer)

    @classmethod
    def load(cls, project, bundles: list | None = None, public_key: Path | None = None) -> "EmbeddedEngine":
        """Load the base model once and attach each bundle's adapter under its name.

        Raises:
            TunegateError: a bundle is refused (every refusal is listed), or two bundles share a name.
        """
        import tempfile

        from tunegate.models import (
            load_inference_model,
            load_tokenizer,
            resolve_base_model,
        )

        serve = project.serve
        bundles = list(serve.bundles if serve and bundles is None else bundles or [])
        public_key = public_key if public_key is not None else (serve.public_key if serve else None)
        with tempfile.TemporaryDirectory(prefix="tunegate-serve-") as tmp:
            adapters = verify_bundles(project, bundles, public_key, Path(tmp))  # before the model loads: fail fast
            path = resolve_base_model(project.base_model)
            tokenizer = load_tokenizer(path)
            model = load_inference_model(path)
            for name in adapters:
                model = _attach(model, Path(tmp) / name / "adapter", name)
        return cls(model=model, tokenizer=tokenizer, base_name=base_model_name(project), adapters=adapters)

    def complete(self, adapter: str | None, messages: list[dict[str, str]], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None) -> Completion:
        """Generate one answer with `adapter` (None: the base model). Serialised: see the module docstring."""
        import contextlib

        import torch

        with self.lock:
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            input_ids = enc["input_ids"].to(self.model.device)  # (1, T)
            attention = enc["attention_mask"].to(self.model.device)
            if seed is not None:
                torch.manual_seed(seed)
            sampling = temperature > 0
            # The same stop tokens as the eval stage, the bundle and vLLM: eos and end of turn.
            from tunegate.data.format import stop_token_ids

            stop_ids = stop_token_ids(self.tokenizer)
            kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sampling,
                      "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": stop_ids}
            if sampling:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if adapter is None:
                ctx = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
            else:
                self.model.set_adapter(adapter)
                ctx = contextlib.nullcontext()
            with ctx, torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            new = out[0, input_ids.shape[1]:].tolist()  # (N,) generated token ids; one sequence: no padding
        n_generated = len(new)
        finish = "length"
        ends = [i for i, t in enumerate(new) if t in stop_ids]
        if ends:
            new = new[: ends[0]]
            finish = "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in stop or []:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return Completion(text, finish, int(input_ids.shape[1]), n_generated, new)

    def add_adapter(self, name: str, bundle: Path) -> dict[str, Any]:
        """Refused: the embedded engine loads its adapters at start-up only (`runtime_adapters` is False).

        Raises:
            TunegateError: always; add the bundle to serve.bundles and restart the server.
        """
        raise TunegateError(f"adapter {name}: the embedded engine loads adapters at start-up only; "
                            "add the bundle to serve.bundles and restart the server")

    def remove_adapter(self, name: str) -> None:
        """Refused: the embedded engine keeps its adapters until it stops (`runtime_adapters` is False).

        Raises:
            TunegateError: always; remove the bundle from serve.bundles and restart the server.
        """
        raise TunegateError(f"adapter {name}: the embedded engine unloads adapters only when it stops; "
                            "remove the bundle from serve.bundles and restart the server")

    def close(self) -> None:
        """Nothing to release: the model is freed with the engine."""


def _attach(model, adapter_dir: Path, name: str):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=False).eval()
