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
throughput for simplicity; vLLM batches requests for different adapters together. The adapter of a classify run
(train.method classify, tunegate.recipes.classify) is not attached to the shared model: it gets a model of its own
(the base model with its classification head, one more copy of the base weights) and answers a chat completion
with its label from one forward pass, under the same lock and deadline (`EmbeddedEngine._classify`). An adapter
whose eval gate measured it with an abstain threshold (eval.abstain, the bundle's eval/abstain.json) answers the
abstain label when its answer's confidence is under that threshold, as in the eval (tunegate.evals.abstain); it
answers greedily, as the eval measured it (temperature and top_p do not apply).

Bounds of the embedded engine, so that no request can hold the lock for long (issue 23):
- Context window: `context_window` is the model's (config.max_position_embeddings, or the tokenizer's
  model_max_length when smaller and set). A prompt is checked before it is tokenized (more characters than the
  window can hold at `max_token_chars`, the longest token of the vocabulary, cannot fit) and after: prompt tokens
  plus max_tokens over the window is ApiError 400 `context_length_exceeded` with the numbers (OpenAI's code and
  status). A request that did not set max_tokens has it lowered to what fits instead. Tokenizing happens outside
  the generation lock (under its own `tokenizer_lock`: a fast tokenizer is not safe to share between threads).
- Deadline: `complete(..., timeout_s=T)` answers within T seconds of the call, waiting for the lock included: a
  lock that cannot be had in time is ApiError 503 `server_busy` with Retry-After, and generation stops at the
  deadline (transformers' MaxTimeCriteria) with finish_reason "length". Reading the prompt is one forward pass
  that no stopping criterion can interrupt (a prompt near SmolLM2's 8,192-token window takes over a minute on two
  CPU cores), so a prompt over `prefill_chunk_tokens` is read in chunks (transformers' prefill_chunk_size) and
  the deadline is checked before each chunk: past it, ApiError 504 `request_timeout`. The lock is thus held past
  the deadline by at most one chunk's or one token's forward pass.
- Shutdown: `complete(..., cancel=EVENT)`: once the event is set, generation stops at the next token (finish_reason
  "length") or the next prompt chunk (503), and a request still waiting for the lock gets ApiError 503
  `server_shutting_down`.
"""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tunegate import TunegateError
from tunegate.serve.bundles import ServedAdapter, base_model_name, verify_bundles


class ApiError(Exception):
    """An error the API answers with HTTP `status` and OpenAI's error body {"error": {"message", "type", "code"}}.

    Raised by the app's endpoints and by an engine's `complete` (a vLLM engine that is unreachable: 502)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers  # extra response headers, e.g. Retry-After on a 503


class NotServable(TunegateError):
    """An engine cannot serve this adapter at all (its kind, not its integrity): DoRA or added tokens on vLLM, a
    server started with --merged, a rank above --max-lora-rank, tokens the embedded engine's tokenizer lacks.
    The message says why without naming private folders (a 404 shows it). tunegate.serve.production marks the
    registry name missing instead of failing start-up."""


RETRY_AFTER_S = 5  # the Retry-After of a 503 (busy or shutting down): a hint, the wait is not known
LOCK_POLL_S = 0.1  # how often a request waiting for the generation lock looks at the deadline and the shutdown event
MIN_TEMPERATURE = 1e-5  # below this sampling is greedy, as in vLLM (its _SAMPLING_EPS): logits / 1e-40 overflow float32
_UNSET_MAX_LENGTH = 10**7  # a tokenizer's model_max_length at or above this is transformers' "not set" (1e30)


def busy_error(timeout_s: float) -> ApiError:
    """503 `server_busy`: the request's deadline passed before the engine could take it."""
    return ApiError(503, f"the server is busy: the request could not start within its deadline of {timeout_s:g} s "
                    "(serve.request_timeout_s); retry later", "server_error", "server_busy",
                    {"Retry-After": str(RETRY_AFTER_S)})


def shutting_down_error() -> ApiError:
    """503 `server_shutting_down`: the server received SIGTERM and takes no new generation."""
    return ApiError(503, "the server is shutting down; retry later", "server_error", "server_shutting_down",
                    {"Retry-After": str(RETRY_AFTER_S)})


def context_window(config: Any, tokenizer: Any) -> int | None:
    """The model's context window in tokens: config.max_position_embeddings, or the tokenizer's model_max_length
    when that is smaller and set (transformers gives an unset one as 1e30). None when neither is known."""
    found = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    sane = [n for n in found if isinstance(n, int) and not isinstance(n, bool) and 0 < n < _UNSET_MAX_LENGTH]
    return min(sane) if sane else None


def check_context(window: int | None, prompt_tokens: int, max_new_tokens: int, fit: bool) -> int:
    """The max_new_tokens to generate with: `max_new_tokens`, lowered to what fits the window when `fit` (the
    request did not set max_tokens).

    Raises:
        ApiError: 400 `context_length_exceeded` (OpenAI's code), naming the numbers: the prompt leaves no room
            for one token, or prompt + max_new_tokens is over the window and `fit` is False.
    """
    if window is None or prompt_tokens + max_new_tokens <= window:
        return max_new_tokens
    if prompt_tokens + 1 > window:
        raise ApiError(400, f"messages: this model's maximum context length is {window} tokens; your messages resulted "
                       f"in {prompt_tokens} tokens, which leaves no room for an answer. Reduce the length of the "
                       "messages.", code="context_length_exceeded")
    if fit:
        return window - prompt_tokens
    raise ApiError(400, f"max_tokens: this model's maximum context length is {window} tokens; you requested "
                   f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the messages, {max_new_tokens} for "
                   "the completion). Reduce the length of the messages or max_tokens.", code="context_length_exceeded")


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
                 stop: list[str] | None = None, *, fit_max_tokens: bool = False, timeout_s: float | None = None,
                 cancel: threading.Event | None = None) -> Completion:
        """One chat answer with `adapter` (None: the base model), at most `max_new_tokens` tokens.

        `fit_max_tokens`: the request did not set max_tokens, so the engine may lower it to fit the context
        window. `timeout_s`: answer within this many seconds of the call (a partial answer ends with
        finish_reason "length"). `cancel`: set when the server shuts down; the answer stops early.

        Raises:
            ApiError: the backend failed or refused the request (400 over the context window, 503 busy or
                shutting down, 504 the backend timed out, 502 the backend failed).
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

    def load_slot(self, slot: str, bundle: Path, release: dict[str, Any]) -> None:
        """Load the adapter of the already verified bundle folder `bundle` under the engine name `slot`, without
        serving it under any public name (tunegate.serve.production switches names to it).

        Raises:
            NotServable: this engine cannot serve such an adapter (the name is marked missing, start-up goes on).
            TunegateError: loading failed.
        """
        ...

    def unload_slot(self, slot: str) -> None:
        """Unload the engine adapter `slot` (no public name points at it, no request uses it). Raises TunegateError."""
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
    lock: threading.Lock = field(default_factory=threading.Lock)  # generation: one request at a time
    kind: str = "embedded"
    serves_base: bool = True
    runtime_adapters: bool = False
    special_tokens: frozenset[str] = frozenset()  # default: the tokenizer's (tunegate.data.format.special_tokens)
    context_window: int | None = None  # tokens; default from the model and tokenizer (see context_window())
    max_token_chars: int | None = None  # the longest token in characters; default from the tokenizer
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # A longer prompt is read this many tokens per forward pass, the deadline checked between them; a shorter one
    # in one pass, as before (the same numbers as the eval stage's generation).
    prefill_chunk_tokens: int = 512
    # Adapters of classify runs (tunegate.recipes.classify), by engine name: (their own sequence-classification
    # model with the trained head and adapter, the head's tunegate_classify.json). They answer with a label.
    classifiers: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    base_path: Path | str | None = None  # the base model's folder: classify adapters load their own model from it
    # Adapters whose eval gate measured them with an abstain threshold (eval.abstain; the bundle's eval/abstain.json,
    # tunegate.evals.abstain), by engine name: an answer under the threshold is replaced by the abstain label.
    abstainers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.special_tokens and self.tokenizer is not None:
            from tunegate.data.format import special_tokens

            self.special_tokens = special_tokens(self.tokenizer)
        if self.context_window is None and self.model is not None:
            self.context_window = context_window(getattr(self.model, "config", None), self.tokenizer)
        if self.max_token_chars is None and hasattr(self.tokenizer, "get_vocab"):
            from tunegate.data.format import max_token_chars

            self.max_token_chars = max_token_chars(self.tokenizer)

    @classmethod
    def load(cls, project, bundles: list | None = None, public_key: Path | None = None) -> "EmbeddedEngine":
        """Load the base model once and attach each bundle's adapter under its name. Adapters trained with
        `train.added_tokens` grow the base model's embeddings first and bring their tokenizer, which then serves
        every request (the base model's answers included). The adapter of a classify run (tunegate.recipes.classify)
        gets a model of its own, the base model with its classification head, which answers with a label.

        Raises:
            TunegateError: a bundle is refused (every refusal is listed), two bundles share a name, or two
                adapters were trained with different added tokens (one tokenizer serves them all).
        """
        import tempfile

        from tunegate.models import (
            load_adapter_tokenizer,
            load_inference_model,
            load_tokenizer,
            read_vocabulary_record,
            resolve_base_model,
        )
        from tunegate.evals.abstain import read_rule
        from tunegate.recipes.classify import is_classifier, load_trained

        serve = project.serve
        bundles = list(serve.bundles if serve and bundles is None else bundles or [])
        if public_key is None:  # serve.public_key, else the project-local key (tunegate.release.public_key_for)
            from tunegate.release import public_key_for

            public_key = public_key_for(project)
        with tempfile.TemporaryDirectory(prefix="tunegate-serve-") as tmp:
            adapters = verify_bundles(project, bundles, public_key, Path(tmp))  # before the model loads: fail fast
            path = resolve_base_model(project.base_model)
            model = load_inference_model(path)
            heads = [n for n in adapters if is_classifier(Path(tmp) / n / "adapter")]  # method classify: loaded below
            for name in adapters:
                if name not in heads:
                    model = _attach(model, Path(tmp) / name / "adapter", name)
            # One tokenizer for every adapter: the base model's, or the one saved with the adapters that added tokens
            # (_attach refused adapters whose added tokens differ)
            added = [n for n in adapters if (read_vocabulary_record(Path(tmp) / n / "adapter") or {}).get("added_tokens")]
            tokenizer = load_adapter_tokenizer(Path(tmp) / added[0] / "adapter", path) if added else load_tokenizer(path)
            classifiers = {n: load_trained(path, Path(tmp) / n / "adapter", tokenizer) for n in heads}
            rules = {n: read_rule(Path(tmp) / n / "eval") for n in adapters}
        return cls(model=model, tokenizer=tokenizer, base_name=base_model_name(project), adapters=adapters,
                   classifiers=classifiers, base_path=path, abstainers={n: r for n, r in rules.items() if r})

    def complete(self, adapter: str | None, messages: list[dict[str, str]], max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, *, fit_max_tokens: bool = False, timeout_s: float | None = None,
                 cancel: threading.Event | None = None) -> Completion:
        """Generate one answer with `adapter` (None: the base model). Serialised and bounded: see the module docstring.
        A classify adapter answers with its label instead (`_classify`: one forward pass, no generation).

        Raises:
            ApiError: 400 `context_length_exceeded` or a chat template that refuses the messages; 503
                `server_busy` (the lock was not free before the deadline) or `server_shutting_down` (`cancel` set);
                504 `request_timeout` (the prompt could not be read before the deadline).
        """
        import contextlib

        import torch

        started = time.time()
        deadline = started + timeout_s if timeout_s is not None else None
        if adapter in self.classifiers:
            return self._classify(adapter, messages, deadline, timeout_s, cancel)
        input_ids, attention = self.encode(messages)  # (1, T) each; outside the generation lock
        n_prompt = int(input_ids.shape[1])
        max_new_tokens = check_context(self.context_window, n_prompt, max_new_tokens, fit_max_tokens)
        from tunegate.data.format import stop_token_ids

        # The same stop tokens as the eval stage, the bundle and vLLM: eos and end of turn.
        stop_ids = stop_token_ids(self.tokenizer)
        # eval.abstain: the threshold was measured on greedy answers, so an abstaining adapter answers greedily
        rule = self.abstainers.get(adapter) if adapter is not None else None
        sampling = temperature >= MIN_TEMPERATURE and not rule
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sampling,
                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": stop_ids,
                  "stopping_criteria": _stopping_criteria(started, timeout_s, cancel)}
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if n_prompt > self.prefill_chunk_tokens:
            kwargs["prefill_chunk_size"] = self.prefill_chunk_tokens
        if rule:  # eval.abstain: the answer's confidence needs each step's logits
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        self._acquire(deadline, timeout_s, cancel)
        hook = None
        try:
            hook = self.model.get_input_embeddings().register_forward_pre_hook(_PrefillGuard(deadline, cancel))
            input_ids, attention = input_ids.to(self.model.device), attention.to(self.model.device)
            if seed is not None:
                torch.manual_seed(seed)
            if adapter is None:  # a PeftModel (disable_adapter, singular) once any adapter is attached
                ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
            else:
                self.model.set_adapter(adapter)
                ctx = contextlib.nullcontext()
            with ctx, torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        except _PrefillStopped as stopped:
            if stopped.cancelled:
                raise shutting_down_error() from None
            raise ApiError(504, f"messages: the prompt ({n_prompt} tokens) could not be read within the request's "
                           f"deadline of {timeout_s:g} s (serve.request_timeout_s); send a shorter prompt or retry "
                           "later", "api_error", "request_timeout") from None
        finally:
            if hook is not None:
                hook.remove()
            self.lock.release()
        sequences = out.sequences if rule else out
        new = sequences[0, n_prompt:].tolist()  # (N,) generated token ids; one sequence: no padding
        n_generated = len(new)
        finish = "length"
        ends = [i for i, t in enumerate(new) if t in stop_ids]
        if ends:
            new = new[: ends[0]]
            finish = "stop"
        with self.tokenizer_lock:
            text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in stop or []:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        if rule:
            from tunegate.evals.abstain import answer_confidences

            (confidence,) = answer_confidences(out.logits, sequences[:, n_prompt:], stop_ids)
            if confidence < rule["threshold"]:  # as the eval gate measured it: the abstain label, a whole answer
                text, finish = rule["abstain_label"], "stop"
        return Completion(text, finish, n_prompt, n_generated, new)

    def _classify(self, adapter: str, messages: list[dict[str, str]], deadline: float | None, timeout_s: float | None,
                  cancel: threading.Event | None) -> Completion:
        """The label of a classify adapter (tunegate.recipes.classify) for `messages`: the prompt rendered as the eval
        renders it (the chat template up to the assistant's turn), cut to the head's max_length tokens from the left,
        one forward pass under the generation lock (taken before `deadline`, as for generation), the most probable
        label, or the abstain label under the head's threshold. max_tokens, sampling and stop strings do not apply:
        the answer is a label, finish_reason "stop".

        Raises:
            ApiError: 400 (too many characters for the context window, or the chat template refused the messages),
                503 busy or shutting down.
        """
        import torch

        from tunegate.recipes.classify import encode_prompts, predict_labels

        model, head = self.classifiers[adapter]
        self.encode(messages)  # the same refusals as a generation request (characters over the window, the template)
        with self.tokenizer_lock:
            ids = encode_prompts(self.tokenizer, [{"messages": [*messages, {"role": "assistant", "content": ""}]}],
                                 head["max_length"])[0]
        self._acquire(deadline, timeout_s, cancel)
        try:
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits  # (1, n_labels)
        finally:
            self.lock.release()
        (label,), _ = predict_labels(torch.softmax(logits.float(), -1).cpu().numpy(), head)
        with self.tokenizer_lock:
            n_label = len(self.tokenizer(label, add_special_tokens=False)["input_ids"])
        return Completion(label, "stop", len(ids), n_label)

    def encode(self, messages: list[dict[str, str]]):
        """The chat template applied to `messages`: (input_ids, attention_mask), each (1, T), on the CPU.

        A prompt with more characters than the context window can hold is refused before it is tokenized.

        Raises:
            ApiError: 400 `context_length_exceeded` (too many characters), or `chat_template_refused`.
        """
        chars = sum(len(m["content"]) for m in messages)
        if self.context_window and self.max_token_chars and chars > self.context_window * self.max_token_chars:
            raise ApiError(400, f"messages: this model's maximum context length is {self.context_window} tokens; "
                           f"your messages are {chars} characters, more than that many tokens can hold (no token of "
                           f"this vocabulary is longer than {self.max_token_chars} characters). Reduce the length of "
                           "the messages.", code="context_length_exceeded")
        from jinja2.exceptions import TemplateError

        try:
            with self.tokenizer_lock:
                enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
        except TemplateError as exc:
            raise ApiError(400, f"messages: the chat template refused them: {exc}", code="chat_template_refused") from None
        return enc["input_ids"], enc["attention_mask"]

    def _acquire(self, deadline: float | None, timeout_s: float | None, cancel: threading.Event | None) -> None:
        """Take the generation lock before `deadline` (time.time()) unless `cancel` is set. Raises ApiError 503."""
        while True:
            if cancel is not None and cancel.is_set():
                raise shutting_down_error()
            wait = LOCK_POLL_S if deadline is None else min(LOCK_POLL_S, deadline - time.time())
            if wait <= 0:
                raise busy_error(timeout_s)
            if self.lock.acquire(timeout=wait):
                if cancel is not None and cancel.is_set():  # shut down while this request waited
                    self.lock.release()
                    raise shutting_down_error()
                if deadline is not None and time.time() >= deadline:  # had at the last instant: no time to answer
                    self.lock.release()
                    raise busy_error(timeout_s)
                return

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

    def load_slot(self, slot: str, bundle: Path, release: dict[str, Any]) -> None:
        """Attach the adapter of the verified bundle folder `bundle` as `slot` (tunegate.serve.production), under the
        generation lock: the answer in flight finishes first, and the next one may use it.

        Raises:
            NotServable: the adapter adds tokens this server's tokenizer lacks (a new tokenizer needs a restart
                with the bundle in serve.bundles).
            TunegateError: another vocabulary (models.fit_to_adapter).
        """
        from tunegate.evals.abstain import read_rule
        from tunegate.models import read_vocabulary_record
        from tunegate.recipes.classify import is_classifier, load_trained

        if is_classifier(Path(bundle) / "adapter"):  # method classify: a model of its own, loaded outside the lock
            if self.base_path is None:
                raise NotServable("this server was started without its base model's folder; restart it to load a classification head")
            loaded = load_trained(self.base_path, Path(bundle) / "adapter", self.tokenizer)
            with self.lock:
                self.classifiers[slot] = loaded
            return
        added = (read_vocabulary_record(Path(bundle) / "adapter") or {}).get("added_tokens") or {}
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        if any(tok not in vocab for tok in added):
            raise NotServable("the adapter was trained with added tokens this server's tokenizer lacks; add its "
                              "bundle to serve.bundles and restart the server (it then starts with that tokenizer)")
        rule = read_rule(Path(bundle) / "eval")
        with self.lock:
            self.model = _attach(self.model, Path(bundle) / "adapter", slot)
            self.abstainers.pop(slot, None)
            if rule:
                self.abstainers[slot] = rule

    def unload_slot(self, slot: str) -> None:
        """Delete the PEFT adapter `slot` from the model (a classify adapter: its model), under the generation lock."""
        with self.lock:
            self.abstainers.pop(slot, None)
            if self.classifiers.pop(slot, None) is None:
                self.model.delete_adapter(slot)

    def close(self) -> None:
        """Nothing to release: the model is freed with the engine."""


class _PrefillStopped(Exception):
    """Raised inside generate by _PrefillGuard: the deadline passed, or shutdown began (`cancelled`), mid-prompt."""

    def __init__(self, cancelled: bool):
        super().__init__("prefill stopped")
        self.cancelled = cancelled


@dataclass
class _PrefillGuard:
    """A forward pre-hook on the input embeddings: before each forward pass over more than one position (a chunk of
    the prompt; generating a token is one position, stopped by the stopping criteria instead), raise _PrefillStopped
    once the deadline (time.time()) has passed, or would pass before the chunk ends (a chunk takes at least as long
    as the one before it: each attends to more of the prompt), or `cancel` is set. The one way to stop transformers'
    chunked prefill; it keeps the generation lock from being held past the deadline by a chunk started just before."""

    deadline: float | None
    cancel: threading.Event | None
    last_start: float | None = None  # when the previous chunk started (time.time())

    def __call__(self, _module, args) -> None:
        if not args or getattr(args[0], "ndim", 0) < 2 or args[0].shape[-1] <= 1:  # input_ids (B, T)
            return
        if self.cancel is not None and self.cancel.is_set():
            raise _PrefillStopped(cancelled=True)
        now = time.time()
        previous = now - self.last_start if self.last_start is not None else 0.0
        if self.deadline is not None and now + previous >= self.deadline:
            raise _PrefillStopped(cancelled=False)
        self.last_start = now


def _stopping_criteria(started: float, timeout_s: float | None, cancel: threading.Event | None):
    """transformers stopping criteria for one answer: the deadline `started + timeout_s` (time.time(); the library's
    MaxTimeCriteria) and the shutdown event `cancel`. Checked after each generated token."""
    import torch
    from transformers.generation.stopping_criteria import (
        MaxTimeCriteria,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    class EventSet(StoppingCriteria):
        """Stop every sequence once `event` is set (the server is shutting down)."""

        def __init__(self, event: threading.Event):
            self.event = event

        def __call__(self, input_ids, scores, **kwargs):  # input_ids (B, T) -> (B,) bool
            return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device, dtype=torch.bool)

    criteria = StoppingCriteriaList()
    if timeout_s is not None:
        criteria.append(MaxTimeCriteria(max_time=timeout_s, initial_timestamp=started))
    if cancel is not None:
        criteria.append(EventSet(cancel))
    return criteria


def _attach(model, adapter_dir: Path, name: str):
    """`adapter_dir` attached to `model` as `name`, the base model's embeddings grown first for its added tokens
    (models.fit_to_adapter: TunegateError for an adapter of another vocabulary, or added tokens other than those of
    an adapter already attached)."""
    from peft import PeftModel

    from tunegate.models import fit_to_adapter
    from tunegate.recipes.lean_adapter import use_lean_forward

    fit_to_adapter(model, adapter_dir)
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=False).eval()
    use_lean_forward(model)  # the new adapter's layers too: DoRA's weight norm once, not at every decoding step
    return model
