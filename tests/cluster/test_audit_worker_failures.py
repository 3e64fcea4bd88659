"""The audit worker when the coordinator fails it: when it gives up, what it reports, what it leaves to the lease.

As in test_audit_worker_loop.py, the coordinator is an in-memory stand-in with
the ClusterApi surface, scripted to fail; no audit here reaches shap.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pandas as pd

from shared.api_client import CliError
from shared.jobspec import validate_spec
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from training_cluster.audit_worker import run_worker

UNREACHABLE = CliError("cannot reach the coordinator at http://127.0.0.1:9: refused", code=2)
SPEC = {
    "name": "t",
    "rounds": 1,
    "data": {"features": [{"name": "x", "type": "numeric"}], "target": "y", "task": "binary"},
}
FRAME = pd.DataFrame({"x": [0.5, 1.5, 2.5, 3.5], "y": ["no", "yes", "no", "yes"]})


class ScriptedApi:
    """Claims from a list; each other call answers or raises as the test sets it."""

    def __init__(self, claims: Sequence[dict[str, Any] | None], **errors: CliError) -> None:
        self.claims = list(claims)
        self.errors = errors
        self.calls: list[str] = []
        self.failed: list[tuple[int, str]] = []
        schema = validate_spec(SPEC).data
        self.pre = Preprocessor.from_statistics(merge_statistics([local_statistics(FRAME, schema)]), schema)

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.errors:
            raise self.errors[name]

    def claim_audit(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        self._maybe_fail("claim")
        return self.claims.pop(0) if self.claims else None

    def job(self, job_id: int) -> dict[str, Any]:
        self._maybe_fail("job")
        return {"id": job_id, "spec": SPEC, "preprocess": self.pre.to_dict(), "status": "running"}

    def reference(self, job_id: int) -> bytes:
        self.calls.append(f"reference {job_id}")
        return FRAME.to_csv(index=False).encode()

    def model(self, job_id: int, version: int) -> Any:
        self._maybe_fail("model")
        raise AssertionError("not reached")

    def fail_audit(self, audit_id: int, worker: str, error: str) -> dict[str, Any]:
        self._maybe_fail("fail")
        self.failed.append((audit_id, error))
        return {"id": audit_id, "status": "queued"}


def claim(audit_id: int, job_id: int = 1) -> dict[str, Any]:
    return {"id": audit_id, "job_id": job_id, "version": 1, "attempt": 1, "previous_version": 0}


def run(api: ScriptedApi, lines: list[str], **kw: Any) -> int:
    return run_worker(api, "w1", once=True, poll=0.01, log=lines.append, **kw)  # type: ignore[arg-type]


def test_a_worker_run_once_stops_after_a_few_tries_at_an_unreachable_coordinator() -> None:
    api = ScriptedApi([], claim=UNREACHABLE)
    lines: list[str] = []
    assert run(api, lines) == 0
    assert api.calls == ["claim"] * 5
    assert sum("retrying" in line for line in lines) == 4
    assert lines[-1] == f"audit worker w1: claiming an audit: {UNREACHABLE}; stopping"


def test_stop_while_waiting_to_retry_ends_the_worker_at_once() -> None:
    stop = threading.Event()
    api = ScriptedApi([], claim=UNREACHABLE)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "retrying" in line:
            stop.set()  # as a SIGTERM handler would during the back-off

    assert run_worker(api, "w1", once=True, poll=30, stop=stop, log=log) == 0  # type: ignore[arg-type]
    assert api.calls == ["claim"] and lines[-1].endswith("; stopping")


def test_a_refused_claim_is_not_retried_by_a_worker_run_once() -> None:
    api = ScriptedApi([], claim=CliError("invalid bearer token (HTTP 401)"))
    lines: list[str] = []
    assert run(api, lines) == 0
    assert api.calls == ["claim"]
    assert lines == ["audit worker w1: claim refused: invalid bearer token (HTTP 401)"]


def test_an_audit_whose_inputs_cannot_be_fetched_is_left_to_its_lease_not_failed() -> None:
    api = ScriptedApi([claim(7)], job=UNREACHABLE)
    lines: list[str] = []
    assert run(api, lines) == 0
    assert api.failed == [] and "fail" not in api.calls  # a dead coordinator is no fault of the audit
    assert any(
        line.startswith("audit 7 (job 1 v1, attempt 1): coordinator unavailable (fetching job 1: ")
        and line.endswith("the audit goes back to the queue when its lease ends")
        for line in lines
    )


def test_a_failure_the_coordinator_will_not_record_is_left_to_the_lease() -> None:
    api = ScriptedApi(
        [claim(7)],
        job=CliError("no such job (HTTP 404)"),
        fail=CliError("audit 7 is not held by w1 (HTTP 409)"),
    )
    lines: list[str] = []
    assert run(api, lines) == 0
    assert "audit 7 (job 1 v1, attempt 1): failed: CliError: no such job (HTTP 404)" in lines
    assert lines[-1] == (
        "audit 7 (job 1 v1, attempt 1): could not record the failure"
        " (audit 7 is not held by w1 (HTTP 409)); its lease will expire"
    )


def test_the_worker_keeps_the_reference_rows_of_at_most_eight_jobs() -> None:
    # Each audit fails at its model (no shap needed); what matters is which references are fetched.
    claims = [claim(100 + j, job_id=j) for j in range(1, 10)] + [claim(200, job_id=9), claim(201, job_id=1)]
    api = ScriptedApi(claims, model=CliError("version 1 not found (HTTP 404)"))
    assert run(api, []) == 0
    fetched = [c for c in api.calls if c.startswith("reference")]
    # Jobs 1..9 once each; job 9 is still cached, job 1 (the oldest of nine) was dropped and comes again.
    assert fetched == [f"reference {j}" for j in range(1, 10)] + ["reference 1"]
    assert [audit_id for audit_id, _ in api.failed] == [*range(101, 110), 200, 201]


def test_a_failure_report_that_meets_a_busy_coordinator_is_retried() -> None:
    api = ScriptedApi([claim(7)], job=CliError("no such job (HTTP 404)"))
    failures = [CliError("busy (HTTP 503)")]
    original = api.fail_audit

    def fail_once_then_record(audit_id: int, worker: str, error: str) -> dict[str, Any]:
        if failures:
            raise failures.pop()
        return original(audit_id, worker, error)

    api.fail_audit = fail_once_then_record  # type: ignore[method-assign]
    lines: list[str] = []
    assert run(api, lines) == 0
    assert api.failed == [(7, "CliError: no such job (HTTP 404)")]
    assert any("reporting the failure of audit 7 failed" in line and "retrying" in line for line in lines)
