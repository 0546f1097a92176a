"""Writes the gsm8k example's data from GSM8K (grade-school math word problems with worked solutions).

    data/train.jsonl  7,473 chat rows from GSM8K train
    data/test.jsonl   1,319 chat rows from GSM8K test (the golden set samples 200 of them)

A chat row is {"id": "train-0000", "messages": [system, user question, assistant solution]}; the
solution is GSM8K's rationale ending in "#### <number>", with the calculator annotations (<<48/2=24>>)
removed, so the model learns to write plain arithmetic. numeric_match scores the number after ####.

data/ is git-ignored and written fresh before each run (nothing derived from shared data is committed).
Deterministic (no sampling here; file order is kept):

    python examples/gsm8k/make_data.py [path/to/gsm8k folder]
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "../../../shared/data/gsm8k"
INSTRUCTION = "Solve the math word problem. Think step by step, then give the final answer as '#### <number>'."
CALCULATOR = re.compile(r"<<[^<>]*>>")


def solution(answer: str) -> str:
    return CALCULATOR.sub("", answer).strip()


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        with open(source / f"{split}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"id": f"{split}-{i:04d}", "messages": [
                    {"role": "system", "content": INSTRUCTION},
                    {"role": "user", "content": row["question"].strip()},
                    {"role": "assistant", "content": solution(row["answer"])},
                ]}) + "\n")
        counts[split] = len(rows)
    print(f"{counts['train']} train rows, {counts['test']} test rows")


if __name__ == "__main__":
    main()
