"""Synthetic chat rows, self-instruct style.

Source: Wang et al. 2022, "Self-Instruct: Aligning Language Models with Self-Generated Instructions",
arXiv:2212.10560. Each round samples `num_examples` tasks into a few-shot prompt asking for one new request
that differs from all of them; as in the paper, the examples are seed tasks plus, once some exist, a few
already-generated ones (the paper mixes 6 human and 2 machine tasks). Every request that survives the filters
is answered in a second call (instruction -> answer) whose context holds the sampled seeds as worked examples
(the paper's instance generation), under the seeds' system prompt when they have one.

Seeds are the chat rows of the project's sources (first user turn -> instruction, the assistant turn after it
-> answer) or a seed file. Filters, each a keep or a drop with a reason (every drop is counted in
`<out>.stats.json` and kept in `<out>.dropped.jsonl`):

    empty_instruction   nothing left after stripping "Request 3:"-style labels and quotes
    too_short           fewer than `min_words` words (paper: 3)
    too_long            more than `max_words` words (paper: 150)
    bad_start           starts with punctuation (paper: "starting with punctuation")
    copies_prompt       the text is part of the few-shot prompt (an echoed example or the request itself)
    duplicate           equal, after `normalize_text`, to a seed, an existing row or a generated request
    rouge_l             ROUGE-L F1 >= `rouge_threshold` (paper: 0.7) against any of those
    empty_answer        the answer call returned nothing

Output rows are tunegate `chat` rows; the extra keys (`source: synthetic`, `generator`, `seed_ids`,
`prompt_template_sha256`, `created_at`) land in the record's `meta` when the file is read as a source.
The output is rewritten atomically after every round, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

from tunegate import TunegateError
from tunegate.core.io import iter_jsonl, read_jsonl
from tunegate.data.records import normalize_text, record_from_object, record_kind, RowError

Messages = list[dict[str, str]]

INSTRUCTION_TEMPLATE = (
    "Here are {k} example requests that users sent to an AI assistant:\n\n"
    "{examples}\n\n"
    "Write one new request that a user could send. It must be different from every example above "
    "(another topic or another kind of task) but in the same style. Reply with the request only, without an answer."
)
# The answer call is a chat, not a template: [system] + (example request, example answer) x m + new request.
ANSWER_FORMAT = "system? + (user: example request, assistant: example answer) x m + user: new request"
PROMPT_TEMPLATE_SHA256 = hashlib.sha256((INSTRUCTION_TEMPLATE + "\x00" + ANSWER_FORMAT).encode()).hexdigest()
METHOD = "self-instruct (Wang et al. 2022, arXiv:2212.10560)"


@dataclass(frozen=True)
class Task:
    """One instruction with its answer: a seed, or a generated row. `system` is the context it is answered
    under; `system_in_row` says whether that system turn belongs in a generated row (False when a source's
    `instruction` supplied it, since reading the row through that source adds it again)."""

    id: str
    instruction: str
    answer: str
    system: str | None = None
    system_in_row: bool = True


class Generator(Protocol):
    """Answers chats. `complete` returns one text per conversation (OpenAI `messages` lists), in input order;
    greedy when `temperature` is 0, else nucleus-sampled with `top_p`, reproducibly for a given `seed`."""

    name: str

    def complete(self, conversations: Sequence[Messages], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, desc: str = "generating") -> list[str]: ...


class LocalGenerator:
    """A transformers model generating in-process with tunegate's batched generation
    (`tunegate.evals.generate.generate`: left padding, length-sorted batches, KV cache)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size

    @classmethod
    def load(cls, base_model: str, batch_size: int = 16) -> "LocalGenerator":
        """The embedded name, a Hugging Face id or a local folder (see `tunegate.models.resolve_base_model`).

        Raises:
            TunegateError: the embedded package is missing, or a local path does not exist.
        """
        from tunegate.models import load_inference_model, load_tokenizer, resolve_base_model

        path = resolve_base_model(base_model)
        return cls(load_inference_model(path), load_tokenizer(path), base_model, batch_size)

    def complete(self, conversations, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, desc="generating"):
        import torch

        from tunegate.evals.generate import generate

        prompts = [self.tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in conversations]
        torch.manual_seed(seed)
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size, desc, temperature, top_p)


class OpenAIGenerator:
    """Any OpenAI-compatible /v1/chat/completions server (vLLM, TGI, llama.cpp, a hosted provider) through the
    `openai` client, `concurrency` requests in flight. The key is `api_key`, else $OPENAI_API_KEY, else
    "EMPTY" (vLLM and llama.cpp accept any key).

    Raises TunegateError naming the URL when the server cannot be reached or answers with an error.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8, timeout_s: float = 120):
        self.base_url, self.name, self.concurrency, self.timeout_s = base_url, model, concurrency, timeout_s
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"

    def complete(self, conversations, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, desc="generating"):
        import openai

        from tunegate.evals.backends import map_requests

        client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s, max_retries=2)

        def one(item: tuple[int, Messages]) -> str:
            i, messages = item
            extra = {"top_p": top_p, "seed": seed + i} if temperature > 0 else {}
            resp = client.chat.completions.create(model=self.name, messages=list(messages), max_tokens=max_new_tokens,
                                                  temperature=temperature, **extra)
            return resp.choices[0].message.content or ""

        return map_requests(one, list(enumerate(conversations)), self.concurrency, desc,
                            f"{self.base_url}: OpenAI-compatible server for model {self.name!r}")


# ---------------------------------------------------------------- seeds


def task_from_record(record: dict[str, Any], system_in_row: bool = True) -> Task | None:
    """A canonical record -> its first exchange as a Task; None for raw text or a chat without an answer."""
    kind = record_kind(record)
    if kind == "text":
        return None
    if kind == "plain":
        return Task(record["id"], record["prompt"], record["completion"])
    msgs = record["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    body = msgs[1:] if system is not None else msgs
    if len(body) < 2 or body[0]["role"] != "user" or body[1]["role"] != "assistant":
        return None
    return Task(record["id"], body[0]["content"], body[1]["content"], system, system_in_row)


def project_seeds(project) -> list[Task]:
    """Seed tasks from every configured source of a `config.Project` (read by `records.read_source`).

    Raises:
        TunegateError: a source file is missing or unreadable.
    """
    from tunegate.data.records import read_source

    tasks = []
    for src in project.data.sources:
        records, _ = read_source(src)
        tasks += [t for r in records if (t := task_from_record(r, system_in_row=not src.instruction)) is not None]
    return tasks


def file_seeds(path: Path) -> list[Task]:
    """Seed tasks from a JSONL file whose rows are tunegate chat rows ({"messages": [...]}), prompt/completion
    rows, or self-instruct seed tasks ({"instruction", "instances": [{"input", "output"}]} or
    {"instruction", "input", "output"}). Rows that fit none of these are skipped.

    Raises:
        TunegateError: the file is missing, or no row is a usable seed.
    """
    path = Path(path)
    if not path.is_file():
        raise TunegateError(f"{path}: seed file not found (--seed-file)")
    tasks = []
    for lineno, obj, error in iter_jsonl(path):
        if error is not None or not isinstance(obj, dict):
            continue
        rid = str(obj.get("id", f"{path.stem}:{lineno}"))
        if "instruction" in obj:
            inst = (obj.get("instances") or [{}])[0] if isinstance(obj.get("instances"), list) else obj
            text = str(obj["instruction"]).strip()
            if str(inst.get("input") or "").strip():
                text += "\n\n" + str(inst["input"]).strip()
            answer = str(inst.get("output") or obj.get("answer") or "").strip()
            if text and answer:
                tasks.append(Task(rid, text, answer))
            continue
        fmt = "chat" if "messages" in obj else "prompt_completion"
        try:
            task = task_from_record(record_from_object(obj, fmt, rid, path.name))
        except RowError:
            continue
        if task is not None:
            tasks.append(task)
    if not tasks:
        raise TunegateError(f"{path}: no usable seed row (chat rows, prompt/completion rows, or instruction/output rows)")
    return tasks


# ---------------------------------------------------------------- prompts and filters


def instruction_prompt(examples: Sequence[Task]) -> str:
    """The few-shot request for one new instruction (INSTRUCTION_TEMPLATE filled with `examples`)."""
    listed = "\n\n".join(f"Request {i}: {t.instruction.strip()}" for i, t in enumerate(examples, start=1))
    return INSTRUCTION_TEMPLATE.format(k=len(examples), examples=listed)


def answer_conversation(instruction: str, demos: Sequence[Task], system: str | None) -> Messages:
    """[system] + the demos as (user, assistant) turns + the new instruction: the answer call's chat."""
    msgs: Messages = [{"role": "system", "content": system}] if system else []
    for d in demos:
        msgs += [{"role": "user", "content": d.instruction}, {"role": "assistant", "content": d.answer}]
    return msgs + [{"role": "user", "content": instruction}]


_LABEL = re.compile(r"^\s*[*#_\s]*(?:new\s+)?(?:request|task|instruction|question)\s*\d*\s*[:.)\-]+[*_\s]*", re.I)
_NEXT = re.compile(r"\n\s*[*#_]*\s*(?:new\s+)?(?:request|task|instruction|question|answer|response)\s*\d*\s*[:.)]", re.I)
_QUOTES = "\"'“”‘’`"


def parse_instruction(text: str) -> str:
    """The model's reply -> the request it wrote: without a "Request 5:" label, without a following listed
    request or an answer ("Answer:"), without wrapping quotes."""
    text = text.strip()
    text = _LABEL.sub("", text, count=1)
    text = _NEXT.split(text, maxsplit=1)[0].strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


class RougePool:
    """The instructions seen so far, for the ROUGE-L near-copy filter (rouge-score's RougeScorer, no stemmer).

    A cheap bound skips most pairs: ROUGE-L F1 <= 2c / (m + n), with c the size of the two token multisets'
    intersection, so only pairs whose bound reaches the threshold are scored exactly.
    """

    def __init__(self, threshold: float = 0.7):
        from rouge_score import rouge_scorer, tokenizers

        self.threshold = threshold
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self._tokenize = tokenizers.DefaultTokenizer(use_stemmer=False).tokenize
        self._items: list[tuple[str, str, Counter]] = []  # (id, text, token counts)

    def add(self, rid: str, text: str) -> None:
        self._items.append((rid, text, Counter(self._tokenize(text))))

    def __len__(self) -> int:
        return len(self._items)

    def nearest(self, text: str) -> tuple[float, str | None]:
        """(highest ROUGE-L F1 at or above the threshold, that item's id), or (0.0, None) when none reaches it."""
        tokens = Counter(self._tokenize(text))
        m = sum(tokens.values())
        best: tuple[float, str | None] = (0.0, None)
        for rid, other, counts in self._items:
            total = m + sum(counts.values())
            if total == 0 or 2 * sum((tokens & counts).values()) / total < self.threshold:
                continue
            f = self._scorer.score(other, text)["rougeL"].fmeasure
            if f >= self.threshold and f > best[0]:
                best = (f, rid)
        return best


def check_instruction(text: str, prompt: str, seen: dict[str, str], pool: RougePool,
                      min_words: int = 3, max_words: int = 150) -> tuple[str, dict[str, Any]] | None:
    """None to keep the parsed instruction, else (drop reason, detail). `seen` maps normalised text -> id."""
    if not text:
        return "empty_instruction", {}
    words = len(text.split())
    if words < min_words:
        return "too_short", {"words": words}
    if words > max_words:
        return "too_long", {"words": words}
    if not text[0].isalnum() and text[0] not in _QUOTES + "([":
        return "bad_start", {}
    key = normalize_text(text)
    if key in normalize_text(prompt):
        return "copies_prompt", {}
    if key in seen:
        return "duplicate", {"duplicate_of": seen[key]}
    score, rid = pool.nearest(text)
    if rid is not None:
        return "rouge_l", {"rouge_l": round(score, 4), "similar_to": rid}
    return None


# ---------------------------------------------------------------- the loop


def read_existing(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier (possibly interrupted) run's output, for resuming.

    Raises:
        TunegateError: a row is not a valid chat row (the file is not a synth output).
    """
    rows = []
    for lineno, obj, error in iter_jsonl(path):
        try:
            if error is not None:
                raise error
            task_from_record(record_from_object(obj, "chat", str(lineno), path.name))
        except (json.JSONDecodeError, RowError) as e:
            raise TunegateError(f"{path}:{lineno}: cannot resume from this file, not a chat row: {e}") from None
        rows.append(obj)
    return rows


def _row_task(row: dict[str, Any]) -> Task:
    task = task_from_record(record_from_object(row, "chat", str(row.get("id")), "out"))
    assert task is not None
    return task


def synthesize(
    generator: Generator,
    seeds: Sequence[Task],
    n: int,
    out: str | Path,
    *,
    seed: int = 0,
    num_examples: int = 4,
    num_generated_examples: int = 1,
    num_answer_examples: int = 3,
    batch_size: int = 16,
    instruction_tokens: int = 96,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    rouge_threshold: float = 0.7,
    min_words: int = 3,
    max_words: int = 150,
    max_attempts: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate until `out` holds `n` rows (resuming from the rows already there); return the stats.

    Each round asks `generator` for up to `batch_size` new instructions (sampled at `temperature`/`top_p`,
    at most `instruction_tokens` each), filters them, and answers the survivors greedily (at most
    `max_new_tokens`). Stops at `n` rows or after `max_attempts` instruction prompts (default 20 * n).
    Writes `out` (JSONL, atomically, after every round), `<out>.stats.json` and `<out>.dropped.jsonl`.

    Raises:
        TunegateError: no seeds, n < 1, or `out` holds rows that are not chat rows.
    """
    from rich.progress import Progress

    from tunegate.core.console import console
    from tunegate.core.io import atomic_write_json, atomic_write_jsonl

    out = Path(out)
    if n < 1:
        raise TunegateError(f"--n must be at least 1, got {n}")
    if not seeds:
        raise TunegateError("no seed tasks: the project's sources hold no chat rows (pass --seed-file)")
    t0 = time.perf_counter()
    rows = read_existing(out) if out.is_file() else []
    n_existing = len(rows)
    dropped_path = out.with_name(out.name + ".dropped.jsonl")
    dropped = _read_dropped(dropped_path) if n_existing else []
    drops: Counter = Counter()
    generated = [_row_task(r) for r in rows]
    pool = RougePool(rouge_threshold)
    seen: dict[str, str] = {}
    for t in [*seeds, *generated]:
        seen.setdefault(normalize_text(t.instruction), t.id)
        pool.add(t.id, t.instruction)
    rng = random.Random(f"{seed}:{n_existing}")  # a resumed run draws new prompts, not the first run's again
    max_attempts = 20 * n if max_attempts is None else max_attempts
    attempts = rounds = surplus = 0
    stop = "already_complete" if n_existing >= n else "max_attempts"
    with Progress(console=console, disable=not progress) as bar:
        task_bar = bar.add_task("synthetic rows", total=n, completed=min(n_existing, n))
        while len(rows) < n and attempts < max_attempts:
            need = n - len(rows)
            size = min(batch_size, max(2 * need, 2), max_attempts - attempts)
            rounds += 1
            attempts += size
            shots = [_sample_examples(rng, seeds, generated, num_examples, num_generated_examples) for _ in range(size)]
            prompts = [instruction_prompt(s) for s in shots]
            replies = generator.complete([[{"role": "user", "content": p}] for p in prompts], instruction_tokens,
                                         temperature, top_p, seed=rng.randrange(2**31), desc=f"round {rounds}: instructions")
            accepted = []
            for reply, prompt, shot in zip(replies, prompts, shots):
                if len(accepted) == need:
                    surplus += 1
                    continue
                text = parse_instruction(reply)
                verdict = check_instruction(text, prompt, seen, pool, min_words, max_words)
                if verdict is not None:
                    drops[verdict[0]] += 1
                    dropped.append({"reason": verdict[0], **verdict[1], "instruction": text, "raw": reply,
                                    "seed_ids": [t.id for t in shot]})
                    continue
                rid = "synth-" + hashlib.sha256(normalize_text(text).encode()).hexdigest()[:16]
                seen[normalize_text(text)] = rid
                pool.add(rid, text)
                accepted.append((rid, text, shot))
            contexts = [_answer_context(text, shot, num_answer_examples) for _, text, shot in accepted]
            answers = generator.complete([c[0] for c in contexts], max_new_tokens, 0.0, 1.0, desc=f"round {rounds}: answers")
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            for (rid, text, shot), (_, system, in_row), answer in zip(accepted, contexts, answers):
                answer = answer.strip()
                if not answer:
                    drops["empty_answer"] += 1
                    dropped.append({"reason": "empty_answer", "instruction": text, "raw": answer, "seed_ids": [t.id for t in shot]})
                    continue
                head = [{"role": "system", "content": system}] if system and in_row else []
                row = {
                    "id": rid,
                    "messages": [*head, {"role": "user", "content": text}, {"role": "assistant", "content": answer}],
                    "source": "synthetic",
                    "generator": generator.name,
                    "seed_ids": [t.id for t in shot],
                    "prompt_template_sha256": PROMPT_TEMPLATE_SHA256,
                    "created_at": created,
                }
                rows.append(row)
                generated.append(Task(rid, text, answer, system, in_row))
            atomic_write_jsonl(out, rows)  # after every round: an interrupted run resumes from here
            bar.update(task_bar, completed=min(len(rows), n))
        if len(rows) >= n and n_existing < n:
            stop = "reached_n"
    if not out.is_file():
        atomic_write_jsonl(out, rows)
    atomic_write_jsonl(dropped_path, dropped)
    wall_s = time.perf_counter() - t0
    new = len(rows) - n_existing
    stats = {
        "method": METHOD,
        "out": str(out),
        "generator": generator.name,
        "generator_kind": type(generator).__name__,
        "n_requested": n,
        "rows_total": len(rows),
        "rows_existing": n_existing,
        "rows_new": new,
        "seeds": len(seeds),
        "rounds": rounds,
        "instruction_prompts": attempts,
        "surplus_instructions": surplus,  # generated after the round already had enough: not filtered, not used
        "dropped": dict(sorted(drops.items())),
        "dropped_total": sum(drops.values()),
        "keep_rate": round(new / attempts, 4) if attempts else None,
        "stop_reason": stop,
        "wall_s": round(wall_s, 2),
        "rows_per_s": round(new / wall_s, 4) if wall_s > 0 else None,
        "prompt_template_sha256": PROMPT_TEMPLATE_SHA256,
        "settings": {
            "seed": seed, "num_examples": num_examples, "num_generated_examples": num_generated_examples,
            "num_answer_examples": num_answer_examples, "batch_size": batch_size,
            "instruction_tokens": instruction_tokens, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "rouge_threshold": rouge_threshold, "min_words": min_words, "max_words": max_words,
            "max_attempts": max_attempts,
        },
    }
    atomic_write_json(out.with_name(out.name + ".stats.json"), stats)
    return stats


def _sample_examples(rng: random.Random, seeds: Sequence[Task], generated: Sequence[Task], k: int, k_generated: int) -> list[Task]:
    """k few-shot tasks: up to k_generated generated ones, the rest seeds, in random order."""
    from_generated = rng.sample(list(generated), min(k_generated, len(generated), max(k - 1, 0)))
    shot = rng.sample(list(seeds), min(k - len(from_generated), len(seeds))) + from_generated
    rng.shuffle(shot)
    return shot


def _answer_context(instruction: str, shot: Sequence[Task], m: int) -> tuple[Messages, str | None, bool]:
    """(the answer call's chat, its system prompt, whether the row keeps that system turn). The system prompt
    is the most common one among the examples; the demos are the examples answered under it."""
    system = Counter(t.system for t in shot).most_common(1)[0][0] if shot else None
    demos = [t for t in shot if t.system == system][:m]
    in_row = system is not None and all(t.system_in_row for t in demos)
    return answer_conversation(instruction, demos, system), system, in_row


def _read_dropped(path: Path) -> list[dict[str, Any]]:
    """The dropped rows an earlier run of `synthesize` wrote (none when it wrote no file)."""
    return read_jsonl(path) if path.is_file() else []
