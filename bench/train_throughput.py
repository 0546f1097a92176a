"""Train throughput: tunegate's SFT LoRA path against a plain TRL SFTTrainer with default settings.

Both runs use the same base model (embedded SmolLM2-135M-Instruct), the same tokenized rows (banking77
train, or the quickstart data when ../shared/data is absent), the same LoRA adapter (r=16, alpha=32, all
linear layers) and batch size, on this machine's CPU, in one process. Writes JSON:

    python bench/train_throughput.py --steps 12 --out bench/results/train_throughput.json

"plain TRL" = `SFTTrainer` with `SFTConfig` defaults (activation checkpointing on, its fused LM head that
scores every position in fp32 off Triton devices) and LoRA dropout 0.05 as in PEFT's examples; bf16 and
use_cpu are set from the device, since TRL's bf16 default fails on a CPU otherwise.

MFU (model FLOPs utilisation, Chowdhery et al. 2022): achieved FLOP/s / the matmul peak measured here.
Achieved = tunegate.preflight.train_flops(N, N_a, tokens, full=False) / wall seconds = (4·N·D + 6·N_a·D) /
wall, with N the base model's parameters, N_a the adapter's, D the non-padding tokens processed. The peak is
`tunegate.preflight.measure_matmul_peak` (torch.matmul, 1024x1024, this process's threads) in the precision
the runs used (bf16 under bf16 autocast, else fp32); both are recorded under `matmul_peak_flops`. Model
FLOPs, not hardware FLOPs: recomputation (plain TRL's activation checkpointing), padding and tunegate's
skipped LM-head rows are not counted, so the two runs' MFU ratio equals their tokens/s ratio.
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


def rows(n: int):
    path = REPO.parent / "shared" / "data" / "banking77" / "train.csv"
    if path.is_file():
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunegate.data.format import encode_chat
    from tunegate.models import bf16_supported, load_model, load_tokenizer, resolve_base_model
    from tunegate.preflight import measure_matmul_peak, train_flops
    from tunegate.recipes.sft import trainer_class as _trainer_class

    base = resolve_base_model("smollm2-135m-instruct")
    tok = load_tokenizer(base)
    data, source = rows(args.steps * args.batch_size)
    cols = {"input_ids": [], "labels": []}
    for text, label in data:
        enc = encode_chat(tok, [{"role": "system", "content": "Banking intent label?"},
                                {"role": "user", "content": text}, {"role": "assistant", "content": label}])
        cols["input_ids"].append(enc.input_ids)
        cols["labels"].append(enc.labels)
    ds = Dataset.from_dict(cols)
    bf16 = bf16_supported()
    peaks = {"float32": measure_matmul_peak(dtype="float32")}
    if bf16:
        peaks["bfloat16"] = measure_matmul_peak(dtype="bfloat16")
    peak_dtype = "bfloat16" if bf16 else "float32"
    common = dict(max_steps=args.steps, per_device_train_batch_size=args.batch_size, bf16=bf16,
                  use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", max_length=None,
                  include_num_input_tokens_seen="non_padding", disable_tqdm=True, logging_steps=args.steps,
                  train_sampling_strategy="sequential")

    def measure(name, trainer_cls, cfg_extra, dropout):
        torch.manual_seed(0)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
        cfg = SFTConfig(output_dir=f"/tmp/tunegate-bench-{name}", **common, **cfg_extra)
        trainer = trainer_cls(model=load_model(base), args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
        trainable, total = trainer.model.get_nb_trainable_parameters()  # total includes the adapter
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        tokens = trainer.state.num_input_tokens_seen
        achieved = train_flops(total - trainable, trainable, tokens, full=False) / wall
        return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                "s_per_step": round(wall / args.steps, 3), "base_params": total - trainable,
                "adapter_params": trainable, "achieved_flops": round(achieved), "mfu": round(achieved / peaks[peak_dtype], 4)}

    results = {
        "plain_trl": measure("trl", SFTTrainer, {}, 0.05),
        "tunegate": measure("tunegate", _trainer_class(), {"gradient_checkpointing": False}, 0.0),
    }
    speedup = results["tunegate"]["tokens_per_s"] / results["plain_trl"]["tokens_per_s"]
    out = {
        "bench": "train_throughput",
        "data": source,
        "rows": len(ds),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "matmul_peak_flops": {k: round(v) for k, v in peaks.items()},
        "mfu_peak": peak_dtype,  # the matmul_peak_flops entry each run's mfu divides by
        "results": results,
        "speedup": round(speedup, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
