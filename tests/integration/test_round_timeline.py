"""Each round records its stages' timeline (``Round.stages``) on SQLite and PostgreSQL, in stage order on
the engine's clock, closed when the round completes or is abandoned; observers hear of each stage and round
that ends once its transaction commits, never when it rolls back."""

from __future__ import annotations

import pytest

from coordinator.engine import Federation
from coordinator.models import Job, Round
from coordinator.observers import RoundEnded, RoundOpened, StageEnded
from coordinator.queries import round_detail, rounds_of
from shared.tabular import local_statistics
from shared.wire import ConfigureMessage

from .test_engine_store import _schema, checkin_all, current_round, enroll, fed, frame, spec

__all__ = ["fed"]  # the fixture, imported for its side effect on pytest


class Recorder:
    def __init__(self) -> None:
        self.opened: list[RoundOpened] = []
        self.stages: list[StageEnded] = []
        self.rounds: list[RoundEnded] = []

    def round_opened(self, event: RoundOpened) -> None:
        self.opened.append(event)

    def stage_ended(self, event: StageEnded) -> None:
        self.stages.append(event)

    def round_ended(self, event: RoundEnded) -> None:
        self.rounds.append(event)


def virtual_clock(fed: Federation, start: float = 1_000.0) -> list[float]:
    now = [start]
    fed.clock = lambda: now[0]
    return now


def test_completed_round_records_each_stage_in_order_and_closes_the_last(fed: Federation) -> None:
    now = virtual_clock(fed)
    seen = Recorder()
    fed.driver.observers.append(seen)
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1), "op")
    checkin_all(fed, devices)
    fed.tick()  # opens the statistics round at 1000
    r = current_round(fed, job.id)
    assert r.stages == [{"stage": "configure", "started": 1000.0, "ended": None}]

    now[0] = 1003.0
    for d, t in checkin_all(fed, devices).items():
        fed.devices.configure(d, t.round_id, ConfigureMessage(accepted=True, rows=50))
    assert current_round(fed, job.id).stages == [
        {"stage": "configure", "started": 1000.0, "ended": 1003.0},
        {"stage": "input", "started": 1003.0, "ended": None},
    ]
    with fed.read() as s:
        (running,) = rounds_of(s, job.id)
    assert running["stages"][-1] == {"stage": "input", "started": 1003.0, "ended": None, "seconds": None}

    now[0] = 1010.5
    for i, (d, t) in enumerate(checkin_all(fed, devices).items()):
        fed.devices.input_json(d, t.round_id, {"statistics": local_statistics(frame(i, 50), _schema())})
    r = current_round(fed, job.id)
    assert r.status == "completed"
    assert r.stages == [
        {"stage": "configure", "started": 1000.0, "ended": 1003.0},
        {"stage": "input", "started": 1003.0, "ended": 1010.5},
    ]
    with fed.read() as s:
        detail = round_detail(s, job.id, r.number)
    assert [(e["stage"], e["seconds"]) for e in detail["stages"]] == [("configure", 3.0), ("input", 7.5)]

    assert [(e.kind, e.stage, e.seconds) for e in seen.stages] == [
        ("stats", "configure", 3.0),
        ("stats", "input", 7.5),
    ]
    (ended,) = seen.rounds
    assert (ended.kind, ended.status, ended.seconds, ended.devices) == (
        "stats",
        "completed",
        10.5,
        {"active": 3},
    )


def test_abandoned_round_closes_its_timeline_at_the_deadline_pass(fed: Federation) -> None:
    now = virtual_clock(fed)
    seen = Recorder()
    fed.driver.observers.append(seen)
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(stage_timeout=5), "op")
    checkin_all(fed, devices)
    fed.tick()
    now[0] = 1006.0  # nobody answers configure: all dropped, below the minimum
    fed.tick()
    r = current_round(fed, job.id)
    assert r.status == "abandoned"
    assert r.stages == [{"stage": "configure", "started": 1000.0, "ended": 1006.0}]
    assert [(e.kind, e.devices) for e in seen.opened] == [(r.kind, 3)]
    assert [(e.stage, e.seconds) for e in seen.stages] == [("configure", 6.0)]
    (ended,) = seen.rounds
    assert (ended.status, ended.seconds, ended.devices) == ("abandoned", 6.0, {"dropped": 3})


def test_cancelled_job_closes_the_running_round_timeline(fed: Federation) -> None:
    now = virtual_clock(fed)
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(), "op")
    checkin_all(fed, devices)
    fed.tick()
    now[0] = 1002.0
    fed.jobs.cancel(job.id, "alice")
    r = current_round(fed, job.id)
    assert r.status == "abandoned"
    assert r.stages == [{"stage": "configure", "started": 1000.0, "ended": 1002.0}]


def test_round_from_before_timelines_shows_an_empty_one_and_still_advances(fed: Federation) -> None:
    now = virtual_clock(fed)
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1), "op")
    checkin_all(fed, devices)
    fed.tick()
    with fed.write() as s:
        row = s.get(Round, current_round(fed, job.id).id)
        assert row is not None
        row.stages = None  # as the migration leaves rounds opened before it
    with fed.read() as s:
        assert rounds_of(s, job.id)[0]["stages"] == []
    now[0] = 1001.0
    for d, t in checkin_all(fed, devices).items():
        fed.devices.configure(d, t.round_id, ConfigureMessage(accepted=True, rows=50))
    assert current_round(fed, job.id).stages == [{"stage": "input", "started": 1001.0, "ended": None}]


def test_observers_hear_only_of_committed_transactions(fed: Federation) -> None:
    heard: list[str] = []
    with fed.write() as s:
        fed.after_commit(s, lambda: heard.append("committed"))
        assert heard == []  # not before the commit
    with pytest.raises(RuntimeError), fed.write() as s:
        s.add(Job(name="x", spec={}))
        fed.after_commit(s, lambda: heard.append("rolled back"))
        raise RuntimeError
    assert heard == ["committed"]
