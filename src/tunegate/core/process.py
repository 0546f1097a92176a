"""Child processes: the tools tunegate runs in virtual environments of their own (vLLM, llama.cpp), and workers that
do not outlive the tunegate process that started them."""

from __future__ import annotations

import os
from pathlib import Path


def venv_python(venv: Path) -> Path:
    """The python executable of the virtual environment `venv`."""
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies (prctl PR_SET_PDEATHSIG): a stage
    killed with kill -9 must not leave workers burning CPU and writing into its folders. Call it in the child: a
    multiprocessing initializer, or `preexec_fn` of a subprocess (tunegate.data.engine, tunegate.gguf_export).
    Elsewhere than Linux a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)
