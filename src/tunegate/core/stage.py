"""The stage contract: what a stage is handed (`Stage`), what it returns (`StageResult`), and how it declares
itself to the pipeline (`StageSpec`).

A stage reads files and writes files into `runs/<run-id>/<stage>/`. It writes into `.<stage>.partial/`
while it runs (the pipeline holds it locked); the pipeline swaps that folder into place (core.io.publish_dir)
and writes `manifest.json` last, so a stage is finished exactly when its manifest exists. Each file under `tunegate/stages/` defines one `SPEC`;
`tunegate.pipeline.STAGES` lists them in order. Adding a stage is writing one such file and naming its SPEC
there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    verdict: str | None = None
    inputs: dict[str, Path] = field(default_factory=dict)  # files read that were not known before the stage ran


@dataclass
class Stage:
    project: Any  # tunegate.config.Project (core imports nothing above it)
    run_dir: Path
    name: str
    worker_dir: Path | None = None  # a data-parallel worker (rank > 0) writes here instead; removed afterwards

    @property
    def dir(self) -> Path:
        """Where the stage writes while it runs; swapped in as `final_dir` when it succeeds."""
        return self.worker_dir or self.partial_dir

    @property
    def partial_dir(self) -> Path:
        """Rank 0's writing folder, also for a data-parallel worker (which writes only its scratch `dir`)."""
        return self.run_dir / f".{self.name}.partial"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def checkpoint_dir(self) -> Path:
        """Survives an interruption (resume); removed when the stage succeeds."""
        return self.run_dir / f".{self.name}.checkpoints"

    def upstream_dir(self, name: str) -> Path:
        return self.run_dir / name


def no_config(project: Any) -> dict[str, Any]:
    return {}


def no_inputs(project: Any) -> dict[str, Path]:
    return {}


def never_skipped(project: Any) -> str | None:
    return None


def nothing_to_prepare(project: Any) -> None:
    return None


@dataclass(frozen=True)
class StageSpec:
    """One stage, as the pipeline sees it.

    name: the stage folder's name and the CLI verb.
    run: the stage body, `run(stage) -> StageResult`.
    upstream: stages whose manifests must exist first; their manifest hashes enter this stage's fingerprint.
    config: the view of the project config the stage depends on, `config(project) -> dict` (JSON-able); a
        change to it reruns the stage, a change elsewhere does not.
    inputs: files outside the run folder the stage reads, `inputs(project) -> {name: path}`; their sha256
        enter the fingerprint.
    skip: why the stage does not run for this project (`skip(project) -> reason`), or None when it runs.
    prepare: what the stage settles just before its fingerprint is taken when it is about to run
        (`prepare(project)`; the release stage makes the project-local signing key there). `config` and `inputs`
        only read: status checks (`tunegate runs`, pipeline.stale_reason) call them and must change nothing.
    requires: what the stage needs from this machine, checked before the first stage of a run that includes it
        (`requires(project)` raises TunegateError; the release stage: llama.cpp when `release.gguf` is set), so
        a missing tool is found before hours of training, not after.
    checkpoints: keeps `.<name>.checkpoints/` across an interruption, resumed while the fingerprint holds.
    distributed: may run under torchrun/accelerate with several processes (rank 0 writes the stage folder).
    """

    name: str
    run: Callable[[Stage], StageResult]
    upstream: tuple[str, ...] = ()
    config: Callable[[Any], dict[str, Any]] = no_config
    inputs: Callable[[Any], dict[str, Path]] = no_inputs
    skip: Callable[[Any], str | None] = never_skipped
    prepare: Callable[[Any], None] = nothing_to_prepare
    requires: Callable[[Any], None] = nothing_to_prepare
    checkpoints: bool = False
    distributed: bool = False


def config_sections(*names: str) -> Callable[[Any], dict[str, Any]]:
    """A `StageSpec.config` that takes whole top-level sections of the project config. An optional section that
    is not set (None, e.g. `task`) is left out, so adding one keeps the fingerprints of projects without it."""

    def view(project: Any) -> dict[str, Any]:
        dumped = project.model_dump(mode="json")
        return {k: dumped[k] for k in names if dumped.get(k) is not None}

    return view


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun / accelerate environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
