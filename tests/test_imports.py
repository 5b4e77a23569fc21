"""Layering: every module of dymu imports on its own (no import cycle that only a lucky import order hides), and the
core (merge, schedules, thresholds, distributed, finding, encoders) imports nothing that imports it back."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(importlib.util.find_spec("dymu").origin).parent  # found, not imported: an import cycle fails below
CORE = ("dymu.merge", "dymu.schedules", "dymu.thresholds", "dymu.distributed", "dymu.finding", "dymu.encoders")

# one interpreter: before each module, every dymu module is dropped from sys.modules, so each import starts from
# nothing (third-party modules stay loaded: the test takes seconds, not a minute)
IMPORT_EACH_ALONE = """
import importlib, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "dymu" or m.startswith("dymu.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and not err.name.startswith("dymu"):
            continue  # an optional dependency that is not installed (lmms-eval, open_clip, ...)
        failed[name] = f"{type(err).__name__}: {err}"
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"
print(json.dumps(failed))
"""


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs the command line
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def test_every_module_imports_alone():
    names = list(module_names())
    assert "dymu.finding" in names and "dymu.encoders.base" in names and len(names) > 40
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(names)], capture_output=True, text=True,
                         timeout=600, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert failed == {}, failed


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dymu modules ``name`` imports anywhere (function bodies included; ``if TYPE_CHECKING:`` blocks not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            node.body = []  # ast.walk has not entered it yet
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_the_core_imports_nothing_that_imports_it_back():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    core = [m for m in modules if m.startswith(CORE)]
    for start in core:
        came_from, todo = {name: start for name in graph[start]}, list(graph[start])
        while todo:
            name = todo.pop()
            if name == start:
                chain = [start]
                while len(chain) == 1 or chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                raise AssertionError(f"import cycle: {' <- '.join(chain)}")
            for nxt in graph[name]:
                if nxt not in came_from:
                    came_from[nxt] = name
                    todo.append(nxt)
