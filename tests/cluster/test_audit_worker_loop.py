"""The audit worker's loop (training_cluster/audit_worker.py) against an in-memory coordinator.

The coordinator side here is a stand-in with the ClusterApi surface, so that
the loop's own decisions can be checked one by one: what it fetches, what it
reports, how it survives failures. The queue, the leases and the HTTP API
themselves are tested with the real server by the coordinator's tests.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shared.api_client import CliError
from shared.jobspec import validate_spec
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from shared.zoo import architecture, build_model, flatten_parameters
from training_cluster.audit_worker import is_transient, one_line, run_worker


class FakeCoordinator:
    """The ClusterApi methods the worker calls, over a list of queued audits of one job."""

    def __init__(
        self, frame: pd.DataFrame, spec: dict[str, Any], pre: Preprocessor, versions: list[np.ndarray]
    ):
        self.spec = spec
        self.pre = pre
        self.csv = frame.to_csv(index=False).encode()
        self.arch = architecture(validate_spec(spec).model, pre.input_dim, pre.output_dim)
        self.vectors = dict(enumerate(versions))
        self.queue = [
            {"id": 100 + v, "job_id": 1, "version": v, "attempt": 1, "previous_version": v - 1 if v else None}
            for v in range(len(versions))
        ]
        self.audits: dict[int, dict[str, Any]] = {}
        self.completed: list[dict[str, Any]] = []
        self.failed: list[tuple[int, str]] = []
        self.calls: list[str] = []
        self.claim_errors: list[CliError] = []
        self.complete_errors: list[CliError] = []

    def claim_audit(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        self.calls.append("claim")
        if self.claim_errors:
            raise self.claim_errors.pop(0)
        return self.queue.pop(0) if self.queue else None

    def job(self, job_id: int) -> dict[str, Any]:
        self.calls.append("job")
        return {"id": job_id, "spec": self.spec, "preprocess": self.pre.to_dict(), "status": "running"}

    def reference(self, job_id: int) -> bytes:
        self.calls.append("reference")
        return self.csv

    def model(self, job_id: int, version: int) -> tuple[dict[str, Any], np.ndarray]:
        self.calls.append(f"model {version}")
        header = {"kind": "model", "job_id": job_id, "version": version, "arch": self.arch}
        return {**header, "preprocess": self.pre.to_dict()}, self.vectors[version]

    def audit(self, job_id: int, version: int) -> dict[str, Any] | None:
        self.calls.append(f"audit {version}")
        return self.audits.get(version)

    def baseline(self, job_id: int) -> dict[str, Any] | None:
        return None

    def complete_audit(self, audit_id: int, worker: str, **kw: Any) -> dict[str, Any]:
        if self.complete_errors:
            raise self.complete_errors.pop(0)
        self.completed.append({"id": audit_id, "worker": worker, **kw})
        version = audit_id - 100
        self.audits[version] = {"status": "done", "verdict": kw["verdict"], "report": kw["report"]}
        return {"id": audit_id, "status": "done"}

    def fail_audit(self, audit_id: int, worker: str, error: str) -> dict[str, Any]:
        self.failed.append((audit_id, error))
        self.audits[audit_id - 100] = {"status": "queued", "error": error, "report": None}
        return {"id": audit_id, "status": "queued"}


@pytest.fixture(scope="module")
def iris_job() -> tuple[pd.DataFrame, dict[str, Any], Preprocessor, list[np.ndarray]]:
    from sklearn.datasets import load_iris

    bunch = load_iris(as_frame=True)
    frame = bunch.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["species"] = [str(bunch.target_names[t]) for t in frame.pop("target")]
    features = [{"name": c, "type": "numeric"} for c in frame.columns if c != "species"]
    spec = {
        "name": "iris",
        "rounds": 3,
        "data": {"features": features, "target": "species", "task": "multiclass"},
        "model": {"zoo": "mlp", "hidden": [8]},
        "audit": {"rows": 60, "background": 20, "validate_rows": 0},
    }
    schema = validate_spec(spec).data
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(frame, schema)]), schema)
    arch = architecture(validate_spec(spec).model, pre.input_dim, pre.output_dim)
    versions = [flatten_parameters(build_model(arch, seed=s)) for s in (1, 2, 3)]
    return frame, spec, pre, versions


def _quiet(lines: list[str]):
    return lines.append


def test_worker_audits_every_queued_version_and_compares_with_the_previous_report(iris_job) -> None:
    coordinator = FakeCoordinator(*iris_job)
    lines: list[str] = []

    done = run_worker(coordinator, "w1", once=True, poll=0.01, log=_quiet(lines))  # type: ignore[arg-type]

    assert done == 3
    assert [c["id"] for c in coordinator.completed] == [100, 101, 102]
    first, second = coordinator.completed[0], coordinator.completed[1]
    assert first["report"]["drift"]["rank_correlation"] is None
    assert second["report"]["previous_version"] == 0
    assert second["report"]["drift"]["rank_correlation"] is not None
    assert second["verdict"] in ("ok", "drift") and second["seconds"] > 0
    assert set(second["plots"]) == {"importance.png", "beeswarm.png"}
    # The reference rows are fetched once per job; with the previous reports at hand, no model twice.
    assert coordinator.calls.count("reference") == 1
    assert [c for c in coordinator.calls if c.startswith("model")] == ["model 0", "model 1", "model 2"]
    assert any("audit 101" in line and "top:" in line for line in lines)


def test_without_a_previous_report_its_importances_come_from_its_model(iris_job) -> None:
    frame, spec, pre, versions = iris_job
    coordinator = FakeCoordinator(frame, spec, pre, versions)
    coordinator.queue = coordinator.queue[2:]  # only version 2; version 1 was never audited

    assert run_worker(coordinator, "w1", once=True, poll=0.01, log=_quiet([])) == 1  # type: ignore[arg-type]

    report = coordinator.completed[0]["report"]
    assert "model 1" in coordinator.calls
    assert report["previous_version"] == 1
    assert report["drift"]["rank_correlation"] is not None


def test_a_failing_audit_is_reported_in_one_line_and_the_loop_goes_on(iris_job) -> None:
    frame, spec, pre, versions = iris_job
    broken = [versions[0], np.full(3, np.nan, dtype=np.float32), versions[2]]
    coordinator = FakeCoordinator(frame, spec, pre, broken)
    lines: list[str] = []

    done = run_worker(coordinator, "w1", once=True, poll=0.01, log=_quiet(lines))  # type: ignore[arg-type]

    assert done == 1  # v0 done; v1 fails; v2 needs v1's importances, which cannot be computed either
    assert [audit_id for audit_id, _ in coordinator.failed] == [101, 102]
    for _, error in coordinator.failed:
        assert "\n" not in error and "cannot load the model" in error
    assert any("failed" in line for line in lines)


def test_an_unreachable_coordinator_is_waited_out(iris_job) -> None:
    coordinator = FakeCoordinator(*iris_job)
    coordinator.queue = coordinator.queue[:1]
    coordinator.claim_errors = [CliError("cannot reach the coordinator", code=2), CliError("busy (HTTP 503)")]
    coordinator.complete_errors = [CliError("request failed: timed out", code=2)]
    lines: list[str] = []

    assert run_worker(coordinator, "w1", once=True, poll=0.01, log=_quiet(lines)) == 1  # type: ignore[arg-type]

    assert sum("retrying" in line for line in lines) == 3


def test_a_report_refused_because_the_lease_expired_is_not_counted(iris_job) -> None:
    coordinator = FakeCoordinator(*iris_job)
    coordinator.queue = coordinator.queue[:1]
    coordinator.complete_errors = [CliError("audit 100 is not held by w1 (HTTP 409)")]

    assert run_worker(coordinator, "w1", once=True, poll=0.01, log=_quiet([])) == 0  # type: ignore[arg-type]
    assert coordinator.failed == []


def test_stop_ends_the_loop_after_the_audit_in_progress(iris_job) -> None:
    coordinator = FakeCoordinator(*iris_job)
    stop = threading.Event()
    original = coordinator.complete_audit

    def complete_then_stop(audit_id: int, worker: str, **kw: Any) -> dict[str, Any]:
        stop.set()  # as a SIGTERM handler would, while the first audit runs
        return original(audit_id, worker, **kw)

    coordinator.complete_audit = complete_then_stop  # type: ignore[method-assign]

    done = run_worker(coordinator, "w1", poll=0.01, stop=stop, log=_quiet([]))  # type: ignore[arg-type]

    assert done == 1 and len(coordinator.queue) == 2


def test_error_classification() -> None:
    assert is_transient(CliError("cannot reach", code=2))
    assert is_transient(CliError("oops (HTTP 502)"))
    assert not is_transient(CliError("no such job (HTTP 404)"))
    assert not is_transient(ValueError("x"))
    assert one_line(ValueError("a\nb  c")) == "ValueError: a b c"
