"""The agent's side of long polls: it offers to wait, stops at once while held, and falls back to
polling with a coordinator that does not know the field."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_agent.config import AgentConfig, AgentHome
from client_agent.identity import create_identity
from client_agent.loop import LONG_POLL_SECONDS, Agent
from shared.signing import b64e, public_key_bytes

CHECKIN = "/v1/device/checkin"


def make_agent(tmp_path: Path, url: str) -> Agent:
    home = AgentHome(tmp_path / "home")
    create_identity(home.key_path)
    coordinator_key = b64e(public_key_bytes(Ed25519PrivateKey.generate()))
    home.save_config(AgentConfig(url, "dev-1", coordinator_key, str(tmp_path / "data.csv")))
    return Agent(home)


def test_the_agent_offers_to_wait_for_a_task(
    scripted_coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AICFL_AGENT_WAIT", raising=False)
    scripted_coordinator.reply("POST", CHECKIN, 200, {"retry_after": 0.0, "task": None})
    scripted_coordinator.reply("POST", CHECKIN, 401, {"detail": "revoked"})  # ends the run
    assert make_agent(tmp_path, scripted_coordinator.url).run() == 3
    first = scripted_coordinator.requests_to("POST", CHECKIN)[0].json()
    assert first["wait"] == LONG_POLL_SECONDS


def test_an_agent_asked_to_stop_does_not_wait_for_its_held_checkin(
    scripted_coordinator, tmp_path: Path
) -> None:
    scripted_coordinator.reply("POST", CHECKIN, 200, {"retry_after": 0.0, "task": None}, delay=20.0)
    agent = make_agent(tmp_path, scripted_coordinator.url)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(agent.run()), daemon=True)
    runner.start()
    time.sleep(0.5)  # the check-in is held by the coordinator
    asked = time.monotonic()
    agent.request_stop()
    runner.join(5)
    assert codes == [0] and time.monotonic() - asked < 1.0


def test_a_coordinator_that_refuses_the_wait_field_is_polled_as_before(
    scripted_coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AICFL_AGENT_WAIT", raising=False)
    scripted_coordinator.reply("POST", CHECKIN, 422, {"detail": "wait: Extra inputs are not permitted"})
    scripted_coordinator.reply("POST", CHECKIN, 401, {"detail": "revoked"})
    assert make_agent(tmp_path, scripted_coordinator.url).run() == 3
    first, second = (r.json() for r in scripted_coordinator.requests_to("POST", CHECKIN))
    assert "wait" in first and "wait" not in second
