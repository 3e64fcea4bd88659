"""A job's life beyond the happy path, on SQLite and PostgreSQL: cancelled, refused reference data, a
job that fails (too many abandoned rounds, statistics that cannot be merged), and one job's failure
leaving the others running."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from coordinator import registry
from coordinator.engine import Federation
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.models import Event, Job, Participant, RoundMessage
from coordinator.rounds import DROPPED
from shared.wire import ConfigureMessage

from .test_engine_store import (
    checkin_all,
    current_round,
    enroll,
    fed,
    frame,
    open_train_round,
    run_stats_round,
    spec,
    update,
)

__all__ = ["fed"]  # the fixture, imported for its side effect on pytest


def job_row(fed: Federation, job_id: int) -> Job:
    with fed.read() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def events(fed: Federation, action: str) -> list[Event]:
    with fed.read() as s:
        return list(s.query(Event).filter(Event.action == action))


def test_cancel_abandons_the_running_round_and_keeps_the_model(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=3), "op")
    run_stats_round(fed, job.id, devices)
    tasks = open_train_round(fed, devices)
    first = next(iter(tasks.values()))
    assert first is not None and first.stage == "input"

    cancelled = fed.jobs.cancel(job.id, "alice")
    assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled by alice")
    r = current_round(fed, job.id)
    assert (r.status, r.reason) == ("abandoned", "job cancelled by the operator")
    assert job_row(fed, job.id).current_version == 0  # the model stays where it was
    assert [e.actor for e in events(fed, "job.cancel")] == ["alice"]

    # A device still holding its task is told the round is over; nothing new opens.
    d = next(iter(tasks))
    with pytest.raises(Conflict, match="is abandoned; the message is stale"):
        fed.devices.update(d, r.id, update(r.id, np.zeros(3, np.float32), 1))
    fed.tick()
    assert current_round(fed, job.id).id == r.id
    assert all(t is None for t in checkin_all(fed, devices).values())

    with pytest.raises(Conflict, match="already cancelled"):
        fed.jobs.cancel(job.id, "alice")
    with pytest.raises(NotFound, match="no job 999"):
        fed.jobs.cancel(999, "alice")


def test_reference_data_that_breaks_the_schema_is_refused_and_nothing_is_stored(fed: Federation) -> None:
    job = fed.jobs.submit(spec(), "op")
    with pytest.raises(NotFound, match="has no reference data"):
        fed.cluster.reference_bytes(job.id)
    missing_column = frame(0, 20).drop(columns=["b"]).to_csv(index=False).encode()
    with pytest.raises(Invalid, match="reference data: .*'b'"):
        fed.jobs.set_reference(job.id, missing_column, "op")
    assert job_row(fed, job.id).reference_sha256 is None
    with pytest.raises(NotFound, match="no job 999"):
        fed.jobs.set_reference(999, missing_column, "op")

    good = frame(0, 20).to_csv(index=False).encode()
    sha = fed.jobs.set_reference(job.id, good, "op")
    assert job_row(fed, job.id).reference_sha256 == sha and fed.cluster.reference_bytes(job.id) == good
    assert events(fed, "job.reference")[0].detail == {"rows": 20, "sha256": sha}


def test_twenty_abandoned_rounds_in_a_row_fail_the_job(fed: Federation) -> None:
    now = [1_000.0]
    fed.clock = lambda: now[0]
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(stage_timeout=5), "op")
    for n in range(20):
        checkin_all(fed, devices)
        fed.tick()  # opens the statistics round
        r = current_round(fed, job.id)
        assert (r.number, r.status) == (n, "running")  # rounds count from 0
        now[0] += 6  # nobody answers configure: all dropped, below the minimum
        fed.tick()
        r = current_round(fed, job.id)
        assert r.status == "abandoned" and "minimum" in (r.reason or "")
        assert job_row(fed, job.id).status == ("running" if n < 19 else "failed")
    failed = job_row(fed, job.id)
    assert failed.reason is not None and failed.reason.startswith("20 rounds in a row were abandoned; last:")
    with fed.read() as s:
        statuses = {p.status for p in s.query(Participant).filter(Participant.round_id == r.id)}
    assert statuses == {DROPPED}
    fed.tick()  # a failed job opens nothing more
    assert current_round(fed, job.id).number == 19


def test_statistics_that_fix_no_preprocessing_fail_the_job(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(), "op")
    checkin_all(fed, devices)
    fed.tick()
    for d, t in checkin_all(fed, devices).items():
        fed.devices.configure(d, t.round_id, ConfigureMessage(accepted=True, rows=0))
    empty = {"rows": 0, "numeric": {}, "categorical": {}}
    for d, t in checkin_all(fed, devices).items():
        fed.devices.input_json(d, t.round_id, {"statistics": empty})
    r = current_round(fed, job.id)
    assert r.status == "abandoned" and (r.reason or "").startswith("aggregation failed:")
    failed = job_row(fed, job.id)
    assert failed.status == "failed" and (failed.reason or "").startswith("statistics round failed:")
    assert failed.current_version is None


def test_one_broken_job_does_not_stop_the_others(fed: Federation, caplog: pytest.LogCaptureFixture) -> None:
    devices = enroll(fed, 3)
    broken = fed.jobs.submit(spec(), "op")
    with fed.write() as s:
        s.get(Job, broken.id).spec = {"name": "no longer a valid spec"}
    healthy = fed.jobs.submit(spec(), "op")
    checkin_all(fed, devices)
    with caplog.at_level(logging.ERROR, logger="aicfl.coordinator"):
        fed.tick()
    assert f"tick of job {broken.id} failed" in caplog.text
    assert current_round(fed, broken.id) is None
    r = current_round(fed, healthy.id)
    assert r is not None and (r.kind, r.status) == ("stats", "running")


def test_a_round_whose_stored_updates_are_gone_is_abandoned_not_stuck(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=2), "op")
    run_stats_round(fed, job.id, devices)
    tasks = open_train_round(fed, devices)
    numel = job_numel(fed, job.id)
    for i, (d, t) in enumerate(tasks.items()):
        if i == 2:
            # What a finish that died between deleting the round's blobs and its commit leaves behind:
            # the restarted coordinator has no running sum and the stored updates are gone.
            fed.sums._acc.clear()
            with fed.read() as s:
                for m in s.query(RoundMessage).filter(RoundMessage.round_id == t.round_id):
                    if m.blob_sha256:
                        fed.blobs.delete(m.blob_sha256)
        fed.devices.update(d, t.round_id, update(t.round_id, np.full(numel, i + 1, np.float32), 1))
    r = current_round(fed, job.id)
    assert r.status == "abandoned" and "is missing from the store" in (r.reason or "")
    after = job_row(fed, job.id)
    assert (after.status, after.current_version, after.rounds_completed) == ("running", 0, 0)
    checkin_all(fed, devices)
    fed.tick()  # the job goes on with a new training round from the same version
    nxt = current_round(fed, job.id)
    assert (nxt.kind, nxt.status, nxt.model_version_in) == ("train", "running", 0)


def job_numel(fed: Federation, job_id: int) -> int:
    with fed.read() as s:
        return int(registry.get_version(s, job_id, 0).num_parameters)
