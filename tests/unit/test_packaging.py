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
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    assert mod.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {mod}"
