"""The base model's tool calling, zero-shot, on examples/bfcl's golden set, by BFCL category.

Data: ../shared/data/bfcl read as examples/bfcl/tunegate.yaml reads its golden set (format bfcl, the 20% of ids
held out: 209 rows); never committed, read in place. Prompts are rendered as the eval stage renders them
(`evals.answer.golden_prompts`: SmolLM2's template has no tool support, so tunegate's fallback puts the schemas
in the system message), answered greedily by the embedded SmolLM2-135M-Instruct on the CPU, and scored with the
row metric `tool_call` (tunegate.evals.toolcall).

Measures: tool_call accuracy overall and per category; per category, how many answers hold a readable call and
how many hold a `<tool_call>` block that does not parse; generation wall time.

    nice -n 10 python bench/bfcl_zero_shot.py --max-new-tokens 160   # writes bench/results/bfcl_zero_shot.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bfcl_zero_shot.json")
    args = ap.parse_args()

    from tunegate.config import load_project
    from tunegate.data.records import read_source, reference_answer
    from tunegate.evals.answer import golden_prompts
    from tunegate.evals.generate import generate
    from tunegate.evals.toolcall import CallParseError, parse_calls, tool_call
    from tunegate.models import load_model, load_tokenizer, resolve_base_model

    project = load_project(REPO / "examples" / "bfcl" / "tunegate.yaml")
    if not Path(project.data.golden.path).is_dir():
        raise SystemExit(f"{project.data.golden.path} not found: the shared datasets folder (../shared/data) is absent")
    golden, _ = read_source(project.data.golden, role="golden")
    base = resolve_base_model(project.base_model, progress=False)
    tokenizer, model = load_tokenizer(base), load_model(base).eval()
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    answers = generate(model, tokenizer, golden_prompts(tokenizer, golden), args.max_new_tokens, 8, desc="base model")
    wall = time.perf_counter() - t0

    scores, with_calls, unreadable = defaultdict(list), defaultdict(int), defaultdict(int)
    for row, answer in zip(golden, answers):
        category = row["meta"]["category"]
        scores[category].append(tool_call(answer, reference_answer(row)))
        try:
            with_calls[category] += bool(parse_calls(answer))
        except CallParseError:
            unreadable[category] += 1
    result = {
        "model": project.base_model, "rows": len(golden), "max_new_tokens": args.max_new_tokens,
        "generation_wall_s": round(wall, 1), "load_average_before": load_before,
        "tool_call": round(sum(map(sum, scores.values())) / len(golden), 4),
        "by_category": {c: {"rows": len(v), "tool_call": round(sum(v) / len(v), 4), "answers_with_calls": with_calls[c],
                            "unreadable_tool_call": unreadable[c]} for c, v in sorted(scores.items())},
        "examples": [{"id": r["id"], "answer": a[:300]} for r, a in list(zip(golden, answers))[::40]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
