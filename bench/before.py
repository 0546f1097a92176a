"""A tunegate module as it was at an earlier commit, imported beside today's: the "before" side of a benchmark
that measures a change in the same run as its baseline."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_at(commit: str, path: str, name: str):
    """`path` (e.g. src/tunegate/data/dedup.py) at `commit`, from `git show`, imported as module `name`. Its own
    imports of tunegate resolve to today's package: use it for modules whose dependencies did not change."""
    code = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], capture_output=True, text=True, check=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(code)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while a class is built
    spec.loader.exec_module(mod)
    return mod
