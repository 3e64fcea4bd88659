"""How the HTTP clients sort failures: retry later, give up with the coordinator's reason, or say what to fix.

The agent's :class:`SignedClient` splits answers into transient (no answer,
429, 5xx: back off and retry) and refusals (4xx: the same request will not
succeed). The operators' and cluster's :class:`ApiClient` turns every failure
into one line for a person, exit code 2 when no answer came.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_agent.transport import CoordinatorError, SignedClient, TransientError
from shared.api_client import ApiClient, CliError


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.mark.parametrize("status", [429, 500, 503])
def test_agent_treats_429_and_5xx_as_transient(status: int, scripted_coordinator, key) -> None:
    scripted_coordinator.reply("POST", "/v1/x", status, {"detail": "busy"})
    client = SignedClient(scripted_coordinator.url, "dev-1", key)
    with pytest.raises(TransientError, match=f"^POST /v1/x: HTTP {status}$"):
        client.post_json("/v1/x", {})
    client.close()


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        ({"json_body": {"detail": "round 3 is over"}}, "round 3 is over"),
        ({"json_body": {"title": "Conflict"}}, '{"title": "Conflict"}'),  # no detail: the whole body
        ({"text": "<html>refused by the proxy</html>"}, "<html>refused by the proxy</html>"),
    ],
)
def test_agent_gives_up_on_a_4xx_with_the_coordinators_reason(
    reply: dict[str, object], detail: str, scripted_coordinator, key
) -> None:
    scripted_coordinator.reply("POST", "/v1/x", 409, **reply)  # type: ignore[arg-type]
    client = SignedClient(scripted_coordinator.url, "dev-1", key)
    with pytest.raises(CoordinatorError) as err:
        client.post_json("/v1/x", {"a": 1})
    client.close()
    assert (err.value.status, err.value.detail) == (409, detail)
    assert str(err.value) == f"{detail} (HTTP 409)"


def test_agent_treats_no_answer_as_transient(refused_url: str, key) -> None:
    client = SignedClient(refused_url, "dev-1", key)
    with pytest.raises(TransientError, match="^GET /v1/x: "):
        client.request("GET", "/v1/x")
    client.close()


def test_operator_sees_the_body_of_an_error_that_is_not_json(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs", 502, text="upstream connect error")
    with pytest.raises(CliError) as err:
        ApiClient(scripted_coordinator.url, "t").json("GET", "/v1/jobs")
    assert str(err.value) == "upstream connect error (HTTP 502)" and err.value.code == 1


def test_operator_without_a_valid_token_is_told_how_to_give_one(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs", 401, {"detail": "missing or invalid bearer token"})
    with pytest.raises(CliError) as err:
        ApiClient(scripted_coordinator.url, None).json("GET", "/v1/jobs")
    assert str(err.value) == "missing or invalid bearer token (set AICFL_TOKEN or pass --token) (HTTP 401)"
    assert "Authorization" not in scripted_coordinator.received[0].headers


def test_operator_request_that_times_out_is_one_line_with_exit_code_2(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs", 200, [], delay=1.0)
    with pytest.raises(CliError) as err:
        ApiClient(scripted_coordinator.url, "t", timeout=0.2).json("GET", "/v1/jobs")
    assert str(err.value).startswith(f"request to {scripted_coordinator.url}/v1/jobs failed: ")
    assert err.value.code == 2


def test_operator_gets_none_for_an_empty_answer(scripted_coordinator) -> None:
    scripted_coordinator.reply("POST", "/v1/jobs/1/cancel", 204)
    assert ApiClient(scripted_coordinator.url, "t").json("POST", "/v1/jobs/1/cancel") is None
    assert scripted_coordinator.received[0].headers["Authorization"] == "Bearer t"


PROXY_PAGE = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n<h1>502 Bad Gateway</h1>\n</body>\n</html>\n"


def test_operator_sees_one_line_for_an_html_error_page(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs", 502, text=PROXY_PAGE)
    with pytest.raises(CliError) as err:
        ApiClient(scripted_coordinator.url, "t").json("GET", "/v1/jobs")
    assert str(err.value) == "502 Bad Gateway (HTTP 502)"


def test_operator_sees_one_line_for_a_json_error_that_is_not_a_problem(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs", 400, ["not", "an", "object"])
    with pytest.raises(CliError) as err:
        ApiClient(scripted_coordinator.url, "t").json("GET", "/v1/jobs")
    assert str(err.value) == '["not", "an", "object"] (HTTP 400)'


def test_operator_is_told_when_the_url_answers_but_not_as_a_coordinator(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs", 200, text="<html><title>Welcome to nginx!</title></html>")
    with pytest.raises(CliError) as err:
        ApiClient(scripted_coordinator.url, "t").json("GET", "/v1/jobs")
    assert str(err.value) == (
        f"{scripted_coordinator.url}/v1/jobs answered with HTTP 200 text/plain, not JSON:"
        " 'Welcome to nginx!' (is the URL a coordinator's?)"
    )
    assert "\n" not in str(err.value)


def test_agent_sends_the_very_same_message_again_after_a_lost_answer(
    scripted_coordinator, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator restarted mid-request: the agent sends the message it made again, byte for byte;
    it never makes a second one (a masked input made twice would carry fresh masks)."""
    from client_agent.loop import BINARY
    from tests.unit.test_agent_loop import make_agent, task

    path = "/v1/device/rounds/7/input"
    scripted_coordinator.reply("POST", path, 503, {"detail": "restarting"})
    scripted_coordinator.reply("POST", path, 200, {"accepted": True})
    agent = make_agent(tmp_path, scripted_coordinator.url)
    made: list[bytes] = []

    def train(_task: object) -> bytes:
        made.append(f"update {len(made)}".encode())  # each one different, as a masked input is
        return made[-1]

    monkeypatch.setattr(agent.worker, "train", train)
    with pytest.raises(TransientError):
        agent.handle(task(7, "input", "train"))
    assert agent.state.stages_sent == []
    agent.handle(task(7, "input", "train"))
    first, second = scripted_coordinator.requests_to("POST", path)
    assert made == [b"update 0"] and first.body == second.body == b"update 0"
    assert second.headers["Content-Type"] == BINARY
    assert agent.state.stages_sent == ["input"] and agent.outbox == {}


def test_agent_enroll_against_something_that_is_not_a_coordinator_is_one_line(
    scripted_coordinator, tmp_path
) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a,y\n1,yes\n")
    for status, said in [
        (200, "answered the enrollment with HTTP 200, not as a coordinator does"),
        (502, "enrollment refused: 502 Bad Gateway (HTTP 502)"),
    ]:
        scripted_coordinator.script.clear()
        scripted_coordinator.reply("POST", "/v1/enroll", status, text=PROXY_PAGE)
        shown = subprocess.run(
            [sys.executable, "-m", "client_agent", "enroll", "--coordinator", scripted_coordinator.url]
            + ["--token", "t", "--data", str(data), "--home", str(tmp_path / f"home-{status}")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 1 and shown.stdout == "", shown
        assert shown.stderr.startswith("error: ") and shown.stderr.count("\n") == 1, shown.stderr
        assert said in shown.stderr
