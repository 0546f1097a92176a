"""One rule for identifiers that become paths, and one for paths tunegate writes: they stay inside the project.

Run ids, project names, adapter names and tenant names become folder names (`runs/<run-id>/`,
`adapters/<project>-v<N>/`, a served bundle's copy) or keys a person types. They must match `IDENTIFIER`:
a letter or digit, then letters, digits, `-` or `_`, at most 128 characters. No separator, no dot (so no `..`),
never empty. Paths the tool writes to from the project file (`runs_dir`, `registry`, `data.golden_lock`) and code
it runs from the project (a GRPO verifier file) must resolve, symbolic links followed, inside the project folder.
Records (release.json, the release documents) name files of the project relative to it (`project_relative`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunegate import TunegateError

IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
IDENTIFIER_RULE = "a letter or digit, then letters, digits, '-' or '_' (at most 128; no '/', no '.')"


def identifier_problem(value: object) -> str | None:
    """Why `value` is not a valid identifier (see the module docstring), or None when it is."""
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        return f"{value!r} is not {IDENTIFIER_RULE}"
    return None


def check_identifier(kind: str, value: str) -> str:
    """`value` when it is a valid identifier. Raises TunegateError naming `kind` ("run id", "tenant name", ...),
    the value and the rule otherwise."""
    problem = identifier_problem(value)
    if problem:
        raise TunegateError(f"{kind} {problem}; rule: identifiers that become folder names stay plain names")
    return value


def inside(root: Path, path: Path, what: str) -> Path:
    """`path` resolved (symbolic links followed), when it lies inside `root` (resolved the same way).

    what: names the setting in the error, e.g. "runs_dir". Raises TunegateError naming the setting, the path, where
    it resolves and the project folder when it lies outside.
    """
    resolved, base = Path(path).expanduser().resolve(), Path(root).expanduser().resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise TunegateError(f"{what}: {path} resolves to {resolved}, outside the project folder {base}; rule: tunegate "
                            "writes, and runs code from, only inside the project (use an --out flag to write elsewhere)")
    return resolved


def project_relative(value: object, root: Path) -> str:
    """How records name a file or folder of the project, so that they read the same on another machine and from
    any working folder: a posix path relative to the project folder `root` when `value` lies inside it, else
    `value` as written (a hub id, an embedded model name, a path outside the project). None gives "None".

    An absolute `value` is relative when it lies inside `root` as written or with symbolic links followed. A
    relative `value` is read against `root`, never against the current folder, and only when `root/value` exists:
    `smollm2-135m-instruct` or `org/model` stay as written unless the project holds a folder of that name.
    """
    if value is None:
        return "None"
    text = str(value)
    path = Path(text).expanduser()
    full = path if path.is_absolute() else Path(root) / path
    if not path.is_absolute() and not full.exists():
        return text
    pairs = [(Path(os.path.normpath(full)), Path(os.path.normpath(Path(root).absolute())))]
    if full.exists():
        pairs.append((full.resolve(), Path(root).resolve()))
    for candidate, base in pairs:
        if candidate.is_relative_to(base):
            return candidate.relative_to(base).as_posix()
    return text
