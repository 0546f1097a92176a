"""Writes the squad example's data from XQuAD English (240 SQuAD v1.1 dev paragraphs, 1,190 questions).

    data/corpus.jsonl  one document per paragraph: {"id": "p000", "title", "text"}, ids in file order
    data/train.jsonl   chat rows for the questions of the paragraphs NOT held out
    data/golden.jsonl  chat rows for the questions of the held-out paragraphs (a seeded 25%, seed 0)

A chat row is {"id": question id, "messages": [system, user question, assistant first gold answer],
"doc_id": paragraph id}; tunegate keeps doc_id in the record's meta, where the audit reads it for
retrieval recall. Holding out whole paragraphs means no golden question's paragraph is trained on: a
fine-tune can only answer them if it generalises, a RAG candidate by retrieving the right paragraph.

The source is CC-BY-SA-4.0 (share-alike), so data/ is git-ignored and written fresh before each run.
Deterministic (seeded):

    python examples/squad/make_data.py [path/to/xquad.en.json]
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "../../../shared/data/squad_xquad_en/xquad.en.json"
INSTRUCTION = "Answer the question with a short phrase. Answer with the phrase only."
HOLDOUT_FRACTION = 0.25
SEED = 0


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    articles = json.loads(source.read_text(encoding="utf-8"))["data"]
    paragraphs = [(a["title"], p) for a in articles for p in a["paragraphs"]]
    doc_ids = [f"p{i:03d}" for i in range(len(paragraphs))]
    held_out = set(random.Random(SEED).sample(doc_ids, round(HOLDOUT_FRACTION * len(paragraphs))))

    out = HERE / "data"
    out.mkdir(exist_ok=True)
    train, golden = [], []
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as corpus:
        for doc_id, (title, p) in zip(doc_ids, paragraphs):
            corpus.write(json.dumps({"id": doc_id, "title": title, "text": p["context"]}) + "\n")
            for qa in p["qas"]:
                row = {"id": qa["id"], "messages": [
                    {"role": "system", "content": INSTRUCTION},
                    {"role": "user", "content": qa["question"].strip()},
                    {"role": "assistant", "content": qa["answers"][0]["text"].strip()},
                ], "doc_id": doc_id}
                (golden if doc_id in held_out else train).append(row)
    for name, rows in (("train.jsonl", train), ("golden.jsonl", golden)):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(paragraphs)} paragraphs, {len(held_out)} held out; {len(train)} train rows, {len(golden)} golden rows")


if __name__ == "__main__":
    main()
