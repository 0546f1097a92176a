"""Dependencies point one way (docs/design.md, "Rooms"): each module belongs to a room, and a room imports only
the rooms before it. Read with the stdlib `ast`, so imports written inside functions count too.

    core      tunegate/__init__.py, tunegate/core/        stdlib and third-party only
    config    config.py, catalog.py, prices.py            + core, and decide.py (a pure table)
    library   data/ evals/ recipes/ report/, models.py,    + config, each other
              decide.py, retrieval.py, verifiers.py,
              preflight.py, registry.py, launch.py,
              release.py, run_chain.py, export.py, gguf_export.py,
              llama_env.py, llama_worker.py
    stage     stages/                                     + library; never pipeline, never another stage
    pipeline  pipeline.py                                 + stage
    verb      drift.py, preview.py, runs.py, serve/       + pipeline, each other
    cli       cli.py                                      everything

No module imports another module's `_private` name, and the modules form no import cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

ROOMS = ("core", "config", "library", "stage", "pipeline", "verb", "cli")
MAY_IMPORT = {
    "core": {"core"},
    "config": {"core", "config"},
    "library": {"core", "config", "library"},
    "stage": {"core", "config", "library"},
    "pipeline": {"core", "config", "library", "stage"},
    "verb": {"core", "config", "library", "stage", "pipeline", "verb"},
    "cli": set(ROOMS),
}
# The one module a lower room may import across the table: the decision tree, a pure table the config validates
# answers against.
ALSO_ALLOWED = {("config", "tunegate.decide")}
CONFIG_ROOM = {"tunegate.config", "tunegate.catalog", "tunegate.prices"}
LIBRARY_MODULES = {"tunegate.models", "tunegate.decide", "tunegate.retrieval", "tunegate.verifiers", "tunegate.preflight",
                   "tunegate.registry", "tunegate.launch", "tunegate.release", "tunegate.export",
                   "tunegate.tracking", "tunegate.project_code", "tunegate.run_chain", "tunegate.gguf_export", "tunegate.llama_env", "tunegate.llama_worker"}
LIBRARY_PACKAGES = ("tunegate.data.", "tunegate.evals.", "tunegate.recipes.", "tunegate.report.")
VERB_MODULES = {"tunegate.drift", "tunegate.preview", "tunegate.runs", "tunegate.mcp_server"}

# Violations allowed while a move is under way: (importer, imported) or (importer, "name"). Empty: keep it so.
ALLOWED_VIOLATIONS: set[tuple[str, str]] = set()


def room_of(module: str) -> str:
    if module == "tunegate" or module.startswith("tunegate.core"):
        return "core"
    if module in CONFIG_ROOM:
        return "config"
    if module in LIBRARY_MODULES or module.startswith(LIBRARY_PACKAGES) or module in {p.rstrip(".") for p in LIBRARY_PACKAGES}:
        return "library"
    if module.startswith("tunegate.stages"):
        return "stage"
    if module == "tunegate.pipeline":
        return "pipeline"
    if module in VERB_MODULES or module == "tunegate.serve" or module.startswith("tunegate.serve."):
        return "verb"
    if module == "tunegate.cli":
        return "cli"
    raise AssertionError(f"{module}: in no room; add it to a room in tests/unit/test_layers.py and docs/design.md")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "tunegate").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every tunegate import in `path`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "tunegate"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write `from tunegate.... import`"
            if node.module and node.module.split(".")[0] == "tunegate":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.append((sub, None, node.lineno) if sub in known else (node.module, a.name, node.lineno))
    return out


def private_attributes(path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(module, name, line) for every `alias._name` where `alias` is a tunegate module imported into `path`
    (`from tunegate import registry` ... `registry._check`): a private name reached through the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tunegate":
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in known})
    return [(aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(module -> modules it imports, room violations, private-name imports)."""
    mods = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    rooms, private = [], []
    for mod, path in mods.items():
        for target, name, line in imports(path, set(mods)):
            if target != mod:
                edges[mod].add(target)
            room, target_room = room_of(mod), room_of(target)
            allowed = target_room in MAY_IMPORT[room] or (room, target) in ALSO_ALLOWED
            if room == "stage" and target_room == "stage" and target != "tunegate.stages" and mod != target:
                allowed = False  # a stage never imports another stage
            if not allowed and (mod, target) not in ALLOWED_VIOLATIONS:
                rooms.append(f"{path.relative_to(SRC)}:{line}: {mod} ({room}) imports {target} ({target_room})")
            if name and name.startswith("_") and not name.startswith("__") and target != mod and (mod, name) not in ALLOWED_VIOLATIONS:
                private.append(f"{path.relative_to(SRC)}:{line}: {mod} imports {target}.{name}, a private name")
        for target, name, line in private_attributes(path, set(mods)):
            if target != mod and (mod, name) not in ALLOWED_VIOLATIONS:
                private.append(f"{path.relative_to(SRC)}:{line}: {mod} uses {target}.{name}, a private name")
    return edges, rooms, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_room():
    for mod in modules():
        assert room_of(mod) in ROOMS


def test_imports_follow_the_room_table():
    _, rooms, _ = graph()
    assert rooms == [], "imports against docs/design.md's room table:\n" + "\n".join(rooms)


def test_no_module_imports_another_modules_private_name():
    _, _, private = graph()
    assert private == [], "\n".join(private)


def test_no_import_cycles():
    edges, _, _ = graph()
    found = [c for c in cycles(edges) if not all((a, b) in ALLOWED_VIOLATIONS for a, b in zip(c, c[1:] + c[:1]))]
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_allowlist_holds_only_violations_that_still_exist():
    edges, _, _ = graph()
    mods = modules()
    names = {(mod, name) for mod, path in mods.items() for _, name, _ in imports(path, set(mods)) if name}
    stale = [v for v in ALLOWED_VIOLATIONS if v[1] not in edges.get(v[0], set()) and v not in names]
    assert stale == [], f"fixed: remove from ALLOWED_VIOLATIONS: {stale}"


def test_the_checker_sees_imports_inside_functions_and_finds_cycles(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tunegate.pipeline import run_stage\n    from tunegate.core.io import _x\n")
    assert imports(f, {"tunegate.pipeline", "tunegate.core.io"}) == [("tunegate.pipeline", "run_stage", 2), ("tunegate.core.io", "_x", 3)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert room_of("tunegate.stages.data") == "stage" and room_of("tunegate.core.stage") == "core"
    f.write_text("from tunegate import registry\nimport tunegate.core.io as tio\nregistry._check(1)\ntio._y\nregistry.__name__\n")
    assert sorted(private_attributes(f, {"tunegate.registry", "tunegate.core.io"})) == [("tunegate.core.io", "_y", 4), ("tunegate.registry", "_check", 3)]


def test_the_llama_worker_imports_only_the_standard_library_and_llama_cpp():
    """tunegate/llama_worker.py runs inside llama.cpp's own environment (tunegate.llama_env), where tunegate is not
    installed: an import of tunegate (or of anything else) would pass here and fail only there."""
    import sys

    tree = ast.parse((SRC / "tunegate" / "llama_worker.py").read_text())
    top = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert top - set(sys.stdlib_module_names) == {"llama_cpp"}, top
