"""A run folder's chain of stage manifests, checked before anything is released or exported from it: the train and
eval stages finished, the eval gate said PASS, every stage was built from the upstream manifests in the folder now
(one chain), and the evaluated weights are still on disk with the sha256 the train manifest recorded.

The release bundle (tunegate.release) and the GGUF export (tunegate.gguf_export) both start here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tunegate import TunegateError
from tunegate.core.manifest import MANIFEST, Manifest, manifest_hash, read_manifest, sha256_file

BUNDLED_STAGES = ("data", "train", "eval", "report")


def run_manifests(run_dir: Path, stages: Sequence[str]) -> dict[str, Manifest]:
    """The finished manifests of `stages` in `run_dir`, in that order."""
    return {s: m for s in stages if (m := read_manifest(run_dir / s)) is not None}


def _failing_rules(eval_dir: Path) -> str:
    try:
        rules = json.loads((eval_dir / "verdict.json").read_text(encoding="utf-8")).get("rules", [])
    except (OSError, ValueError):
        return "eval/verdict.json unreadable"
    failed = [r for r in rules if not r.get("passed")]
    return "; ".join(f"{r.get('description', r.get('metric'))} (measured {r.get('value')})" for r in failed) or "none listed"


def check_releasable(run_dir: Path, stages: Sequence[str] = BUNDLED_STAGES) -> None:
    """The release gate on the run folder, without writing anything: finished train and eval stages, eval verdict
    PASS, one consistent chain, the evaluated adapter still on disk. Raises TunegateError naming the file and rule
    (for a FAIL verdict: the failing rules)."""
    check_run(Path(run_dir), run_manifests(Path(run_dir), stages))


def check_run(run_dir: Path, manifests: dict[str, Manifest]) -> None:
    """The release gate: PASS verdict, one consistent chain, the evaluated adapter still on disk."""
    for stage in ("train", "eval"):
        if stage not in manifests:
            raise TunegateError(f"{run_dir / stage / MANIFEST}: not found; a release needs a finished {stage} stage (run `tunegate run`)")
    ev = manifests["eval"]
    if ev.verdict != "PASS":
        raise TunegateError(
            f"{run_dir / 'eval'}: eval verdict {ev.verdict}; failing rules: {_failing_rules(run_dir / 'eval')}; "
            "rule: only a run whose eval gate said PASS is released"
        )
    for stage, m in manifests.items():
        for up, digest in m.upstream.items():
            if up in manifests and manifest_hash(run_dir / up) != digest:
                raise TunegateError(
                    f"{run_dir / stage / MANIFEST}: built from an older {up} stage than the one in {run_dir}; rule: a release "
                    f"signs one chain. Rerun `tunegate run` (or `tunegate {stage}`)"
                )
    train = manifests["train"]
    weights = [r for r in train.outputs if r.startswith(("adapter/", "model/"))]
    if not weights:
        raise TunegateError(f"{run_dir / 'train' / MANIFEST}: records no adapter files (empty adapter); nothing to release")
    changed = []
    for rel in weights:
        p = run_dir / "train" / rel
        if not p.is_file():
            changed.append(f"{rel} (missing)")
        elif sha256_file(p) != train.outputs[rel]:
            changed.append(f"{rel} (changed)")
    if changed:
        raise TunegateError(
            f"{run_dir / 'train'}: the adapter on disk no longer has the sha256 the train manifest recorded: "
            f"{', '.join(changed)}; rule: only the evaluated adapter is released"
        )
