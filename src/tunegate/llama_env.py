"""`tunegate serve-setup llama`: llama.cpp (llama-cpp-python, built from source) in a virtual environment of its own.

The GGUF export (tunegate.gguf_export) needs two things from one llama.cpp version: the converter that writes the
GGUF file (`convert_hf_to_gguf.py` with its `conversion` and `gguf-py` packages) and the runtime that reads it
back for the parity gate. Both come from one file, PyPI's llama-cpp-python sdist, pinned by version and sha256:
it vendors llama.cpp whole. The runtime is built from it with the system C/C++ compiler and CMake into
`.venv-llama` (default), beside tunegate's environment like vLLM's (tunegate.serve.vllm_setup); the converter's
Python files are extracted into `.venv-llama/llama.cpp/` and run with tunegate's own interpreter, which already
has what they import (torch, transformers, safetensors, numpy, sentencepiece). A stamp file marks a finished
install, so `make llama` costs nothing the second time.

Measured here (2 cores): download 77 MB in ~6 s, build ~3 min 40 s, 0.7 GB peak memory, 160 MB installed.

llama.cpp is built for the machine it is built on (GGML_NATIVE, -march=native), except Intel AMX: on x86-64 the
compiler is told -mno-amx-tile -mno-amx-int8 -mno-amx-bf16, which GCC and Clang honour whatever -march says, so
ggml's AMX backend (amx/amx.cpp, compiled only under __AMX_INT8__) is left out. On a Sapphire-Rapids-class CPU
that backend segfaulted in tunegate's CI the first time a q8_0 file answered (exit -11, f16 files fine), as
reported upstream (ggml-org/llama.cpp#20824, segfault in ggml_backend_amx_mul_mat, machine-dependent, unfixed).
The wheel is built with pip's cache off, so a wheel built earlier with other flags is never reused.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tunegate import TunegateError
from tunegate.core.manifest import sha256_file
from tunegate.core.process import child_dies_with_parent, venv_python

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
# sha256 of the sdist on PyPI (pip download, 2026-12-07): pip refuses a different file (--require-hashes) before it
# unpacks it or runs its build backend. Pinned: this file only; its build tools (scikit-build-core, CMake when the
# system has none) and runtime dependencies (numpy, jinja2, diskcache, typing-extensions) are what pip resolves.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
STEP_TIMEOUT_S = 3600  # one download or build step
DEFAULT_VENV = Path(".venv-llama")
STAMP = ".tunegate-llama-installed"
CONVERTER_DIR = "llama.cpp"  # inside the environment: convert_hf_to_gguf.py, conversion/, gguf-py/
# what the converter needs from the sdist's vendor/llama.cpp/ (its top-level script and the two packages it imports)
_VENDOR = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # see the module docstring


def _compiler_takes(flags: str) -> bool:
    """Whether the C compiler CMake will use ($CC, else cc) accepts `flags` (GCC < 11 and Clang < 12 know no AMX
    flags; their builds cannot compile ggml's AMX code either, so they need none)."""
    cmd = [os.environ.get("CC") or "cc", *flags.split(), "-x", "c", "-c", "-o", os.devnull, "-"]
    try:
        return subprocess.run(cmd, input=b"int main(void) { return 0; }\n", capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_env(machine: str | None = None, probe=_compiler_takes) -> tuple[dict[str, str], str]:
    """(the environment pip builds llama-cpp-python in, the build's description for the stamp): on x86-64,
    CFLAGS and CXXFLAGS (CMake's initial C/C++ flags) get NO_AMX_FLAGS after whatever the caller had set, when
    the compiler knows them (`probe`)."""
    env = dict(os.environ)
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64") or not probe(NO_AMX_FLAGS):
        return env, "native"
    for var in ("CFLAGS", "CXXFLAGS"):
        env[var] = f"{env.get(var, '')} {NO_AMX_FLAGS}".strip()
    return env, f"native, {NO_AMX_FLAGS}"


def stamp_text(build: str) -> str:
    """What a finished install's stamp holds: the requirement, the sdist's sha256 and the build's flags. A stamp
    with other text (an older tunegate's build) is no finished install: `setup_venv` builds again."""
    return f"{LLAMA_CPP_PYTHON} sdist sha256 {SDIST_SHA256}, build {build}\n"


def _extract_converter(sdist: Path, dest: Path) -> None:
    """The converter's files from the sdist into `dest` (replaced whole). Members are filtered with tarfile's
    `data` filter (no absolute paths, links out or device files)."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(_VENDOR)
                   and m.name[len(_VENDOR):].startswith(_CONVERTER_PARTS)]
        if not any(m.name.endswith("/convert_hf_to_gguf.py") for m in members):
            raise TunegateError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py in it")
        for m in members:
            m.name = m.name[len(_VENDOR):]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def setup_venv(venv: Path = DEFAULT_VENV, python: str | None = None, force: bool = False) -> Path:
    """Create `venv` and install llama-cpp-python there from its sdist (built from source), and extract the
    GGUF converter from the same sdist into `venv/llama.cpp/`. Idempotent: a stamp file records a finished install.

    Returns:
        The environment's python.

    Raises:
        TunegateError: a step failed or ran past an hour (the message names the command), or the sdist is not
            the one pinned (sha256).
    """
    venv = Path(venv)
    py = venv_python(venv)
    stamp = venv / STAMP
    env, build = build_env()
    if stamp.is_file() and py.is_file() and not force:
        if stamp.read_text() == stamp_text(build):
            print(f"{venv}: llama.cpp already installed ({stamp.read_text().strip()})", flush=True)
            return py
        print(f"{venv}: built by an older tunegate ({stamp.read_text().strip()}); building again", flush=True)
    stamp.unlink(missing_ok=True)  # a forced reinstall that fails leaves no stamp behind

    def step(cmd: list[str], env: dict[str, str] | None = None) -> None:
        print("+ " + " ".join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, check=False, timeout=STEP_TIMEOUT_S, env=env,
                                preexec_fn=child_dies_with_parent()).returncode
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            why = f"ran past {STEP_TIMEOUT_S} s" if rc is None else "failed"
            raise TunegateError(f"`{' '.join(cmd)}` {why}; nothing is stamped, rerun `tunegate serve-setup llama`")

    if not py.is_file():
        step([python or sys.executable, "-m", "venv", str(venv)])
    download = venv / "sdist"
    sdist = download / SDIST
    if sdist.is_file() and sha256_file(sdist) != SDIST_SHA256:
        sdist.unlink()  # not the pinned file (a broken download): fetched again below
    if not sdist.is_file():
        download.mkdir(parents=True, exist_ok=True)
        requirement = download / "requirement.txt"
        requirement.write_text(f"{LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
        step([str(py), "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--require-hashes", "-r", str(requirement),
              "-d", str(download)])
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise TunegateError(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256} (the file pinned in tunegate.llama_env); "
                            "nothing was built")
    _extract_converter(sdist, venv / CONVERTER_DIR)
    print(f"building llama.cpp from {SDIST} with the system compiler ({build}; about 4 minutes on 2 cores)", flush=True)
    step([str(py), "-m", "pip", "install", "--no-cache-dir", "--force-reinstall", str(sdist)], env=env)
    stamp.write_text(stamp_text(build))
    return py


def find_venv(venv: Path | None = None) -> Path:
    """The llama.cpp environment: `venv`, else $TUNEGATE_LLAMA_VENV, else ./.venv-llama.

    Raises:
        TunegateError: not installed there; the message gives the install command.
    """
    venv = Path(venv or os.environ.get("TUNEGATE_LLAMA_VENV") or DEFAULT_VENV)
    if not venv_python(venv).is_file() or not (venv / STAMP).is_file():
        raise TunegateError(f"{venv}: no llama.cpp environment; install it with: tunegate serve-setup llama --venv {venv} "
                            f"(or `make llama`; {LLAMA_CPP_PYTHON} built from source, ~4 minutes)")
    if ", build " not in (venv / STAMP).read_text():  # stamps from before the build's flags were recorded
        raise TunegateError(f"{venv}: built by an older tunegate ({installed_version(venv)}), with Intel AMX code that "
                            f"segfaulted on quantised files; rebuild it: tunegate serve-setup llama --venv {venv} "
                            "(or `make llama`, ~4 minutes)")
    return venv


def converter(venv: Path) -> tuple[Path, dict[str, str]]:
    """(convert_hf_to_gguf.py, the environment to run it with tunegate's python: PYTHONPATH with the vendored
    gguf-py first, so it is the converter's own gguf package, not the older one tunegate's environment may have)."""
    root = Path(venv).resolve() / CONVERTER_DIR
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise TunegateError(f"{script}: missing; reinstall with: tunegate serve-setup llama --venv {venv} --force")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "gguf-py"), str(root)])
    return script, env


def installed_version(venv: Path) -> str:
    """What the stamp records (the requirement, the sdist's sha256 and the build's flags: `stamp_text`)."""
    return (Path(venv) / STAMP).read_text().strip()
