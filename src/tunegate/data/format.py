"""Rendering through the chat template, the loss mask, and the over-length policy.

The loss mask is derived from rendered prefixes, never from template markers or token ids:
for each assistant turn i, `render(messages[:i], add_generation_prompt=True)` must tokenize to an exact
prefix of `render(messages[:i+1])` (case C03 in docs/cases.md); the supervised span is what follows that prefix, up to and
including the end-of-turn token (case C01: with SmolLM2, eos == pad == `<|im_end|>`, so the end-of-turn
label is set by position and padding is masked by position in the collator). This works for templates
without `{% generation %}` markers (case C09). Plain prompt/completion rows (no template) are
`prompt + completion + exactly one eos`, the eos supervised (case C02).

Tool calling (a row with `tools`, tunegate.data.records): rendered through the chat template's own tool
support when it has one (`supports_tools`: it writes the schemas, the assistant's `tool_calls` and the `tool`
results), else through one fallback, `tool_fallback_messages` (SmolLM2's template has none): the schemas go into
the system message (TOOL_FALLBACK), each call into the assistant's text as a `<tool_call>` JSON line, the format
of Hermes-style and Qwen2.5 templates, and the results into a user turn as `<tool_response>` blocks. Either way
`render_chat` does it, so the loss mask is still derived from rendered prefixes and the calls are supervised as
the assistant's answer, and eval prompts (`generation_prompt`) render the same way.

Every function here raises `RowError` (rule + detail) for a row it cannot encode; callers turn that into
a rejection with the row's id, never a crash mid-run.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from tunegate.data.records import RowError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool = False

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _cached(tokenizer, name: str, compute):
    """`compute()` for the tokenizer's current chat template, kept on the tokenizer as attribute `name` (computed
    again when the template changes, or each time on a tokenizer that takes no new attribute)."""
    template = str(getattr(tokenizer, "chat_template", None))
    cached = getattr(tokenizer, name, None)
    if cached is not None and cached[0] == template:
        return cached[1]
    value = compute()
    try:
        setattr(tokenizer, name, (template, value))
    except AttributeError:
        pass
    return value


def supports_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (rather than raising or dropping it)."""
    return _cached(tokenizer, "_tunegate_system_role", lambda: _renders_system(tokenizer))


def _renders_system(tokenizer) -> bool:
    probe = "tunegate-system-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}], tokenize=False
        )
    except Exception:  # templates reject a system role with a jinja exception of their own
        return False
    return probe in text


def apply_system_policy(messages: list[dict[str, str]], policy: str, template_has_system: bool) -> list[dict[str, str]]:
    """The one system-message policy, applied the same way in data, train and eval (case C04).

    policy: "auto" keeps a system message when the template has a system role and merges it into the first
    user turn otherwise; "merge" always merges; "reject" raises RowError for any system message.
    """
    if not messages or messages[0]["role"] != "system":
        return messages
    if policy == "reject":
        raise RowError("system_role", "system messages are rejected by data.system_role=reject")
    if policy == "auto" and template_has_system:
        return messages
    system, first, *rest = messages
    merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
    return [merged, *rest]


CONTROL_TOKEN_RULE = "control_token"


def special_tokens(tokenizer) -> frozenset[str]:
    """The strings `tokenizer` turns into a control token wherever they stand in text: its special tokens
    (`all_special_tokens` and every added token marked special, e.g. SmolLM2's `<|im_start|>`, `<|im_end|>`,
    `<|endoftext|>`) and any other added token its chat template writes (a template marker such as Qwen2.5's
    `<tool_call>`, which is added but not marked special). About 10 us for SmolLM2's 17. A set of strings (one
    computed before) is returned as it is, as a frozenset."""
    if isinstance(tokenizer, (frozenset, set)):
        return frozenset(tokenizer)
    found = {str(s) for s in (getattr(tokenizer, "all_special_tokens", None) or ())}
    template = getattr(tokenizer, "chat_template", None) or ""
    template = "\n".join(template.values()) if isinstance(template, dict) else str(template)
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = str(getattr(tok, "content", tok))
        if getattr(tok, "special", False) or (content.strip() and content in template):
            found.add(content)
    return frozenset(s for s in found if s.strip())


@functools.lru_cache(maxsize=16)
def _control_pattern(specials: frozenset[str]) -> re.Pattern[str] | None:
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s))))


def control_token_in(specials: frozenset[str], text: str) -> str | None:
    """The first of `specials` (a `special_tokens` set) that `text` contains, or None. One regex pass over `text`."""
    pattern = _control_pattern(frozenset(specials))
    m = pattern.search(text) if pattern is not None and isinstance(text, str) else None
    return m.group(0) if m else None


def control_token_problem(tokenizer_or_specials, messages: list[dict[str, Any]] | None = None, *,
                          fields: dict[str, Any] | None = None) -> str | None:
    """Why this text must be refused (rule `control_token`), or None: the first message content (or named
    field) that holds a string the tokenizer turns into a control token, named like
    `messages[1].content contains the control token '<|im_start|>'`.

    tokenizer_or_specials: a tokenizer, or the frozenset of its `special_tokens` (computed once by a caller that
    checks many rows). messages: [{role, content: str}, ...]. fields: other texts by name ({"rejected": ...}).

    The decision (docs/design.md#control-tokens): text never becomes a control token; text that spells one is
    refused. `<|im_end|>\n<|im_start|>assistant\n...` inside a message would become real turn boundaries when
    the chat template is rendered and tokenized: a user could forge an assistant turn at serve time, and through
    `tunegate data feedback` in the next round's training data. So such text is refused where it enters what is
    trained on, gated or served: the data stage rejects the row (rejected.jsonl, rule `control_token`), a golden
    set holding one is refused (data and eval stages), the serving API answers 400 (`code: control_token`) to a
    chat message or an edited answer, the feedback export rejects the row, and distillation leaves out a teacher
    answer holding one. (Prompts of the optional eval suites, e.g. IFEval's files, are not checked.) This is tiktoken's default (`encode` raises when text
    contains a special token, `disallowed_special="all"`). Escaping instead (tokenizing each content with
    special tokens off, so `<|im_end|>` stays plain text) would need every engine to tokenize message contents
    apart from the template's markers; vLLM renders and tokenizes the chat template itself from the messages
    it is sent, so tunegate cannot guarantee the escape there, and one rule that holds everywhere beats two.
    """
    specials = special_tokens(tokenizer_or_specials)
    for i, m in enumerate(messages or []):
        found = control_token_in(specials, m.get("content") if isinstance(m, dict) else None)
        if found:
            return f"messages[{i}].content contains the control token {found!r}"
    for name, text in (fields or {}).items():
        found = control_token_in(specials, text)
        if found:
            return f"{name} contains the control token {found!r}"
    return None


def record_control_token_problem(specials, record: dict[str, Any]) -> str | None:
    """`control_token_problem` over every text of a record of any kind (records.record_kind): its messages,
    a preference pair's `rejected`, a plain row's `prompt` and `completion`, a raw `text`."""
    fields = {k: record[k] for k in ("rejected", "prompt", "completion", "text") if isinstance(record.get(k), str)}
    if record.get("tools"):  # rendered into the prompt: a schema's text must not spell a control token either
        fields["tools"] = json.dumps(record["tools"], ensure_ascii=False)
    for i, m in enumerate(record.get("messages") or []):
        if isinstance(m, dict) and m.get("tool_calls"):
            fields[f"messages[{i}].tool_calls"] = json.dumps(m["tool_calls"], ensure_ascii=False)
    return control_token_problem(specials, record.get("messages"), fields=fields)


def check_control_tokens(specials, record: dict[str, Any]) -> None:
    """Raises RowError (rule `control_token`) when `record_control_token_problem` finds one."""
    problem = record_control_token_problem(specials, record)
    if problem:
        raise RowError(CONTROL_TOKEN_RULE, f"{problem}; text that spells a control token is refused (it would become one)")


def token_ids(tokenizer, text: str) -> list[int]:
    """The token ids of `text` alone: no BOS or other special token is added (a rendered chat carries its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# The fallback's system message (tool_fallback_messages): the schemas one JSON object a line, and how to call.
TOOL_FALLBACK = """You may call functions to answer the user. The functions, one JSON schema a line:
<tools>
{tools}
</tools>
To call functions, answer with one <tool_call></tool_call> block per call, each holding a JSON object with the function's name and arguments:
<tool_call>
{{"name": "function name", "arguments": {{"argument": "value"}}}}
</tool_call>
If no function fits the request, answer in words and call none."""


def supports_tools(tokenizer) -> bool:
    """Whether the chat template renders tool calling itself: given a probe schema in `tools`, an assistant turn
    with a probe call and a `tool` result, its output holds all three (transformers' `apply_chat_template(...,
    tools=...)` convention). Cached on the tokenizer."""
    def probe() -> bool:
        tools = [{"type": "function", "function": {"name": "tunegate_probe_tool", "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        messages = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "tunegate_probe_tool", "arguments": {"tunegate_probe_arg": 1}}}]},
                    {"role": "tool", "content": "tunegate-probe-result"}]
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # a template that refuses the tool role or the keyword
            return False
        return all(p in text for p in ("tunegate_probe_tool", "tunegate_probe_arg", "tunegate-probe-result"))

    return _cached(tokenizer, "_tunegate_supports_tools", probe)


def _call_block(call: dict[str, Any]) -> str:
    fn = call["function"]
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False) + "\n</tool_call>"


def tool_fallback_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """A chat with tools as plain system/user/assistant messages, for templates without tool support.

    The schemas (records.normalize_tools shape) go into the system message, after the row's own system text if
    any (TOOL_FALLBACK); an assistant turn's calls become `<tool_call>` blocks after its text, one a line,
    `{"name", "arguments"}` JSON (what tunegate.evals.toolcall.parse_calls reads back); consecutive `tool` turns
    become one user turn of `<tool_response>` blocks. A prefix of the chat ending before an assistant turn maps
    to a prefix of the result, which the loss mask relies on.
    """
    out: list[dict[str, str]] = []
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if tools:
        block = TOOL_FALLBACK.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        system = f"{system}\n\n{block}" if system else block
    if system:
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        elif m.get("tool_calls"):
            parts = ([m["content"].strip()] if m["content"].strip() else []) + [_call_block(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def render_chat(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
    """`messages` rendered as text through the tokenizer's chat template, with the assistant header after the
    last turn when `add_generation_prompt`.

    tools: the row's function schemas (records.normalize_tools), or None. With tools, or with tool calls or
    results among the messages, the template renders them itself when `supports_tools`; otherwise the chat is
    first rewritten by `tool_fallback_messages` (a system message it adds is merged into the first user turn
    when the template has no system role, as data.system_role auto does).

    Raises:
        RowError: rule `template_error`, when the template refuses the messages (an unsupported role, its own
            `raise_exception(...)`).
    """
    kwargs: dict[str, Any] = {}
    if tools or _has_tool_turns(messages):
        if tools and supports_tools(tokenizer):
            kwargs["tools"] = tools
        else:
            messages = apply_system_policy(tool_fallback_messages(messages, tools), "auto", supports_system_role(tokenizer))
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # a template's own error (unsupported role, raise_exception(...))
        raise RowError("template_error", f"the chat template refused the row: {exc}") from None


def end_token_id(tokenizer) -> int:
    """The end-of-turn token: `<|im_end|>` for ChatML templates, else eos."""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eot is None or eot == tokenizer.unk_token_id:
        return tokenizer.eos_token_id
    return eot


def stop_token_ids(tokenizer) -> list[int]:
    """The token ids generation stops at: the tokenizer's eos, then the end-of-turn token (`end_token_id`) when
    it differs (e.g. `<|endoftext|>` and `<|im_end|>`), without duplicates or None.

    The one list every generator and every written artifact uses: the eval stage and the embedded server pass it
    to `generate`, GRPO's policy carries it, the adapter folder, merged model and release bundle write it as
    `generation_config.json`'s `eos_token_id` (`models.write_stop_tokens`), and the vLLM proxy sends it as
    `stop_token_ids`. A list because Hugging Face `generate` and vLLM both read a list of eos ids; eos first, so
    readers that take the first id as "the" eos (pad fallbacks) keep the tokenizer's.
    """
    ids = [tokenizer.eos_token_id, end_token_id(tokenizer)]
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


def encode_chat(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Encoded:
    """Token ids and labels for a chat; only assistant content (with its tool calls) and its end-of-turn token
    are supervised. tools: the row's function schemas, rendered as `render_chat` does."""
    eot = end_token_id(tokenizer)
    full = token_ids(tokenizer, render_chat(tokenizer, messages, False, tools))
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = token_ids(tokenizer, render_chat(tokenizer, messages[:i], True, tools))
        upto = token_ids(tokenizer, render_chat(tokenizer, messages[: i + 1], False, tools))
        if full[: len(upto)] != upto or upto[: len(prefix)] != prefix:
            raise RowError(
                "prompt_not_prefix",
                f"turn {i}: the rendered prompt (with generation prompt) is not a token prefix of the rendered "
                "conversation; the assistant header would be trained on",
            )
        span = upto[len(prefix):]
        if eot not in span:
            raise RowError("no_end_token", f"turn {i}: the template puts no end-of-turn token after the answer")
        end = len(prefix) + span.index(eot) + 1  # include the end-of-turn token
        for j in range(len(prefix), end):
            labels[j] = full[j]
    enc = Encoded(full, labels)
    if enc.n_supervised == 0:
        raise RowError("no_supervised_tokens", "no assistant token to learn from")
    return enc


def encode_plain(tokenizer, prompt: str, completion: str) -> Encoded:
    """Plain text: prompt ids + completion ids + exactly one eos (case C02). The completion and eos are supervised."""
    eos = tokenizer.eos_token_id
    p = token_ids(tokenizer, prompt)
    c = token_ids(tokenizer, completion)
    while c and c[-1] == eos:  # a completion that already ends in eos gets no second one
        c = c[:-1]
    if not c:
        raise RowError("empty_turn", "completion has no tokens")
    ids = p + c + [eos]
    return Encoded(ids, [IGNORE_INDEX] * len(p) + c + [eos])


def apply_length_policy(enc: Encoded, max_length: int, policy: str, eos_id: int) -> Encoded:
    """Fit a row into max_length tokens (cases C10, C11). Raises RowError when it cannot.

    drop: reject an over-length row. truncate_end: keep the first max_length-1 tokens and put a supervised
    end token last, so the model still learns to stop. cut_context_left: drop tokens from the start,
    keeping the end of the conversation (the answer) whole.
    A row left with no supervised token is rejected: it would log a loss of 0 and train on nothing.
    """
    if len(enc.input_ids) <= max_length:
        return enc
    n = len(enc.input_ids)
    if policy == "drop":
        raise RowError("overlength", f"{n} tokens > max_length {max_length} (policy drop)")
    if policy == "truncate_end":
        ids = enc.input_ids[: max_length - 1]
        labels = enc.labels[: max_length - 1]
        if all(x == IGNORE_INDEX for x in labels):
            raise RowError("no_supervised_tokens", f"{n} tokens: the prompt alone fills max_length {max_length}")
        out = Encoded(ids + [eos_id], labels + [eos_id], truncated=True)
    elif policy == "cut_context_left":
        last = max(i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX)
        start = last
        while start > 0 and enc.labels[start - 1] != IGNORE_INDEX:
            start -= 1  # start of the final answer's supervised span
        if last + 1 - start > max_length:
            raise RowError("overlength", f"the final answer alone is longer than max_length {max_length} (policy cut_context_left)")
        lo = last + 1 - max_length
        out = Encoded(enc.input_ids[lo : last + 1], enc.labels[lo : last + 1], truncated=True)
    else:
        raise ValueError(f"unknown over-length policy {policy}")
    if out.n_supervised == 0:
        raise RowError("no_supervised_tokens", f"nothing left to learn from after cutting to {max_length} tokens")
    return out


def encode_text(tokenizer, text: str) -> Encoded:
    """Raw text for continued pretraining: its ids and one eos, every token supervised (a causal LM objective).

    No length policy: the CPT recipe packs texts into `max_length` blocks, so a long text is split, not cut.
    """
    ids = token_ids(tokenizer, text) + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def rejected_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A preference pair's prompt with the rejected answer as its final assistant turn."""
    return [*record["messages"][:-1], {"role": "assistant", "content": record["rejected"]}]


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for: the length of its longest vocabulary entry
    (81 for SmolLM2). A byte-level BPE entry spells one character per byte and a SentencePiece entry one per
    character, so no token decodes to more characters than its entry has. Cached on the tokenizer."""
    cached = getattr(tokenizer, "_tunegate_max_token_chars", None)
    if cached is None:
        cached = max(map(len, tokenizer.get_vocab()))
        try:
            tokenizer._tunegate_max_token_chars = cached
        except AttributeError:  # a tokenizer that takes no new attributes: computed each time (~50 ms)
            pass
    return cached


def check_length_before_tokenizing(tokenizer, record: dict[str, Any], max_length: int, policy: str) -> None:
    """Reject, without tokenizing, a row that cannot fit: tokenizing costs time and memory in proportion to a
    row's length (a 50 MB row took minutes and gigabytes), and a text of more than max_length x
    `max_token_chars` characters has more than max_length tokens whatever it says.

    Applies where the length policy would reject the row anyway: `drop` (the whole conversation, or either
    side of a preference pair) and `cut_context_left` (the final answer alone). `truncate_end` and raw text
    are tokenized; their size is bounded by data.sources[].max_row_bytes.

    Raises:
        RowError: rule `overlength`, naming the characters and the bound.
    """
    if "text" in record or policy == "truncate_end":
        return
    bound = max_length * max_token_chars(tokenizer)
    if "messages" in record:
        prompt = sum(len(m["content"]) for m in record["messages"][:-1])
        answers = [record["messages"][-1]["content"]] + ([record["rejected"]] if "rejected" in record else [])
    else:
        prompt, answers = len(record["prompt"]), [record["completion"]]
    for answer in answers:
        n = len(answer) + (prompt if policy == "drop" else 0)
        if n > bound:
            what = "the row" if policy == "drop" else "the final answer alone"
            raise RowError("overlength", f"{what} has {n:,} characters: more than max_length {max_length} tokens can "
                                         f"hold ({bound:,} = {max_length} x {max_token_chars(tokenizer)}, the longest "
                                         f"token) (policy {policy}; not tokenized)")


def encode_record(tokenizer, record: dict[str, Any], max_length: int, policy: str) -> Encoded:
    """Token ids and labels for any kind of record (records.record_kind). Raises RowError.

    A preference pair must encode on both sides (same prompt, chosen and rejected answers, each within the
    over-length policy); the chosen side is returned, with the longer length of the two when it is longer.
    A row any of whose texts spells one of the tokenizer's control tokens is refused first (rule `control_token`,
    `control_token_problem`); a row that cannot fit is rejected before it is tokenized
    (`check_length_before_tokenizing`).
    """
    check_control_tokens(special_tokens(tokenizer), record)
    check_length_before_tokenizing(tokenizer, record, max_length, policy)
    if "text" in record:
        return encode_text(tokenizer, record["text"])
    if "messages" not in record:
        enc = encode_plain(tokenizer, record["prompt"], record["completion"])
        return apply_length_policy(enc, max_length, policy, tokenizer.eos_token_id)
    eot = end_token_id(tokenizer)
    enc = apply_length_policy(encode_chat(tokenizer, record["messages"], record.get("tools")), max_length, policy, eot)
    if "rejected" in record:
        try:
            rej = apply_length_policy(encode_chat(tokenizer, rejected_messages(record)), max_length, policy, eot)
        except RowError as exc:
            raise RowError(exc.rule, f"rejected answer: {exc.detail}") from None
        enc.truncated = enc.truncated or rej.truncated
    return enc


def generation_prompt(tokenizer, record: dict[str, Any]) -> str:
    """What the model sees at eval and serve time: the conversation without its final answer."""
    if "messages" in record:
        return render_chat(tokenizer, record["messages"][:-1], True, record.get("tools"))
    return record["prompt"]


def encode_batch_fn(base_model: str, system_role: str, max_length: int, policy: str, added_tokens: tuple[str, ...] = ()):
    """A worker's batch function (tunegate.data.engine) for the data stage's template step.

    The returned function maps records to ("kept", record with the system policy applied, tokens, truncated)
    or ("rejected", rule, detail), in order; the tokenizer is loaded once per worker (no weights), with the
    project's `train.added_tokens` (plain tokens: text may spell them, `models.load_tokenizer`).
    """
    from tunegate.data.records import RowError
    from tunegate.models import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model(base_model, progress=False), added_tokens)
    has_system = supports_system_role(tokenizer)
    specials = special_tokens(tokenizer)

    def run(records: list[dict[str, Any]]) -> list[tuple]:
        out = []
        for rec in records:
            try:
                check_control_tokens(specials, rec)  # before the system policy: messages[i] is the source's i
                if "messages" in rec:
                    rec = {**rec, "messages": apply_system_policy(rec["messages"], system_role, has_system)}
                enc = encode_record(tokenizer, rec, max_length, policy)
            except RowError as exc:
                out.append(("rejected", exc.rule, exc.detail))
                continue
            except Exception as exc:  # noqa: BLE001  a row the tokenizer cannot take (lone surrogates...): rejected, the stage goes on
                out.append(("rejected", "unencodable_row", f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
            out.append(("kept", rec, len(enc.input_ids), enc.truncated))
        return out

    return run
