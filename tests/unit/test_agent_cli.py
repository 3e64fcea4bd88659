"""``aicfl-agent``: every refusal is one line on stderr and exit 1; a failed enrollment can be retried."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_agent import cli
from client_agent.config import AgentConfig, AgentHome, ResumeState
from client_agent.identity import create_identity
from shared.signing import b64e, public_key_bytes

COORDINATOR_KEY = b64e(public_key_bytes(Ed25519PrivateKey.generate()))


def agent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run ``aicfl-agent ARGS`` in this process; its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["aicfl-agent", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("a,b,y\n1,x,yes\n2,z,no\n3,x,yes\n")
    return path


def enroll_args(url: str, data: Path, home: Path) -> list[str]:
    return [
        "enroll",
        "--coordinator",
        url,
        "--token",
        "aicfl_enr_0123456789",
        "--data",
        str(data),
        "--home",
        str(home),
    ]


def test_refused_enrollment_prints_the_coordinators_reason_and_enrolls_nothing(
    scripted_coordinator, monkeypatch, capsys, data: Path, tmp_path: Path
) -> None:
    scripted_coordinator.reply("POST", "/v1/enroll", 403, {"detail": "enrollment token expired"})
    home = tmp_path / "home"
    code, out, err = agent(monkeypatch, capsys, *enroll_args(scripted_coordinator.url, data, home))
    assert code == 1 and out == ""
    assert err == "error: enrollment refused: enrollment token expired (HTTP 403)\n"
    assert not AgentHome(home).config_path.exists()


def test_refusal_that_is_not_json_is_shown_as_its_text(
    scripted_coordinator, monkeypatch, capsys, data: Path, tmp_path: Path
) -> None:
    scripted_coordinator.reply("POST", "/v1/enroll", 502, text="Bad Gateway from the proxy")
    code, _, err = agent(monkeypatch, capsys, *enroll_args(scripted_coordinator.url, data, tmp_path / "h"))
    assert code == 1
    assert err == "error: enrollment refused: Bad Gateway from the proxy (HTTP 502)\n"


def test_enrollment_retried_after_a_refusal_keeps_the_identity_key_made_the_first_time(
    scripted_coordinator, monkeypatch, capsys, data: Path, tmp_path: Path
) -> None:
    scripted_coordinator.reply("POST", "/v1/enroll", 403, {"detail": "token expired"})
    scripted_coordinator.reply(
        "POST",
        "/v1/enroll",
        200,
        {"device_id": "dev-7", "coordinator_public_key": COORDINATOR_KEY, "signature_window_seconds": 300},
    )
    home = tmp_path / "home"
    args = enroll_args(scripted_coordinator.url, data, home)
    assert agent(monkeypatch, capsys, *args)[0] == 1
    code, out, _ = agent(monkeypatch, capsys, *args)
    assert (code, out) == (0, "enrolled as dev-7\n")
    first, second = (r.json()["public_key"] for r in scripted_coordinator.requests_to("POST", "/v1/enroll"))
    assert first == second  # the key made by the refused attempt, not a second one
    cfg = AgentHome(home).load_config()
    assert (cfg.device_id, cfg.coordinator_public_key, cfg.data) == ("dev-7", COORDINATOR_KEY, str(data))


def test_enrolling_an_enrolled_home_again_is_refused(
    scripted_coordinator, monkeypatch, capsys, data: Path, tmp_path: Path
) -> None:
    home = AgentHome(tmp_path / "home")
    home.save_config(AgentConfig(scripted_coordinator.url, "dev-1", COORDINATOR_KEY, str(data)))
    code, _, err = agent(monkeypatch, capsys, *enroll_args(scripted_coordinator.url, data, home.root))
    assert code == 1
    assert err == f"error: {home.root} is already enrolled; use another --home\n"
    assert scripted_coordinator.received == []  # nothing was sent


def test_unreachable_coordinator_at_enrollment_is_named(
    refused_url: str, monkeypatch, capsys, data: Path, tmp_path: Path
) -> None:
    code, _, err = agent(monkeypatch, capsys, *enroll_args(refused_url, data, tmp_path / "home"))
    assert code == 1
    assert err.startswith(f"error: cannot reach the coordinator at {refused_url}: ")
    assert len(err.splitlines()) == 1


def test_an_existing_identity_key_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    create_identity(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already holds an identity; use another --home"):
        create_identity(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("command", ["run", "status"])
def test_run_and_status_before_enrollment_say_to_enroll_first(
    command: str, monkeypatch, capsys, tmp_path: Path
) -> None:
    code, _, err = agent(monkeypatch, capsys, command, "--home", str(tmp_path / "nothing"))
    assert code == 1
    assert err == f"error: {tmp_path / 'nothing'} has no enrollment; run 'aicfl-agent enroll' first\n"


@pytest.mark.parametrize("content", ["{not json", '{"coordinator": "http://x"}', "[1, 2]"])
def test_damaged_enrollment_file_is_named(content: str, monkeypatch, capsys, tmp_path: Path) -> None:
    home = AgentHome(tmp_path / "home")
    home.root.mkdir()
    home.config_path.write_text(content)
    code, _, err = agent(monkeypatch, capsys, "status", "--home", str(home.root))
    assert code == 1
    assert err.startswith(f"error: {home.config_path} is damaged: ")


def test_status_shows_an_unreachable_coordinator_and_the_last_round(
    refused_url: str, monkeypatch, capsys, data: Path, tmp_path: Path
) -> None:
    home = AgentHome(tmp_path / "home")
    home.save_config(AgentConfig(refused_url, "dev-3", COORDINATOR_KEY, str(data), threads=2))
    home.save_state(ResumeState(round_id=12, stages_sent=["configure"], last_round_id=12))
    code, out, _ = agent(monkeypatch, capsys, "status", "--home", str(home.root))
    assert code == 0
    fields = {line[:24].strip(): line[24:].strip() for line in out.splitlines()}
    assert fields["device_id"] == "dev-3"
    assert fields["coordinator_reachable"].startswith("no (")
    assert fields["data_present"] == "True" and fields["threads"] == "2"
    assert fields["last_round_id"] == "12" and fields["stages_sent"] == "['configure']"
    code, out, _ = agent(monkeypatch, capsys, "status", "--home", str(home.root), "--json")
    info = json.loads(out)
    assert info["coordinator_reachable"].startswith("no (") and info["last_round_id"] == 12
