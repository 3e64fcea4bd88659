"""The training cluster's API client: waiting for a job's statistics round, and audits that are not there."""

from __future__ import annotations

import time

import pytest

from shared.api_client import CliError
from training_cluster.api import ClusterApi

RUNNING = {"id": 4, "status": "running", "preprocess": None}


def api(url: str) -> ClusterApi:
    return ClusterApi.connect(url, "aicfl_op_x")


def test_waiting_for_the_statistics_round_returns_the_job_once_it_has_its_preprocessing(
    scripted_coordinator,
) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs/4", 200, RUNNING)
    scripted_coordinator.reply("GET", "/v1/jobs/4", 200, {**RUNNING, "preprocess": {"format": "p"}})
    job = api(scripted_coordinator.url).wait_for_preprocess(4, timeout=30, poll=0.01)
    assert job["preprocess"] == {"format": "p"}
    assert len(scripted_coordinator.requests_to("GET", "/v1/jobs/4")) == 2


@pytest.mark.parametrize("status", ["failed", "cancelled", "completed"])
def test_a_job_that_ended_before_its_statistics_round_is_not_waited_for(
    status: str, scripted_coordinator
) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs/4", 200, {**RUNNING, "status": status})
    started = time.monotonic()
    with pytest.raises(CliError, match=f"^job 4 is {status} before its statistics round finished$"):
        api(scripted_coordinator.url).wait_for_preprocess(4, timeout=30, poll=0.01)
    assert time.monotonic() - started < 5


def test_waiting_for_the_statistics_round_gives_up_at_the_timeout(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs/4", 200, RUNNING)
    with pytest.raises(CliError) as err:
        api(scripted_coordinator.url).wait_for_preprocess(4, timeout=0.2, poll=0.05)
    assert str(err.value) == (
        "job 4's statistics round did not finish within 0 s:"
        " its preprocessing (and so the network's input size) is not known yet"
    )
    assert len(scripted_coordinator.requests_to("GET", "/v1/jobs/4")) >= 2


def test_a_version_without_an_audit_reads_as_none_but_other_errors_are_raised(scripted_coordinator) -> None:
    scripted_coordinator.reply("GET", "/v1/jobs/4/audits/2", 404, {"detail": "version 2 has no audit"})
    scripted_coordinator.reply("GET", "/v1/jobs/4/audits/3", 500, {"detail": "database is locked"})
    scripted_coordinator.reply("GET", "/v1/jobs/4/audits/1", 200, {"status": "done", "verdict": "ok"})
    client = api(scripted_coordinator.url)
    assert client.audit(4, 2) is None
    assert client.audit(4, 1) == {"status": "done", "verdict": "ok"}
    with pytest.raises(CliError, match=r"^database is locked \(HTTP 500\)$"):
        client.audit(4, 3)


def test_a_failed_audit_is_reported_with_the_worker_and_the_error(scripted_coordinator) -> None:
    scripted_coordinator.reply("POST", "/v1/audits/9/fail", 200, {"id": 9, "status": "queued", "attempt": 2})
    answer = api(scripted_coordinator.url).fail_audit(9, "w1", "AuditError: no rows")
    assert answer == {"id": 9, "status": "queued", "attempt": 2}
    (sent,) = scripted_coordinator.received
    assert sent.json() == {"worker": "w1", "error": "AuditError: no rows"}
    assert sent.headers["Authorization"] == "Bearer aicfl_op_x"
