"""Eval generation throughput: tunegate's batched greedy generation against a plain per-example loop.

Both paths run in one process on the same prompts with the same model (embedded SmolLM2-135M-Instruct,
fp32 on this machine's CPU), the same greedy settings, stop tokens (end-of-turn and eos) and
max_new_tokens:

- "tunegate": `tunegate.evals.generate.generate` (length-sorted batches, left padding, KV cache);
- "per_example": `model.generate` once per prompt, batch size 1, no padding.

Generated tokens are counted exactly from the returned ids: per row, the new tokens up to and including
the first stop token (or max_new_tokens when none), never padding. The batched path's ids are taken from
the `model.generate` calls that tunegate's `generate` makes (a thin recording wrapper around the model).
Both paths' decoded texts are compared per prompt; greedy decoding with left padding can differ from
batch size 1 in float rounding, so the fraction of identical texts is reported, not required to be 1.

The shared-prefix part (`shared_prefix` in the JSON) times the audit's label-list prompt on banking77 (the
audit's wording: the instruction, then "Answer with exactly one of these labels and nothing else:" and the 77
labels, as a system turn; the customer message as the user turn) through `generate` twice, in the same run: with
the shared prefix computed once (the default) and with sharing off (`share_prefix=False`).
It needs ../shared/data/banking77; without it that part is skipped and says so.

With `--adapter DIR` (a trained adapter of the embedded model, e.g. the quickstart's
examples/quickstart/runs/default/train/adapter) the same prompts are answered three ways, each a fresh model in
the same run: PEFT's own forward, unmerged (as the embedded server, the audit's probe and the merge check ran it
before issue 24), tunegate's lean forward, unmerged (recipes.lean_adapter: a DoRA weight norm kept while nothing
trains), and the adapter merged into the weights (what the eval gate answers with).

    python bench/eval_throughput.py                     # 64 quickstart golden prompts, batch 16, 64 new tokens
    python bench/eval_throughput.py --prompts ifeval --n 32 --out bench/results/eval_throughput_ifeval.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IFEVAL = REPO.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
TARGET_SPEEDUP = 15.0  # issue 24: >= 15x the per-example loop at batch 16 (issue 12 asked 4x)
TARGET_BATCH = 16
TARGET_PREFIX_SPEEDUP = 3.0  # issue 24: the shared-prefix audit prompt >= 3x faster than without sharing


def quickstart_prompts(tok, n: int) -> tuple[list[str], str]:
    """The first n golden prompts of examples/quickstart, rendered as the eval stage renders them."""
    from tunegate.config import load_project
    from tunegate.data.format import (
        apply_system_policy,
        generation_prompt,
        supports_system_role,
    )
    from tunegate.data.records import read_source

    project = load_project(REPO / "examples" / "quickstart" / "tunegate.yaml")
    golden, rejected = read_source(project.data.golden, role="golden")
    if rejected:
        raise SystemExit(f"{project.data.golden.path}: {rejected[0]}")
    has_system = supports_system_role(tok)
    prompts = []
    for rec in golden[:n]:
        if "messages" in rec:  # the data stage's system-role policy, as in runs/<id>/data/golden.jsonl
            rec["messages"] = apply_system_policy(rec["messages"], project.data.system_role, has_system)
        prompts.append(generation_prompt(tok, rec))
    return prompts, str(Path(project.data.golden.path).relative_to(REPO))


def ifeval_prompts(tok, n: int) -> tuple[list[str], str]:
    """The first n IFEval prompts as single user turns through the chat template."""
    from tunegate.data.format import generation_prompt

    if not IFEVAL.is_file():
        raise SystemExit(f"{IFEVAL}: not found (--prompts ifeval needs ../shared/data/ifeval)")
    prompts = []
    with open(IFEVAL, encoding="utf-8") as f:
        for line in f:
            if len(prompts) == n:
                break
            if line.strip():
                msgs = [{"role": "user", "content": json.loads(line)["prompt"]}, {"role": "assistant", "content": ""}]
                prompts.append(generation_prompt(tok, {"messages": msgs}))
    return prompts, "ifeval/input_data.jsonl"


def count_new(new_ids, stop: set[int]) -> int:
    """Generated tokens of one row: up to and including the first stop token; padding after it is not counted."""
    ids = new_ids.tolist()
    for k, t in enumerate(ids):
        if t in stop:
            return k + 1
    return len(ids)


def banking77_label_prompts(tok, n: int) -> list[str] | None:
    """The first n banking77 test messages under the audit's label-list instruction (the wording of
    stages.audit._label_instruction, with the example's instruction as its lead), rendered as the audit renders
    them (stages.audit.chat_prompt); None without ../shared/data/banking77."""
    import csv

    from tunegate.data.format import supports_system_role
    from tunegate.stages.audit import chat_prompt

    if not (BANKING77 / "test.csv").is_file():
        return None
    labels = json.loads((BANKING77 / "categories.json").read_text(encoding="utf-8"))
    instruction = f"Banking intent label? Answer with exactly one of these labels and nothing else: {', '.join(labels)}."
    with open(BANKING77 / "test.csv", newline="", encoding="utf-8") as f:
        texts = [row["text"] for _, row in zip(range(n), csv.DictReader(f))]
    return [chat_prompt(tok, supports_system_role(tok), instruction, [], t) for t in texts]


def shared_prefix_bench(model, tok, n: int, batch_size: int, max_new_tokens: int) -> dict:
    """The banking77 label-list prompts through `generate` with the shared prefix computed once and without:
    seconds each, the speedup, and how many answers are identical."""
    import tunegate.evals.generate as gen

    prompts = banking77_label_prompts(tok, n)
    if prompts is None:
        return {"skipped": f"{BANKING77} not found"}
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    timed = {}
    for name, share in (("without_sharing", False), ("shared_prefix", True)):
        t0 = time.perf_counter()
        text = gen.generate(model, tok, prompts, max_new_tokens, batch_size, desc=f"banking77 labels, {name}", share_prefix=share)
        timed[name] = (time.perf_counter() - t0, text)
    speedup = timed["without_sharing"][0] / timed["shared_prefix"][0]
    same = sum(a == b for a, b in zip(timed["without_sharing"][1], timed["shared_prefix"][1]))
    return {
        "prompts": "banking77/test.csv under the audit's 77-label instruction",
        "n_prompts": len(prompts),
        "prompt_tokens_mean": round(sum(map(len, encoded)) / len(encoded), 1),
        "shared_prefix_tokens": gen.shared_prefix_length(encoded),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "seconds": {name: round(t, 2) for name, (t, _) in timed.items()},
        "speedup": round(speedup, 2),
        "target": {"speedup_min": TARGET_PREFIX_SPEEDUP},
        "target_met": bool(speedup >= TARGET_PREFIX_SPEEDUP),
        "identical_answers": f"{same}/{len(prompts)}",
    }


def adapter_bench(base, tok, prompts: list[str], adapter_dir: Path, batch_size: int, max_new_tokens: int) -> dict:
    """Seconds to answer `prompts` with the adapter through PEFT's forward, the lean forward and merged weights,
    and how many answers each shares with PEFT's."""
    from peft import PeftModel

    from tunegate.evals.generate import generate
    from tunegate.models import fit_to_adapter, load_model
    from tunegate.recipes.lean_adapter import use_lean_forward

    def loaded():
        return PeftModel.from_pretrained(fit_to_adapter(load_model(base), adapter_dir), str(adapter_dir)).eval()

    lean = loaded()
    use_lean_forward(lean)
    systems = {"peft_unmerged": loaded(), "lean_unmerged": lean, "merged": loaded().merge_and_unload().eval()}
    timed = {}
    for name, model in systems.items():
        generate(model, tok, prompts[:2], 2, 2, desc=f"warm-up {name}")
        t0 = time.perf_counter()
        timed[name] = (generate(model, tok, prompts, max_new_tokens, batch_size, desc=f"adapter, {name}"), time.perf_counter() - t0)
    reference = timed["peft_unmerged"][0]
    return {
        "adapter": str(adapter_dir.resolve().relative_to(REPO)) if adapter_dir.resolve().is_relative_to(REPO) else str(adapter_dir),
        "dora": any("lora_magnitude_vector" in n for n, _ in systems["peft_unmerged"].named_parameters()),
        "n_prompts": len(prompts),
        "seconds": {name: round(t, 2) for name, (_, t) in timed.items()},
        "lean_speedup_vs_peft": round(timed["peft_unmerged"][1] / timed["lean_unmerged"][1], 2),
        "identical_to_peft": {name: f"{sum(a == b for a, b in zip(out, reference))}/{len(prompts)}" for name, (out, _) in timed.items()},
    }


class RecordingModel:
    """Delegates to the model and keeps what each `generate` call returned, so the batched path's tokens are counted
    from the same ids tunegate decoded."""

    def __init__(self, model):
        self._model = model
        self.calls: list[tuple[int, object]] = []  # (padded prompt length, output ids)

    def eval(self):
        self._model.eval()
        return self

    def __call__(self, *args, **kwargs):  # the shared prefix's forward pass
        return self._model(*args, **kwargs)

    def generate(self, **kwargs):
        out = self._model.generate(**kwargs)
        self.calls.append((kwargs["input_ids"].shape[1], out))
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", choices=("quickstart", "ifeval"), default="quickstart")
    ap.add_argument("--n", type=int, default=64, help="number of prompts (the first n)")
    ap.add_argument("--batch-size", type=int, default=TARGET_BATCH)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's weights for both paths "
                    "(the pipeline generates in fp32; bf16 measures what native-bf16 CPUs would gain, and how many answers change)")
    ap.add_argument("--adapter", type=Path, default=None, help="a trained adapter of the embedded model: also time "
                    "it through PEFT's forward, the lean forward and merged")
    ap.add_argument("--prefix-n", type=int, default=64, help="banking77 prompts for the shared-prefix part (0: skip it)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); "
                    "on a machine shared with other jobs, fewer threads than cores avoids waiting on a descheduled one")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval_throughput.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers.utils import logging as hf_logging

    from tunegate.data.format import end_token_id
    from tunegate.evals.generate import generate
    from tunegate.models import load_model, load_tokenizer, resolve_base_model

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    base = resolve_base_model("smollm2-135m-instruct")
    tok = load_tokenizer(base)
    prompts, source = (ifeval_prompts if args.prompts == "ifeval" else quickstart_prompts)(tok, args.n)
    model = load_model(base, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    model.eval()
    stop_ids = sorted({end_token_id(tok), tok.eos_token_id})
    stop = set(stop_ids)
    greedy = {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": stop_ids}

    def one(prompt: str, max_new_tokens: int):
        enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**enc, **greedy, max_new_tokens=max_new_tokens)
        return out[0, enc["input_ids"].shape[1]:]

    with torch.inference_mode():
        one(prompts[0], 4)  # warm-up: first-call allocations and lazy initialisation count for neither path

        t0 = time.perf_counter()
        loop_text, loop_tokens = [], 0
        for p in prompts:
            new = one(p, args.max_new_tokens)
            loop_tokens += count_new(new, stop)
            loop_text.append(tok.decode(new, skip_special_tokens=True))
        loop_s = time.perf_counter() - t0

    recorder = RecordingModel(model)
    t0 = time.perf_counter()
    batch_text = generate(recorder, tok, prompts, args.max_new_tokens, args.batch_size, desc="tunegate batched")
    batch_s = time.perf_counter() - t0
    batch_tokens = sum(count_new(row[plen:], stop) for plen, out in recorder.calls for row in out)

    with torch.inference_mode():
        prefix = (shared_prefix_bench(model, tok, args.prefix_n, args.batch_size, 16) if args.prefix_n
                  else {"skipped": "--prefix-n 0"})

    # loaded outside inference_mode, as the pipeline loads them (weights made under it keep no version counter)
    adapter = (adapter_bench(base, tok, prompts, args.adapter, args.batch_size, args.max_new_tokens) if args.adapter
               else {"skipped": "no --adapter"})
    same = [a == b for a, b in zip(loop_text, batch_text)]
    differing = [i for i, s in enumerate(same) if not s]

    def result(tokens: int, seconds: float, batch_size: int, calls: int) -> dict:
        return {"batch_size": batch_size, "generate_calls": calls, "tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1)}

    per_example = result(loop_tokens, loop_s, 1, len(prompts))
    batched = result(batch_tokens, batch_s, args.batch_size, len(recorder.calls))
    # speedup in generated tokens per second (the two paths may generate slightly different token counts)
    speedup = batched["tokens_per_s"] / per_example["tokens_per_s"]
    out = {
        "bench": "eval_throughput",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "prompts": source,
        "n_prompts": len(prompts),
        "prompt_tokens_mean": round(sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts), 1),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "model": f"smollm2-135m-instruct ({args.dtype})",
        "device": "cpu",
        "results": {"per_example": per_example, "tunegate": batched},
        "speedup": round(speedup, 2),
        "target": {"speedup_min": TARGET_SPEEDUP, "at_batch_size": TARGET_BATCH},
        "target_met": bool(speedup >= TARGET_SPEEDUP) if args.batch_size == TARGET_BATCH else None,
        "identical_text_fraction": round(sum(same) / len(same), 3),
        "differing_prompt_indices": differing[:20],
        "shared_prefix": prefix,
        "adapter": adapter,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(
        f"\n{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}: per-example {per_example['tokens_per_s']} tokens/s, "
        f"tunegate batch {args.batch_size} {batched['tokens_per_s']} tokens/s: speedup {speedup:.2f}x "
        f"(target >= {TARGET_SPEEDUP:g}x at batch {TARGET_BATCH}); identical texts {sum(same)}/{len(same)}"
    )
    if "speedup" in prefix:
        print(f"shared prefix ({prefix['shared_prefix_tokens']} of {prefix['prompt_tokens_mean']} tokens): "
              f"{prefix['seconds']['without_sharing']} s -> {prefix['seconds']['shared_prefix']} s, {prefix['speedup']}x "
              f"(target >= {TARGET_PREFIX_SPEEDUP:g}x); identical answers {prefix['identical_answers']}")
    if "seconds" in adapter:
        print(f"adapter ({'DoRA' if adapter['dora'] else 'LoRA'}): {adapter['seconds']}; lean vs PEFT "
              f"{adapter['lean_speedup_vs_peft']}x; identical to PEFT's answers {adapter['identical_to_peft']}")


if __name__ == "__main__":
    main()
