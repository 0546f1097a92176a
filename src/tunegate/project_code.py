"""Functions in a project's own files, run by tunegate: GRPO file verifiers (tunegate.verifiers) and project-defined
eval metrics (`eval.custom_metrics`, tunegate.evals.custom). Written "path/to/file.py:function", the path relative to
the project file's folder.

A file is loaded by its location, never by a dotted import, only from inside the project folder (symbolic links
followed), and the bytes that are hashed (sha256, into the stage's manifest) are the bytes executed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from tunegate import TunegateError
from tunegate.core.paths import inside


def split_spec(spec: str, key: str, what: str) -> tuple[str, str]:
    """("path/to/file.py", "function") from "path/to/file.py:function". Raises TunegateError naming `key`."""
    file_part, sep, func_name = spec.rpartition(":")
    if not sep or not file_part or not func_name.isidentifier():
        raise TunegateError(f"{key}: {spec!r}: a file {what} is written 'path/to/file.py:function'")
    return file_part, func_name


def project_file(spec: str, project_root: Path, key: str, what: str) -> Path:
    """The file of `spec`, resolved inside `project_root`. Raises TunegateError when it lies outside or is missing."""
    file_part, _ = split_spec(spec, key, what)
    path = inside(project_root, Path(project_root) / file_part, key)  # code run from the project: only its own files
    if not path.is_file():
        raise TunegateError(f"{key}: {path}: {what} file not found")
    return path


def load_project_function(spec: str, project_root: Path, key: str, example_args: tuple, signature: str,
                          what: str) -> tuple[Callable[..., Any], Path, str]:
    """Load the function of `spec` from a file of the project.

    Args:
        spec: "path/to/file.py:function", relative to `project_root`.
        key: the project-file setting, named in every error (e.g. "train.grpo.verifier").
        example_args: arguments the function must accept (checked with inspect.signature().bind).
        signature: how the error describes them, e.g. "(prediction, reference)".
        what: "verifier", "metric", ...

    Returns:
        (function, resolved path, sha256 hex of the file's bytes).

    Raises:
        TunegateError: the spec is malformed, the file resolves outside the project folder, is missing or fails
            to import (syntax error, exception), or the function is missing, not callable or cannot take the arguments.
    """
    _, func_name = split_spec(spec, key, what)
    path = project_file(spec, project_root, key, what)
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    mod_name = f"tunegate_user_{what}_{sha256[:16]}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None:
        raise TunegateError(f"{key}: {path}: cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling in the user's file look their module up here
    try:
        exec(compile(data, str(path), "exec"), module.__dict__)  # noqa: S102  the project's own file, hashed above
    except SyntaxError as e:
        sys.modules.pop(mod_name, None)
        raise TunegateError(f"{key}: {path}:{e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:  # noqa: BLE001  the user's module failed at import: any error, one message
        sys.modules.pop(mod_name, None)
        raise TunegateError(f"{key}: {path}: import failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, func_name, None)
    if fn is None:
        raise TunegateError(f"{key}: {path}: no function {func_name!r}")
    if not callable(fn):
        raise TunegateError(f"{key}: {path}: {func_name!r} is not callable ({type(fn).__name__})")
    try:
        inspect.signature(fn).bind(*example_args)
    except TypeError as e:
        raise TunegateError(f"{key}: {path}: {func_name} must take {signature} ({e})") from None
    except ValueError:  # builtins without a signature: cannot check, let it run
        pass
    return fn, path, sha256
