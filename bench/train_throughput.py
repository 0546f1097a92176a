"""Train throughput: tunegate's SFT engine against a plain TRL SFTTrainer, and against tunegate's engine before
issue 24 (fp32 base under bf16 autocast, padded batches, PEFT's DoRA norm), on the same rows.

Same base model (embedded SmolLM2-135M-Instruct), same tokenized rows (banking77 train, or the quickstart data when
../shared/data is absent, or --data quickstart), same batch size and steps, this machine's CPU. Each configuration
runs in a subprocess of its own, so each reports its own peak RSS. Writes JSON:

    python bench/train_throughput.py --steps 12 --out bench/results/train_throughput.json

Configurations (adapter r=16, alpha=32, all linear layers):
- plain_trl: `SFTTrainer` with `SFTConfig` defaults (activation checkpointing on, its LM head over every position)
  and LoRA dropout 0.05 as in PEFT's examples; bf16 and use_cpu set from the device (TRL's bf16 default fails on a
  CPU otherwise). It is the baseline of every speed-up in the JSON, the DoRA ones included: TRL has no faster
  default to compare a DoRA adapter with, and DoRA costs more per step than LoRA.
- before_lora / before_dora: tunegate's trainer as of 13f67a5 (fp32 base weights under bf16 autocast, TRL's padding
  collator, supervised-only LM head, PEFT's DoRA forward).
- tunegate_lora / tunegate_dora: today's engine (models.train_precision: bf16 base weights where bf16 is native;
  recipes.sft.PackedCollator: padding-free; recipes.lean_adapter: factored DoRA norm, one-pass adapter output). tunegate_dora is the default adapter.

MFU (model FLOPs utilisation, Chowdhery et al. 2022): achieved FLOP/s / the matmul peak measured in the same run.
Achieved = tunegate.preflight.train_flops(N, N_a, tokens, full=False) / wall = (4·N·D + 6·N_a·D) / wall, with N
the base model's parameters, N_a the adapter's, D the non-padding tokens. The peak is the best of
`tunegate.preflight.measure_matmul_peak` over several shapes (square 1024 and 2048, and the model's own
(tokens x 576) x (576 x 1536)), each timed for 2 s, before and after the runs, in bf16 (the precision of the
matmuls under autocast) and fp32; every shape's figure is recorded. Model FLOPs, not hardware FLOPs: plain TRL's
recomputation and everyone's padding are not counted, so MFU ratios equal tokens/s ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rows(n: int, data: str = "banking77"):
    path = REPO.parent / "shared" / "data" / "banking77" / "train.csv"
    if data == "banking77" and path.is_file():
        data = [(r["text"], r["category"]) for r in csv.DictReader(open(path, encoding="utf-8"))]
        source = "banking77/train.csv"
    else:
        data = []
        for line in open(REPO / "examples/quickstart/data/train.jsonl", encoding="utf-8"):
            m = json.loads(line)["messages"]
            data.append((m[1]["content"], m[2]["content"]))
        source = "examples/quickstart/data/train.jsonl"
    random.Random(0).shuffle(data)
    return data[:n], source


CONFIGS = ("plain_trl", "before_lora", "before_dora", "tunegate_lora", "tunegate_dora")
PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (1024, 576, 1536), (4096, 576, 1536))


def matmul_peaks() -> dict[str, dict[str, float]]:
    """{dtype: {"MxKxN": FLOP/s}} for PEAK_SHAPES, each the best timed batch of ~2 s."""
    import torch

    from tunegate.preflight import measure_matmul_peak

    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = {}
        for m, k, n in PEAK_SHAPES:
            if m == k == n:
                out[dtype][f"{m}x{k}x{n}"] = measure_matmul_peak(dtype=dtype, n=m)
            else:  # the model's own shape: time it the same way
                a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
                best, t_end = 0.0, time.perf_counter() + 2.0
                with torch.inference_mode():
                    a @ b
                    while time.perf_counter() < t_end:
                        t0 = time.perf_counter()
                        for _ in range(4):
                            a @ b
                        best = max(best, 4 * 2.0 * m * k * n / (time.perf_counter() - t0))
                out[dtype][f"{m}x{k}x{n}"] = best
    return out


def run_one(name: str, steps: int, batch_size: int, data_name: str) -> dict:
    """Train `name` (CONFIGS) for `steps` steps in this process; its throughput, MFU inputs and peak RSS."""
    import resource

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunegate.data.format import encode_chat
    from tunegate.models import load_model, load_tokenizer, native_bf16, resolve_base_model, train_precision
    from tunegate.preflight import train_flops
    from tunegate.recipes.lean_adapter import use_lean_forward
    from tunegate.recipes.sft import PackedCollator, trainer_class

    base = resolve_base_model("smollm2-135m-instruct")
    tok = load_tokenizer(base)
    data, source = rows(steps * batch_size, data_name)
    cols = {"input_ids": [], "labels": []}
    for text, label in data:
        enc = encode_chat(tok, [{"role": "system", "content": "Banking intent label?"},
                                {"role": "user", "content": text}, {"role": "assistant", "content": label}])
        cols["input_ids"].append(enc.input_ids)
        cols["labels"].append(enc.labels)
    ds = Dataset.from_dict(cols)
    bf16 = native_bf16() is not None
    new = name.startswith("tunegate")
    dora = name.endswith("dora")
    base_dtype = torch.bfloat16 if new and train_precision(full=False)["base_weights"] == "bf16" else torch.float32
    cfg = SFTConfig(output_dir=f"/tmp/tunegate-bench-{name}", max_steps=steps, per_device_train_batch_size=batch_size,
                    bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", max_length=None,
                    include_num_input_tokens_seen="non_padding", disable_tqdm=True, logging_steps=steps,
                    train_sampling_strategy="sequential", **({} if name == "plain_trl" else {"gradient_checkpointing": False}))
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05 if name == "plain_trl" else 0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM", use_dora=dora)
    extra = {"data_collator": PackedCollator(tok.pad_token_id)} if new else {}
    cls = SFTTrainer if name == "plain_trl" else trainer_class()
    trainer = cls(model=load_model(base, dtype=base_dtype), args=cfg, train_dataset=ds, processing_class=tok,
                  peft_config=lora, **extra)
    if new:
        use_lean_forward(trainer.model)
    trainable, total = trainer.model.get_nb_trainable_parameters()  # total includes the adapter
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"data": source, "rows": len(ds), "wall_s": round(wall, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "s_per_step": round(wall / steps, 3), "base_params": total - trainable,
            "adapter_params": trainable, "achieved_flops": round(train_flops(total - trainable, trainable, tokens, full=False) / wall),
            "base_weights": str(base_dtype).replace("torch.", ""), "autocast": "bf16" if bf16 else None,
            "padding_free": new, "dora_norm": ("factored" if new else "peft") if dora else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data", choices=("banking77", "quickstart"), default="banking77")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.batch_size, args.data)), flush=True)
        return

    import subprocess
    import sys

    import torch

    from tunegate.models import native_bf16

    peaks_before = matmul_peaks()
    results = {}
    for name in args.configs.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch-size",
                            str(args.batch_size), "--data", args.data], capture_output=True, text=True, check=True)
        results[name] = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
        print(name, json.dumps(results[name]), flush=True)
    peaks_after = matmul_peaks()
    peaks = {d: {k: max(peaks_before[d][k], peaks_after[d][k]) for k in peaks_before[d]} for d in peaks_before}
    peak_dtype = "bfloat16" if native_bf16() else "float32"
    peak = max(peaks[peak_dtype].values())
    for r in results.values():
        r["mfu"] = round(r["achieved_flops"] / peak, 4)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = set(open("/proc/cpuinfo").read().split())
    out = {
        "bench": "train_throughput",
        "data": next(iter(results.values()))["data"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))),
        "matmul_peak_flops": {d: {k: round(v) for k, v in by.items()} for d, by in peaks.items()},
        "matmul_peak_flops_before_after": {"before": {d: round(max(v.values())) for d, v in peaks_before.items()},
                                           "after": {d: round(max(v.values())) for d, v in peaks_after.items()}},
        "mfu_peak": {"dtype": peak_dtype, "flops": round(peak)},  # the best shape's figure each mfu divides by
        "results": results,
    }
    if "plain_trl" in results:
        out["speedup_vs_plain_trl"] = {k: round(r["tokens_per_s"] / results["plain_trl"]["tokens_per_s"], 2)
                                       for k, r in results.items() if k != "plain_trl"}
    for kind in ("lora", "dora"):
        if f"before_{kind}" in results and f"tunegate_{kind}" in results:
            out.setdefault("speedup_vs_before", {})[kind] = round(
                results[f"tunegate_{kind}"]["tokens_per_s"] / results[f"before_{kind}"]["tokens_per_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
