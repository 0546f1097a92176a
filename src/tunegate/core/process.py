"""Child processes: the tools tunegate runs in virtual environments of their own (vLLM, llama.cpp), and workers that
do not outlive the tunegate process that started them."""

from __future__ import annotations

import os
from pathlib import Path


def venv_python(venv: Path) -> Path:
    """The python executable of the virtual environment `venv`."""
    return Path(venv) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def child_dies_with_parent():
    """A function for a child process to call first (`preexec_fn` of a subprocess, or a multiprocessing
    initializer) that asks Linux to SIGKILL the child when the process that started it dies (prctl
    PR_SET_PDEATHSIG): a stage killed with kill -9 must not leave workers burning CPU and writing into its folders
    (tunegate.data.engine, tunegate.gguf_export, tunegate.llama_env). libc's prctl is looked up here, in the parent:
    after a fork in a process with other threads the child should only call it. Linux ties the signal to the thread
    that started the child: start children from a thread that lives as long as they should. Elsewhere than Linux,
    a function that does nothing."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    sigkill = int(signal.SIGKILL)

    def set_death_signal() -> None:
        prctl(1, sigkill, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the request was made
            os._exit(1)

    return set_death_signal


def die_with_parent() -> None:
    """`child_dies_with_parent()`, called in the child itself (a multiprocessing worker's initializer)."""
    child_dies_with_parent()()
