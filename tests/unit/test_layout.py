"""The package layout docs/architecture.md describes: imports point one way and no module imports itself back.

Only imports made when a module loads count; an import inside a function (the CLI reaching the
training cluster when an operator runs ``aicfl cluster ...``) is not a dependency of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "client_agent", "coordinator", "server", "training_cluster")
# What each package may import at load time, besides itself (docs/architecture.md, "The parts").
ALLOWED = {
    "shared": set(),
    "client_agent": {"shared"},
    "coordinator": {"shared"},
    "server": {"shared", "coordinator"},
    "training_cluster": {"shared"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "migrations" in parts:
                continue  # Alembic loads these by path, not by import
            name = ".".join(parts).removesuffix(".__init__")
            found[name] = path
    return found


def _load_time_imports(path: Path, known: dict[str, Path]) -> set[str]:
    imported: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue  # including `if TYPE_CHECKING:` blocks
        imported |= {n for n in names if n in known}
    return imported


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _load_time_imports(path, known) - {name} for name, path in known.items()}


def test_packages_import_only_what_the_layers_allow() -> None:
    graph = _graph()
    assert len(graph) > 50  # the walk found the packages
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if (top := target.split(".")[0]) != module.split(".")[0] and top not in ALLOWED[module.split(".")[0]]
    )
    assert wrong == [], wrong


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    state: dict[str, str] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == [], [" -> ".join(c) for c in cycles]
