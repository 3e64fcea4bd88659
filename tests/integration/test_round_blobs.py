"""A round's stored masked inputs and masked sum go with the round, once its end has committed.

Whichever way the round ends (completed, abandoned, its job cancelled) the blobs are deleted after the
transaction that ended it commits, never before: a decision rolled back leaves a round that still runs
and still needs them. Completion and abandonment are checked in test_secure_engine.py; these tests reuse
its rig.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coordinator.models import Round

from . import test_secure_engine
from .test_secure_engine import STAGES, Rig

rig = test_secure_engine.rig  # the fixture: a SecAgg+ round on each database


def stored_until_unmask(r: Rig) -> list[str]:
    """Drive the round up to its unmask stage; the masked data it stored, each still there."""
    for name in STAGES[:-1]:
        r.stage(name)
    blobs = r.masked_blobs()
    assert blobs and all(r.fed.blobs.exists(b) for b in blobs)
    return blobs


def test_blobs_of_a_round_whose_end_rolls_back_are_kept_then_deleted_once_it_commits(
    rig: Callable[..., Rig],
) -> None:
    r = rig(4)
    blobs = stored_until_unmask(r)
    with pytest.raises(RuntimeError), r.fed.write() as s:
        ended = s.get(Round, r.round_id)
        assert ended is not None
        r.fed.driver.finisher.discard(s, ended)
        raise RuntimeError("the commit fails")
    assert all(r.fed.blobs.exists(b) for b in blobs), "deleted before the commit"
    r.stage("unmask")
    r.assert_exact()  # the round still had everything it needed
    assert not any(r.fed.blobs.exists(b) for b in blobs)


def test_blobs_of_a_round_ended_by_cancelling_its_job_are_deleted(rig: Callable[..., Rig]) -> None:
    r = rig(4)
    blobs = stored_until_unmask(r)
    r.fed.jobs.cancel(r.job_id, "test")
    assert r.round_row()["status"] == "abandoned"
    assert not any(r.fed.blobs.exists(b) for b in blobs)


def test_after_commit_runs_only_once_a_transaction_commits(rig: Callable[..., Rig]) -> None:
    fed = rig(2).fed
    ran: list[str] = []
    with pytest.raises(RuntimeError), fed.write() as s:
        fed.after_commit(s, lambda: ran.append("rolled back"))
        raise RuntimeError
    with pytest.raises(RuntimeError), fed.device_write() as db:
        fed.after_commit(db, lambda: ran.append("rolled back"))
        raise RuntimeError
    with fed.write() as s:
        fed.after_commit(s, lambda: ran.append("write"))
        assert ran == []
    with fed.device_write() as db:
        fed.after_commit(db, lambda: ran.append("device_write"))
        assert ran == ["write"]
    assert ran == ["write", "device_write"]
