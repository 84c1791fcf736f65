"""The folder tree is the architecture: rooms import only rooms below them, and no module loops.

Reads the sources with ast (no torch, nothing imported). An import counts wherever it stands, at
module level or inside a function: a lazy import that only dodges a loop is still a loop in the
design, and so is one under `if TYPE_CHECKING:` (a type that needs a module above it says the
dependency runs both ways; a structural type such as vlbridge.modeling.running avoids it). The rooms and their
order are the folder map in docs/architecture.md; this test and that map must agree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"vlbridge": REPO / "core", "vlbridge.plugins": REPO / "plugins"}

# Lowest first. A room may import itself, `vlbridge.errors` and any room before it, nothing after it.
LAYERS = ("files", "plugin", "assemblies", "parts", "finetune", "modeling", "plugins", "interop", "data",
          "metrics", "evaluation", "world", "train", "lmms", "compare", "plugintest", "face", "cli")
# Old root modules kept one release as deprecated aliases: for outside code only, never imported inside.
SHIMS = {f"vlbridge.{name}" for name in ("specs", "hookspecs", "testing", "freeze", "attention", "images",
                                         "connector_protocol", "contract", "lora", "retrieval")}
# The bare `vlbridge.plugins` package is where the shipped data folders live; importing it to find
# them (its __init__ imports nothing) is no dependency on the plugins' code.
DATA_PACKAGE = "vlbridge.plugins"


def module_files() -> dict[str, Path]:
    """Every module of the vlbridge distribution, by dotted name (the longest package-dir wins)."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def room_of(module: str) -> str:
    parts = module.split(".")
    if module in ("vlbridge", "vlbridge.errors") or module in SHIMS:
        return {"vlbridge": "face", "vlbridge.errors": "errors"}.get(module, "shim")
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The vlbridge modules `module` imports: module-level, function-level and type-checking-only alike."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vlbridge"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "vlbridge":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None (iterative DFS, three colours)."""
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack, path = [(start, iter(sorted(graph.get(start, ()))))], [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not colour.get(child) and child in graph:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def direction_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        source = room_of(module)
        for target in sorted(targets):
            if target == DATA_PACKAGE or source == "shim":
                continue
            room = room_of(target)
            if room == "shim":
                problems.append(f"{module} imports the deprecated alias {target}: import its new path")
            elif room != "errors" and room != source and (
                    room not in LAYERS or source not in LAYERS or LAYERS.index(room) > LAYERS.index(source)):
                problems.append(f"{module} ({source}) imports {target} ({room}), against the allowed direction")
    return problems


def test_the_module_graph_has_no_loop():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_imports_follow_the_rooms_order():
    assert direction_problems(import_graph()) == []


def test_every_room_is_placed_and_on_the_folder_map():
    rooms = {room_of(module) for module in module_files()} - {"face", "errors", "shim"}
    assert sorted(rooms - set(LAYERS)) == [], "a new room needs a place in LAYERS and docs/architecture.md"
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    mapped = re.findall(r"^\| `(\w+)/` \|", text, re.MULTILINE)
    assert [room for room in LAYERS if room != "face"] == mapped, "docs/architecture.md's folder map, in order"


def test_the_root_holds_only_the_public_face_and_the_shims():
    root = {path.stem for path in (REPO / "core").glob("*.py")}
    assert root - {"__init__", "__main__", "errors"} == {name.rpartition(".")[2] for name in SHIMS}


def test_the_data_package_imports_nothing():
    tree = ast.parse((REPO / "plugins" / "__init__.py").read_text(encoding="utf-8"))
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_the_checker_sees_lazy_imports_and_loops(tmp_path):
    """The checker itself: a function-level import counts, and so does a TYPE_CHECKING one."""
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlbridge.train import trainer\n"
                    "def f():\n    from vlbridge.train.objectives import Stage\n", encoding="utf-8")
    known = {"vlbridge.train.objectives", "vlbridge.train.trainer"}
    assert imports_of("vlbridge.modeling.m", path, known) == {"vlbridge.train.objectives", "vlbridge.train.trainer"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    old_specs = "vlbridge." + "specs"  # spelled so that house_rewrite.py leaves it alone
    assert direction_problems({"vlbridge.modeling.m": {"vlbridge.train.objectives", old_specs}}) == [
        f"vlbridge.modeling.m imports the deprecated alias {old_specs}: import its new path",
        "vlbridge.modeling.m (modeling) imports vlbridge.train.objectives (train), against the allowed direction",
    ]
