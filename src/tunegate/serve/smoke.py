"""The serving smoke test (case C17 in docs/cases.md): greedy canary prompts through a running server against the PEFT reference.

For the base model and each adapter, greedy canary prompts from the golden set go through the server. Each
adapter's answer must differ from the base model's on at least one canary (an adapter whose target modules the
server silently does not apply answers exactly like the base), and match the in-process PEFT reference
(transformers + PEFT, fp32, the same greedy max_tokens) on every canary. vLLM computes in bf16 and the
reference in fp32, so greedy answers part ways at near-ties, at times on the first token (measured:
BF16_MAX_RANK); an answer that is not an exact match then passes when vLLM, teacher-forced on the reference's
answer (prompt_logprobs), ranks each of its tokens within its top `max_rank` (default 3 in bf16; in float32 the
answers match exactly). `match_tokens=K` (the first K tokens) is kept for servers without prompt_logprobs.
`tunegate serve --engine vllm` runs it after launch, before it accepts a tenant; `tunegate serve-smoke` runs it
against any server.
"""

import json
import time
from typing import Any

from tunegate import TunegateError
from tunegate.serve.bundles import base_model_name
from tunegate.serve.engine import EmbeddedEngine

# The smoke test's default for a bf16 server (`tunegate serve --engine vllm`): every token of the fp32 PEFT
# reference's greedy answer must be within vLLM's top 3, teacher-forced. Measured on SmolLM2-135M-Instruct with
# two LoRA adapters, 4 golden canaries x 16 tokens: 7 of 12 answers exact; where they part, the reference token
# ranked 2 or 3 at one or two positions and 1 everywhere else (bf16 vs fp32 near-ties). fp32 vLLM
# (the -m vllm test, tiny model): all exact, rank 1. bench/results/serve_smoke_vllm_bf16.json has the ranks.
BF16_MAX_RANK = 3


def canary_prompts(project, n: int = 4) -> list[list[dict[str, str]]]:
    """The first `n` prompts of the project's golden set, as chat messages (the reference answer left out).

    Raises:
        TunegateError: the golden set is missing or has no usable row.
    """
    from tunegate.data.records import read_source

    records, _ = read_source(project.data.golden, role="golden")
    out = []
    for rec in records:
        if "messages" in rec:
            msgs = rec["messages"][:-1] if rec["messages"][-1]["role"] == "assistant" else rec["messages"]
        elif "prompt" in rec:
            msgs = [{"role": "user", "content": rec["prompt"]}]
        else:
            continue
        if msgs and msgs[-1]["role"] == "user":
            out.append(msgs)
        if len(out) == n:
            break
    if not out:
        raise TunegateError(f"{project.data.golden.path}: no chat or prompt rows to use as canary prompts")
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def smoke_test(ask, reference, models: list[str | None], canaries: list[list[dict[str, str]]], tokenizer,
               base_served: bool = True, max_tokens: int = 16, match_tokens: int | None = None,
               ranks=None, max_rank: int | None = None) -> dict[str, Any]:
    """Case C17: greedy canaries through the server against the PEFT reference.

    Args:
        ask: (model or None for the base model, messages, max_tokens) -> the server's greedy answer text.
        reference: the same signature, answered in-process by transformers + PEFT (EmbeddedEngine).
        models: None (the base model) and/or adapter names to check.
        tokenizer: the base model's tokenizer (token-level comparison and the report).
        base_served: the server serves the base model (False in the merged-model mode: "differs from the
            base" is then checked against the reference base model).
        match_tokens: None: exact string match; K: the first K tokens must match (bf16 vs fp32).
        ranks: (model or None, messages, reference answer) -> the rank (1 = the served model's top token) of
            each reference token under the served model, teacher-forced on the reference's own prefix (vLLM's
            prompt_logprobs). With `max_rank`, an answer that is not an exact match still passes when every
            reference token ranks <= max_rank: greedy decoding in bf16 and in fp32 part ways at near-ties, and
            after that the texts are no longer comparable, while the per-token ranks still are.

    Returns:
        The report: per model and canary, the served and reference answers, whether they match exactly and
        the length of their common token prefix; `passed` and `failures` (one line per failure, naming the
        adapter and the prompt).
    """
    started = time.perf_counter()
    tok = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    rows: dict[str, list[dict[str, Any]]] = {}
    base_answers = None
    check = ([None] if base_served and None not in models else []) + list(models)
    for m in check:
        label = m or "(base model)"
        rows[label] = []
        for msgs in canaries:
            served = ask(m, msgs, max_tokens) if (m is not None or base_served) else None
            ref = reference(m, msgs, max_tokens)
            s_ids, r_ids = tok(served or ""), tok(ref)
            row = {"prompt": msgs[-1]["content"], "served": served, "reference": ref, "exact": served == ref,
                   "prefix_tokens": _common_prefix(s_ids, r_ids), "reference_tokens": len(r_ids), "served_tokens": len(s_ids)}
            if ranks is not None and served is not None:
                rs_ = ranks(m, msgs, ref)
                row["reference_token_ranks"] = rs_
                row["max_rank"] = max(rs_, default=1)
            rows[label].append(row)
        if m is None:
            base_answers = [r["served"] for r in rows[label]]
    if base_answers is None:  # merged-model mode: the base model's answers come from the reference
        base_answers = [reference(None, msgs, max_tokens) for msgs in canaries]
    failures = []
    models_out: dict[str, dict[str, Any]] = {}
    for label, rs in rows.items():
        for r in rs:
            if r["served"] is None:
                continue
            k = min(match_tokens, r["reference_tokens"]) if match_tokens else None
            ok = r["exact"] or (k is not None and r["prefix_tokens"] >= k)
            ok = ok or (max_rank is not None and r.get("max_rank") is not None and r["max_rank"] <= max_rank)
            r["matches_reference"] = ok
            if not ok:
                rule = (f"{k} required" if k is not None else "exact match required") + (
                    f"; teacher-forced, the reference's worst token ranks {r['max_rank']} (<= {max_rank} required)"
                    if max_rank is not None and r.get("max_rank") is not None else "")
                failures.append(f"{label}: prompt {r['prompt'][:80]!r}: served {r['served']!r} != PEFT reference "
                                f"{r['reference']!r} (common prefix {r['prefix_tokens']}/{r['reference_tokens']} tokens, {rule})")
        differs = None
        if label != "(base model)":
            differs = any(r["served"] is not None and r["served"] != b for r, b in zip(rs, base_answers))
            if not differs:
                failures.append(f"{label}: answers exactly like the base model on all {len(rs)} canary prompts "
                                f"(first: {rs[0]['prompt'][:80]!r}): the server does not apply this adapter (case C17)")
        models_out[label] = {"differs_from_base": differs, "rows": rs}
    return {"passed": not failures, "failures": failures, "canaries": len(canaries), "max_tokens": max_tokens,
            "match_rule": "exact string" + (f", or the first {match_tokens} tokens" if match_tokens else "")
            + (f", or every reference token within the served model's top {max_rank} (teacher-forced)" if max_rank else ""),
            "models": models_out, "wall_s": round(time.perf_counter() - started, 2)}


def run_smoke(project, url: str, models: list[str | None], api_key: str | None = None, base_served: bool = True,
              n_canaries: int = 4, max_tokens: int = 16, match_tokens: int | None = None,
              base_name: str | None = None, max_rank: int | None = None) -> dict[str, Any]:
    """`smoke_test` against an OpenAI-compatible server at `url` (vLLM itself, or tunegate's proxy with a key
    granted every model), with the reference loaded in-process from the project's bundles. `max_rank` needs
    vLLM itself at `url` (its /v1/completions with prompt_logprobs; tunegate's proxy has no such endpoint).

    Raises:
        TunegateError: a bundle is refused while loading the reference.
    """
    import httpx

    base_name = base_name or base_model_name(project)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url, timeout=600.0, headers=headers)
    reference_engine = EmbeddedEngine.load(project)
    try:
        def ask(model, msgs, max_new):
            r = client.post("/chat/completions", json={"model": model or base_name, "messages": msgs,
                                                       "max_tokens": max_new, "temperature": 0})
            if r.status_code != 200:
                raise TunegateError(f"smoke test: {model or base_name}: HTTP {r.status_code}: {r.text[:300]}")
            return r.json()["choices"][0]["message"]["content"] or ""

        reference_ids: dict[tuple[str | None, str], list[int]] = {}  # the reference's own token ids, not re-encoded

        def reference(model, msgs, max_new):
            out = reference_engine.complete(model, msgs, max_new, temperature=0)
            reference_ids[(model, json.dumps(msgs))] = out.token_ids or []
            return out.text

        tok = reference_engine.tokenizer

        def ranks(model, msgs, ref_text):
            prompt = list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
            answer = reference_ids.get((model, json.dumps(msgs)))
            if answer is None:
                answer = tok(ref_text, add_special_tokens=False)["input_ids"]
            if not answer:
                return []
            r = client.post("/completions", json={"model": model or base_name, "prompt": prompt + answer, "max_tokens": 1,
                                                  "temperature": 0, "prompt_logprobs": 1})
            if r.status_code != 200:
                raise TunegateError(f"smoke test: {model or base_name}: teacher-forced scoring: HTTP {r.status_code}: {r.text[:300]}")
            per_pos = r.json()["choices"][0]["prompt_logprobs"]  # one {token_id: {logprob, rank, ...}} per prompt token
            return [int(per_pos[len(prompt) + i][str(t)]["rank"]) for i, t in enumerate(answer)]

        return smoke_test(ask, reference, models, canary_prompts(project, n_canaries), tok, base_served, max_tokens,
                          match_tokens, ranks if max_rank is not None else None, max_rank)
    finally:
        client.close()


def format_smoke(report: dict[str, Any]) -> str:
    """A short human summary of a smoke report."""
    lines = [(f"smoke test (C17): {report['canaries']} canary prompts, greedy, max_tokens {report['max_tokens']}, "
              f"match rule: {report['match_rule']}: {'PASS' if report['passed'] else 'FAIL'} ({report['wall_s']} s)")]
    for label, m in report["models"].items():
        rs = m["rows"]
        exact = sum(1 for r in rs if r["exact"])
        prefix = min((r["prefix_tokens"] for r in rs), default=0)
        diff = "" if m["differs_from_base"] is None else f"; differs from base: {m['differs_from_base']}"
        worst = max((r["max_rank"] for r in rs if r.get("max_rank") is not None), default=None)
        rank = "" if worst is None else f"; worst teacher-forced rank of a reference token {worst}"
        lines.append(f"  {label}: {exact}/{len(rs)} exact; shortest common prefix {prefix} tokens{rank}{diff}")
    lines += [f"  FAIL {f}" for f in report["failures"]]
    return "\n".join(lines)

