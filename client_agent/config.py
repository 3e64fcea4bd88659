"""The agent's home folder: identity key, enrollment config, and resume state."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path(os.environ.get("AICFL_AGENT_HOME", Path.home() / ".aicfl-agent"))


class AgentConfigError(Exception):
    """The home folder is missing, incomplete or unreadable."""


@dataclass
class AgentConfig:
    coordinator: str
    device_id: str
    coordinator_public_key: str
    data: str
    threads: int = 1
    ca_cert: str | None = None
    name: str = ""
    #: What the owner says about this device, for its apps (``--node-config``).
    node_config: dict[str, bool | int | float | str] = field(default_factory=dict)


@dataclass
class ResumeState:
    """What the agent last did, so a restart neither repeats nor goes stale."""

    round_id: int | None = None
    stages_sent: list[str] = field(default_factory=list)
    last_round_id: int = 0
    #: The apps this device has worked with: imported at start, before a round needs them.
    apps: list[str] = field(default_factory=list)


class AgentHome:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else DEFAULT_HOME

    @property
    def key_path(self) -> Path:
        return self.root / "identity.pem"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.json"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def load_config(self) -> AgentConfig:
        if not self.config_path.exists():
            raise AgentConfigError(f"{self.root} has no enrollment; run 'aicfl-agent enroll' first")
        try:
            return AgentConfig(**json.loads(self.config_path.read_text()))
        except (ValueError, TypeError) as err:
            raise AgentConfigError(f"{self.config_path} is damaged: {err}") from None

    def save_config(self, cfg: AgentConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_write(self.config_path, json.dumps(asdict(cfg), indent=2))

    def load_state(self) -> ResumeState:
        try:
            data: dict[str, Any] = json.loads(self.state_path.read_text())
            return ResumeState(**data)
        except (OSError, ValueError, TypeError):
            return ResumeState()

    def save_state(self, state: ResumeState) -> None:
        _atomic_write(self.state_path, json.dumps(asdict(state)))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
