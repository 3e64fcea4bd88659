"""The engine's bounds on one device (docs/robustness.md), on SQLite and PostgreSQL: a plain update out
of bounds is refused with the reason and its sender excluded; an aggregate out of bounds gives a
``rejected`` round with the model kept; rejected rounds count toward the failure in a row."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from coordinator import driver, registry
from coordinator.engine import Federation
from coordinator.errors import Invalid
from coordinator.models import Event, Job, ModelVersion, Participant

from .test_engine_store import (
    checkin_all,
    current_round,
    enroll,
    fed,
    open_train_round,
    run_stats_round,
    spec,
    update,
)
from .test_secure_engine import STAGES, Rig, rig

__all__ = ["fed", "rig"]  # the fixtures, imported for their side effect on pytest


def robust_spec(robustness: dict[str, Any], **kw: Any) -> dict[str, Any]:
    strategy = kw.pop("strategy_table", None)
    out = {**spec(**kw), "robustness": robustness}
    if strategy:
        out["strategy"] = strategy
    return out


def start_training(
    fed: Federation, job_spec: dict[str, Any], n: int = 3
) -> tuple[int, list[str], dict, np.ndarray]:
    devices = enroll(fed, n)
    job = fed.jobs.submit(job_spec, "op")
    run_stats_round(fed, job.id, devices)
    with fed.read() as s:
        _, w0 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 0))
    return job.id, devices, open_train_round(fed, devices), w0


def job_state(fed: Federation, job_id: int) -> tuple[str, int | None, int, int]:
    with fed.read() as s:
        job = s.get(Job, job_id)
        assert job is not None
        versions = s.query(ModelVersion).filter(ModelVersion.job_id == job_id).count()
        return job.status, job.current_version, job.rounds_completed, versions


def test_an_update_over_the_norm_bound_is_refused_and_its_sender_excluded(fed: Federation) -> None:
    job_id, devices, tasks, w0 = start_training(fed, robust_spec({"max_update_norm": 10.0}))
    poisoner, *honest = devices
    rid = tasks[poisoner].round_id
    with pytest.raises(
        Invalid,
        match=r"update refused: the update's L2 norm per example is .*robustness.max_update_norm = 10",
    ):
        fed.devices.update(poisoner, rid, update(rid, np.full(w0.size, 3e38, np.float32), 1))
    deltas = {d: np.full(w0.size, 0.01 * (i + 1), np.float32) for i, d in enumerate(honest)}
    for d in honest:
        fed.devices.update(d, rid, update(rid, deltas[d] * np.float32(10), 10))
    r = current_round(fed, job_id)
    assert r.status == "completed"  # the round went on without waiting for the excluded device
    with fed.read() as s:
        p = s.query(Participant).filter(Participant.round_id == rid, Participant.device_id == poisoner).one()
        assert p.status == "excluded" and "max_update_norm" in (p.reason or "")
        _, w1 = registry.load_vector(fed.blobs, registry.get_version(s, job_id, 1))
    np.testing.assert_allclose(w1, w0 + (deltas[honest[0]] + deltas[honest[1]]) / 2, rtol=1e-6)


@pytest.mark.parametrize(
    ("vec", "n", "reason"),
    [
        (np.nan, 1, "NaN or infinite values"),  # the codec refuses it first
        (0.0, 51, "num_examples 51 exceeds robustness.max_weight = 50"),
    ],
    ids=["nan", "weight"],
)
def test_a_nan_update_or_an_excess_weight_is_refused(
    fed: Federation, vec: float, n: int, reason: str
) -> None:
    _, devices, tasks, w0 = start_training(fed, robust_spec({"max_weight": 50}))
    rid = tasks[devices[0]].round_id
    with pytest.raises(Invalid, match=reason):
        fed.devices.update(devices[0], rid, update(rid, np.full(w0.size, vec, np.float32), n))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (3e38, "aggregate rejected: the aggregate holds .* non-finite parameters"),
        (
            20.0,
            "aggregate rejected: the aggregate's largest parameter is .* above robustness.max_parameter = 5",
        ),
    ],
    ids=["non-finite", "max_parameter"],
)
def test_an_aggregate_out_of_bounds_is_rejected_and_the_model_kept(
    fed: Federation, value: float, reason: str
) -> None:
    # Each update is within its own bound; their sum is not (float32 overflows, or too large a parameter).
    job_id, devices, tasks, w0 = start_training(
        fed, robust_spec({"max_update_norm": 1e300, "max_parameter": 5.0})
    )
    with np.errstate(over="ignore"):
        for d, t in tasks.items():
            fed.devices.update(d, t.round_id, update(t.round_id, np.full(w0.size, value, np.float32), 1))
    r = current_round(fed, job_id)
    assert r.status == "rejected"
    assert r.reason is not None and re.search(reason, r.reason), r.reason
    assert job_state(fed, job_id) == ("running", 0, 0, 1)  # version 0 only, still current
    with fed.read() as s:
        assert [e.detail["reason"] for e in s.query(Event).filter(Event.action == "round.reject")] == [
            r.reason
        ]
    checkin_all(fed, devices)
    fed.tick()  # the job goes on from the last good version
    nxt = current_round(fed, job_id)
    assert (nxt.kind, nxt.status, nxt.model_version_in) == ("train", "running", 0)


def test_rejected_rounds_count_toward_the_failure_in_a_row(
    fed: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver, "MAX_CONSECUTIVE_ABANDONED", 2)
    now = [1_000.0]
    fed.clock = lambda: now[0]
    job_id, devices, tasks, w0 = start_training(
        fed, robust_spec({"max_update_norm": 1e300, "max_parameter": 5.0}, stage_timeout=5)
    )
    now[0] += 6  # nobody sends an update: the round is abandoned
    fed.tick()
    assert current_round(fed, job_id).status == "abandoned"
    assert job_state(fed, job_id)[0] == "running"
    tasks = open_train_round(fed, devices)
    for d, t in tasks.items():
        fed.devices.update(d, t.round_id, update(t.round_id, np.full(w0.size, 20.0, np.float32), 1))
    assert current_round(fed, job_id).status == "rejected"
    with fed.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed"
        assert (job.reason or "").startswith(
            "2 rounds in a row were abandoned or rejected; last: aggregate rejected"
        )
        assert job.current_version == 0


def test_a_robust_rule_outvotes_one_poisoned_update(fed: Federation) -> None:
    job_spec = robust_spec(
        {"max_update_norm": 1e6, "max_weight": 1000},
        target=3,
        minimum=3,
        strategy_table={"name": "fedmedian"},
    )
    job_id, devices, tasks, w0 = start_training(fed, job_spec)
    poisoner, *honest = devices
    for i, (d, t) in enumerate(tasks.items()):
        delta = np.full(w0.size, 100.0 if d == poisoner else 0.01 * (i + 1), np.float32)
        n = 1000 if d == poisoner else 10
        fed.devices.update(d, t.round_id, update(t.round_id, delta * np.float32(n), n))
    assert current_round(fed, job_id).status == "completed"
    with fed.read() as s:
        _, w1 = registry.load_vector(fed.blobs, registry.get_version(s, job_id, 1))
    assert np.abs(w1 - w0).max() <= 0.03 + 1e-6  # the median of the three: an honest device's update


def test_a_secure_model_past_max_parameter_is_rejected_and_not_registered(rig: Callable[..., Rig]) -> None:  # noqa: F811
    # Every device follows the protocol; the model it sums to has parameters above the bound (version 0's
    # own are): under SecAgg+ the coordinator sees only that model, and still refuses it.
    r = rig(4, robustness={"max_parameter": 1e-6})
    for name in STAGES:
        r.stage(name)
    row = r.round_row()
    assert row["status"] == "rejected", row
    assert "robustness.max_parameter" in row["reason"], row["reason"]
    assert r.version_count() == 1  # no version beyond version 0
