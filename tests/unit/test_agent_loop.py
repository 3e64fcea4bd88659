"""The agent's check-in loop against a scripted coordinator: when it stops, retries, skips or records."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_agent.config import AgentConfig, AgentHome, ResumeState
from client_agent.identity import create_identity
from client_agent.loop import Agent
from shared.signing import HEADER_DEVICE, b64e, public_key_bytes
from shared.wire import RoundKind, Stage, Task

CHECKIN = "/v1/device/checkin"
SPEC: dict[str, Any] = {
    "name": "t",
    "rounds": 1,
    "secure": False,
    "data": {
        "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical"}],
        "target": "y",
        "task": "binary",
    },
}


def make_agent(tmp_path: Path, url: str) -> Agent:
    data = tmp_path / "data.csv"
    data.write_text("a,b,y\n" + "".join(f"{i},{'xz'[i % 2]},{'yes' if i % 3 else 'no'}\n" for i in range(12)))
    home = AgentHome(tmp_path / "home")
    create_identity(home.key_path)
    coordinator_key = b64e(public_key_bytes(Ed25519PrivateKey.generate()))
    home.save_config(AgentConfig(url, "dev-1", coordinator_key, str(data)))
    return Agent(home)


def task(round_id: int, stage: Stage = "configure", kind: RoundKind = "stats") -> Task:
    return Task(round_id=round_id, job_id=1, round=0, kind=kind, stage=stage, deadline=0, seed=1, spec=SPEC)


def test_a_device_the_coordinator_no_longer_knows_stops_with_exit_code_3(
    scripted_coordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_coordinator.reply("POST", CHECKIN, 401, {"detail": "device dev-1 is revoked"})
    agent = make_agent(tmp_path, scripted_coordinator.url)
    with caplog.at_level(logging.ERROR, logger="aicfl.agent"):
        assert agent.run() == 3
    assert "the coordinator refused this device: device dev-1 is revoked" in caplog.text
    (checkin,) = scripted_coordinator.requests_to("POST", CHECKIN)
    assert checkin.headers[HEADER_DEVICE] == "dev-1"  # signed as this device


@pytest.mark.parametrize(
    ("status", "logged"),
    [
        (409, "request refused: conflict (HTTP 409); retrying in"),
        (429, "coordinator unavailable (POST /v1/device/checkin: HTTP 429); retrying in"),
        (503, "coordinator unavailable (POST /v1/device/checkin: HTTP 503); retrying in"),
    ],
)
def test_refused_or_failed_checkins_are_retried_after_a_backoff(
    status: int, logged: str, scripted_coordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_coordinator.reply("POST", CHECKIN, status, {"detail": "conflict"})
    scripted_coordinator.reply("POST", CHECKIN, 401, {"detail": "revoked"})  # ends the run
    agent = make_agent(tmp_path, scripted_coordinator.url)
    with caplog.at_level(logging.WARNING, logger="aicfl.agent"):
        assert agent.run() == 3
    assert logged in caplog.text
    assert len(scripted_coordinator.requests_to("POST", CHECKIN)) == 2


def test_a_task_for_an_older_round_than_the_last_one_worked_on_is_ignored(
    scripted_coordinator, tmp_path: Path
) -> None:
    agent = make_agent(tmp_path, scripted_coordinator.url)
    agent.state = ResumeState(round_id=5, stages_sent=["configure"], last_round_id=5)
    agent.stop.set()  # the pause after skipping returns at once
    agent.handle(task(round_id=4))
    assert scripted_coordinator.received == []
    assert agent.state == ResumeState(round_id=5, stages_sent=["configure"], last_round_id=5)


def test_a_stage_the_coordinator_refuses_is_recorded_and_never_sent_again(
    scripted_coordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = "/v1/device/rounds/7/configure"
    scripted_coordinator.reply("POST", path, 409, {"detail": "round 7 is over"})
    agent = make_agent(tmp_path, scripted_coordinator.url)
    agent.stop.set()
    with caplog.at_level(logging.WARNING, logger="aicfl.agent"):
        agent.handle(task(round_id=7))
    assert "round 7 stage configure not accepted: round 7 is over" in caplog.text
    sent = scripted_coordinator.requests_to("POST", path)
    assert len(sent) == 1 and sent[0].json()["accepted"] is True and sent[0].json()["rows"] > 0
    # What was sent survives a restart: a new agent on the same home does not send it again.
    again = Agent(agent.home)
    # ...and remembers the app it worked with, to import it ahead of the next round.
    assert again.state == ResumeState(
        round_id=7, stages_sent=["configure"], last_round_id=7, apps=["shared.apps.tabular:app"]
    )
    again.stop.set()
    again.handle(task(round_id=7))
    assert len(scripted_coordinator.requests_to("POST", path)) == 1


def test_apps_named_in_the_environment_or_worked_with_before_are_imported_before_the_first_checkin(
    scripted_coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "apps").mkdir()
    for name in ("preload_env_app", "preload_state_app"):
        (tmp_path / "apps" / f"{name}.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "apps"))
    monkeypatch.setenv("AICFL_AGENT_PRELOAD", "preload_env_app:app, no_such_app_anywhere:app")
    agent = make_agent(tmp_path, scripted_coordinator.url)
    agent.home.save_state(ResumeState(apps=["preload_state_app:app"]))
    agent = Agent(agent.home)
    assert "preload_env_app" not in sys.modules and "preload_state_app" not in sys.modules
    agent.stop.set()
    with caplog.at_level(logging.INFO, logger="aicfl.agent"):
        assert agent.run() == 0
    assert {"preload_env_app", "preload_state_app"} <= set(sys.modules)
    # An app that cannot be imported is logged, not fatal.
    assert (
        "cannot import app ahead of its rounds: app 'no_such_app_anywhere:app' does not import" in caplog.text
    )
    assert scripted_coordinator.received == []


def test_the_peak_memory_reported_is_this_process_s_not_the_parent_s_it_was_started_from() -> None:
    # ru_maxrss survives execve: a small agent started by a large parent would report the parent's
    # size. This parent grows to ~200 MB first; the child must report its own few tens of MB.
    import subprocess

    ballast = bytearray(200 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    out = subprocess.run(
        [sys.executable, "-c", "from client_agent.loop import peak_rss_mb; print(peak_rss_mb())"],
        capture_output=True,
        text=True,
        check=True,
    )
    del ballast
    assert float(out.stdout) < 150, out.stdout


def test_the_next_task_carried_by_a_stage_answer_is_worked_on_without_checking_in(
    scripted_coordinator, tmp_path: Path
) -> None:
    """A long-polling agent sends each stage with ?wait and takes its next task from the answer; an
    answer without one (a coordinator older than this, or nothing to do) sends it back to checking in."""
    configure, statistics = task(9, "configure"), task(9, "input")
    scripted_coordinator.reply(
        "POST", CHECKIN, 200, {"retry_after": 0, "task": configure.model_dump(mode="json")}
    )
    scripted_coordinator.reply(
        "POST", CHECKIN, 401, {"detail": "revoked"}
    )  # the second check-in ends the run
    scripted_coordinator.reply(
        "POST",
        "/v1/device/rounds/9/configure",
        200,
        {"ok": True, "next": {"retry_after": 0, "task": statistics.model_dump(mode="json")}},
    )
    scripted_coordinator.reply("POST", "/v1/device/rounds/9/input", 200, {"ok": True})
    agent = make_agent(tmp_path, scripted_coordinator.url)
    assert agent.wait > 0
    assert agent.run() == 3
    sent = [r.path for r in scripted_coordinator.received]
    assert sent == [CHECKIN, "/v1/device/rounds/9/configure", "/v1/device/rounds/9/input", CHECKIN]
    assert "statistics" in scripted_coordinator.requests_to("POST", "/v1/device/rounds/9/input")[0].json()
