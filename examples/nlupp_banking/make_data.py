"""Writes the nlupp_banking example's data from NLU++ banking (multi-label intents, 20 folds).

    data/train.json   folds 0-9, one JSON array of rows  (NLU++'s high-data regime: train on 10 folds)
    data/golden.json  folds 10-19, one JSON array of rows (the golden set samples from these; never trained on)

Each row is NLU++'s own object, unchanged but for an id naming its fold: {"id": "fold3-17", "text": "...",
"intents": [...]} (a row without "intents" has no intent: the multi-label task reads it as the empty set). The
rows are not converted: `task.kind: multilabel` in tunegate.yaml reads the intent lists (canonical order,
`none` for no intent). Slots are dropped (a separate span task).

data/ is git-ignored and written fresh before each run (nothing derived from shared data is committed).
Deterministic (no sampling here; fold and row order are kept):

    python examples/nlupp_banking/make_data.py [path/to/nlupp_banking folder]
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "../../../shared/data/nlupp_banking"
FOLDS = {"train": range(0, 10), "golden": range(10, 20)}


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    for split, folds in FOLDS.items():
        rows = []
        for fold in folds:
            for i, row in enumerate(json.loads((source / "banking" / f"fold{fold}.json").read_text(encoding="utf-8"))):
                kept = {"id": f"fold{fold}-{i}", "text": row["text"]}
                if "intents" in row:
                    kept["intents"] = row["intents"]
                rows.append(kept)
        (out / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        print(f"{split}: {len(rows)} rows from folds {folds.start}-{folds.stop - 1} -> {out / f'{split}.json'}")


if __name__ == "__main__":
    main()
