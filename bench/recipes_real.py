"""Acceptance runs of the training recipes on the real base model and real data (issue: training methods).

Each run is a tunegate project written into a work folder and run through the pipeline up to the train
stage, on the embedded SmolLM2-135M-Instruct, on this machine's CPU:

    dpo   Anthropic HH-RLHF helpful-base pairs: DPO's first logged loss must be ln 2 = 0.693 (within 1e-3)
          and the reward margin must rise over the run
    grpo  arithmetic from GSM8K's calculator annotations ("<<48/2=24>>" -> "What is 48 / 2?"), numeric
          verifier: mean reward on held-out prompts (greedy) before and after
    cpt   the SQuAD/XQuAD English contexts as raw text: held-out perplexity before and after
    kto, orpo   the same HH-RLHF pairs: train without error (finite losses)

    python bench/recipes_real.py [--only dpo,grpo] [--out bench/results/recipes_real.json]

Results are written after each recipe (a rerun skips the recipes already in the file unless --only).
Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def project(folder: Path, train_fmt: str, train_yaml: str, extra: str = "") -> Path:
    (folder / "tunegate.yaml").write_text(f"""
name: {folder.name}
base_model: smollm2-135m-instruct
data:
  sources: [{{path: train.jsonl, format: {train_fmt}}}]
  golden: {{path: golden.jsonl, format: chat}}
  val_fraction: 0.1
  max_length: 384
  decontaminate: null
train:
{train_yaml}
eval:
  metrics: [token_f1]
  gate: [{{metric: token_f1, max_regression: 0.05}}]
audit: {{enabled: false}}
{extra}""")
    return folder / "tunegate.yaml"


def hh_pairs(n: int, max_chars: int = 600) -> list[dict]:
    """Short helpful-base pairs (transcripts under max_chars), in file order."""
    rows = []
    for line in open(SHARED / "hh_rlhf" / "helpful_base_test_first2000.jsonl", encoding="utf-8"):
        r = json.loads(line)
        if len(r["chosen"]) < max_chars and len(r["rejected"]) < max_chars:
            rows.append({"id": f"hh{len(rows)}", **r})
        if len(rows) == n:
            break
    return rows


def golden_from_pairs(pairs: list[dict]) -> list[dict]:
    from tunegate.data.records import parse_hh_transcript

    return [{"id": f"g-{p['id']}", "messages": parse_hh_transcript(p["chosen"])} for p in pairs]


def run_until_train(path: Path) -> dict:
    from tunegate.config import load_project
    from tunegate.pipeline import run_pipeline

    t0 = time.perf_counter()
    summary = run_pipeline(load_project(path), until="train")["train"].metrics
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary


def logged(path: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (path.parent / "runs/default/train/metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def dpo(work: Path) -> dict:
    pairs = hh_pairs(460)
    folder = work / "dpo"
    jsonl(folder / "train.jsonl", pairs[:400])
    jsonl(folder / "golden.jsonl", golden_from_pairs(pairs[400:]))  # unused here: the run stops after training
    path = project(folder, "preference", """
  method: dpo
  trl: {max_steps: 40, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 100, warmup_steps: 4, eval_steps: 40}
""")
    s = run_until_train(path)
    margins = [m for _, m in logged(path, "rewards/margins")]
    third = max(len(margins) // 3, 1)
    evals = logged(path, "eval_rewards/margins")
    return {
        "pairs": s["pairs"], "steps": s["steps"], "wall_s": s["wall_s"],
        "first_loss": s["first_loss"], "ln2": math.log(2), "first_loss_minus_ln2": s["first_loss"] - math.log(2),
        "first_reward_margin": s["first_reward_margin"],
        "mean_margin_first_third": sum(margins[:third]) / third, "mean_margin_last_third": sum(margins[-third:]) / third,
        "eval_reward_margin_end": evals[-1][1] if evals else None,
        "eval_reward_accuracy_end": (logged(path, "eval_rewards/accuracies") or [(None, None)])[-1][1],
        "final_train_loss": s["final_train_loss"],
    }


def arithmetic_rows() -> list[dict]:
    """"What is a op b?" from GSM8K calculator annotations with small integer operands and results."""
    pat = re.compile(r"<<(\d{1,2}) ?([+\-*]) ?(\d{1,2})=(\d+)>>")
    seen, rows = set(), []
    for split in ("train", "test"):
        for line in open(SHARED / "gsm8k" / f"{split}.jsonl", encoding="utf-8"):
            for a, op, b, c in pat.findall(json.loads(line)["answer"]):
                key = (a, op, b)
                if key in seen or int(c) > 200:
                    continue
                seen.add(key)
                rows.append({"id": f"ar{len(rows)}", "messages": [
                    {"role": "user", "content": f"What is {a} {op} {b}? Give the number."},
                    {"role": "assistant", "content": c}]})
    random.Random(0).shuffle(rows)
    return rows


def grpo(work: Path) -> dict:
    rows = arithmetic_rows()
    folder = work / "grpo"
    jsonl(folder / "train.jsonl", rows[:1000])
    jsonl(folder / "golden.jsonl", rows[1000:1050])
    path = project(folder, "chat", """
  method: grpo
  grpo: {verifier: numeric}
  trl: {max_steps: 80, per_device_train_batch_size: 16, num_generations: 8, max_completion_length: 16, learning_rate: 2.0e-5, logging_steps: 1, save_steps: 200, warmup_steps: 0, temperature: 1.0}
""")
    s = run_until_train(path)
    rewards = [r for _, r in logged(path, "reward")]
    zero = [z for _, z in logged(path, "frac_reward_zero_std")]
    q = max(len(rewards) // 4, 1)
    return {
        "train_prompts": s["train_rows"], "heldout_prompts": s["val_rows"], "steps": s["steps"], "wall_s": s["wall_s"],
        "smoke": s["smoke"], "heldout_reward_before": s["heldout_reward_before"], "heldout_reward_after": s["heldout_reward_after"],
        "train_reward_first_quarter": sum(rewards[:q]) / q, "train_reward_last_quarter": sum(rewards[-q:]) / q,
        "mean_frac_reward_zero_std": sum(zero) / len(zero) if zero else None,
        "zero_variance_warnings_at_steps": s["zero_variance_warnings_at_steps"],
    }


def cpt(work: Path) -> dict:
    data = json.loads((SHARED / "squad_xquad_en" / "xquad.en.json").read_text(encoding="utf-8"))["data"]
    texts, golden = [], []
    for a, art in enumerate(data):
        for p, para in enumerate(art["paragraphs"]):
            texts.append({"id": f"c{a}-{p}", "text": para["context"]})
            qa = para["qas"][0]
            golden.append({"id": f"q{a}-{p}", "messages": [{"role": "user", "content": qa["question"]},
                                                          {"role": "assistant", "content": qa["answers"][0]["text"]}]})
    folder = work / "cpt"
    jsonl(folder / "train.jsonl", texts)
    jsonl(folder / "golden.jsonl", golden[:40])
    path = project(folder, "text", """
  method: cpt
  trl: {num_train_epochs: 2, per_device_train_batch_size: 8, logging_steps: 2, save_steps: 200, warmup_steps: 2, eval_steps: 1000}
""")
    s = run_until_train(path)
    return {"texts": s["texts"], "heldout_texts": s["val_rows"], "blocks": s["blocks"], "block_tokens": s["block_tokens"],
            "steps": s["steps"], "wall_s": s["wall_s"], "perplexity_before": s["perplexity_before"],
            "perplexity_after": s["perplexity_after"], "final_train_loss": s["final_train_loss"]}


def kto_or_orpo(work: Path, method: str) -> dict:
    pairs = hh_pairs(120)
    folder = work / method
    jsonl(folder / "train.jsonl", pairs[:100])
    jsonl(folder / "golden.jsonl", golden_from_pairs(pairs[100:]))
    path = project(folder, "preference", f"""
  method: {method}
  trl: {{max_steps: 10, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 100, warmup_steps: 0, eval_steps: 10}}
""")
    s = run_until_train(path)
    losses = [x for _, x in logged(path, "loss")]
    return {"steps": s["steps"], "wall_s": s["wall_s"], "losses_finite": all(map(math.isfinite, losses)),
            "first_loss": losses[0], "final_train_loss": s["final_train_loss"],
            **({k: s[k] for k in ("desirable_rows", "undesirable_rows")} if method == "kto" else {"pairs": s["pairs"]})}


RECIPES = {"dpo": dpo, "grpo": grpo, "cpt": cpt, "kto": lambda w: kto_or_orpo(w, "kto"), "orpo": lambda w: kto_or_orpo(w, "orpo")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated recipes (default: all not yet in --out)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tunegate-recipes-real"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recipes_real.json")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} not found: these runs need the shared datasets")
    import torch

    results = json.loads(args.out.read_text()) if args.out.is_file() else {"bench": "recipes_real", "results": {}}
    results.update(threads=torch.get_num_threads(), base_model="smollm2-135m-instruct")
    todo = args.only.split(",") if args.only else [r for r in RECIPES if r not in results["results"]]
    for name in todo:
        print(f"=== {name}", flush=True)
        import shutil

        shutil.rmtree(args.work / name, ignore_errors=True)
        results["results"][name] = RECIPES[name](args.work)
        print(json.dumps(results["results"][name], indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
