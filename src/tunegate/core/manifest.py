"""Stage manifests: what a stage read, wrote and decided, written last and atomically.

A stage folder is finished exactly when its `manifest.json` exists. The manifest records the stage name,
its config section as validated, the sha256 of every input and output file, the sha256 of the upstream
manifests (lineage), package versions, timings, metrics and, for a gate, the verdict. Its `fingerprint`
hashes everything that determines the outputs; a rerun whose fingerprint matches is skipped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

import tunegate
from tunegate.core.io import atomic_write_text

MANIFEST = "manifest.json"
_PACKAGES = ("tunegate", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Manifest(BaseModel):
    stage: str
    fingerprint: str
    config: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict)  # path -> sha256
    outputs: dict[str, str] = Field(default_factory=dict)  # path relative to the stage folder -> sha256
    upstream: dict[str, str] = Field(default_factory=dict)  # stage -> sha256 of its manifest.json
    packages: dict[str, str] = Field(default_factory=package_versions)
    started_at: str = ""
    wall_s: float = 0.0
    metrics: dict[str, Any] = Field(default_factory=dict)
    verdict: str | None = None  # PASS / FAIL for the eval gate, TRAIN / NO_TRAIN for the audit
    overrides: list[str] = Field(default_factory=list)  # decisions taken against a gate's advice, and by whom
    argv: list[str] = Field(default_factory=lambda: list(sys.argv))


def fingerprint(stage: str, config: dict[str, Any], inputs: dict[str, str], upstream: dict[str, str]) -> str:
    """sha256 over everything that determines a stage's outputs (and tunegate's version)."""
    payload = {
        "stage": stage,
        "config": config,
        "inputs": inputs,
        "upstream": upstream,
        "tunegate": tunegate.__version__,
    }
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def hash_outputs(stage_dir: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every regular file below stage_dir (hidden files excluded), keyed by relative path."""
    out = {}
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir).as_posix()
        if p.is_file() and rel not in skip and not p.name.startswith("."):
            out[rel] = sha256_file(p)
    return out


def read_manifest(stage_dir: Path) -> Manifest | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    return Manifest.model_validate_json(path.read_text(encoding="utf-8"))


def write_manifest(stage_dir: Path, manifest: Manifest) -> str:
    """Write `manifest.json` last and atomically; returns its sha256 (the lineage link for downstream)."""
    text = manifest.model_dump_json(indent=2) + "\n"
    atomic_write_text(stage_dir / MANIFEST, text)
    return sha256_text(text)


def manifest_hash(stage_dir: Path) -> str:
    return sha256_file(stage_dir / MANIFEST)


def verify_outputs(stage_dir: Path, manifest: Manifest) -> list[str]:
    """Names of output files that are missing or changed since the manifest was written."""
    bad = []
    for rel, digest in manifest.outputs.items():
        p = stage_dir / rel
        if not p.is_file():
            bad.append(f"{rel} (missing)")
        elif sha256_file(p) != digest:
            bad.append(f"{rel} (changed)")
    return bad
