"""The edge agent stays small: its install and its imports never reach the server side."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = {
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "h2o",
    "shap",
    "horovod",
    "flwr",
    "locust",
}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_agent_install_pulls_no_server_cluster_or_audit_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    agent = _names(project["dependencies"]) | _names(project["optional-dependencies"]["agent"])
    assert not agent & SERVER_ONLY, agent & SERVER_ONLY
    assert "scikit-learn" not in agent  # the agent computes its metrics with numpy


def test_agent_and_shared_code_import_nothing_from_the_server_side() -> None:
    forbidden = SERVER_ONLY | {"coordinator", "server", "training_cluster"}
    for folder in ("client_agent", "shared"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            if path == ROOT / "shared" / "apps" / "flower.py":
                # The Flower adapter imports flwr inside its functions, for a device whose owner
                # installed flwr to run a Flower client; never when the module is imported.
                tree = ast.Module(
                    body=[n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)],
                    type_ignores=[],
                )
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    assert mod.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {mod}"


def test_devices_bring_their_own_torch_build() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = [r for r in project["dependencies"] if _names([r]) == {"torch"}]
    assert torch and not any("==" in r or "<" in r for r in torch), torch


def test_the_agent_loads_no_table_or_model_library_until_an_app_needs_it() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, client_agent.cli, client_agent.loop, shared.apps; "
        "print(sorted(m for m in ('torch', 'pandas', 'pyarrow', 'sklearn', 'scipy', 'flwr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
