"""Cancelling a job takes its rows in the order every path that ends a round does: the round's, then the job's.

A device message locks its round's row (``SELECT … FOR UPDATE`` on ``rounds``) and, when it completes the
round's last stage, finishes the round in the same transaction, which updates the job's row (its next
version, its rounds completed). A cancel that locked the job first and then abandoned the round would
wait for the message while the message waits for it: PostgreSQL aborts one of the two as a deadlock
(a 500 to the operator, or a device message refused). The test holds the round's row as the message
does, lets the cancel start waiting, then updates the job as the finish does: both must go through.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from coordinator.models import Job, Round
from coordinator.statements import PARTICIPATION_LOCKED

from .harness import wait_for
from .test_secure_engine import STAGE_TIMEOUT, Rig


@pytest.fixture
def rig(postgres_url: str, tmp_path: Path) -> Iterator[Rig]:
    """A plain training round open on a fresh PostgreSQL database, its devices yet to answer."""
    made = Rig(postgres_url, tmp_path / "rig", 3, secure=False)
    yield made
    made.close()


def waiting_for_a_lock(rig: Rig) -> int:
    """Sessions of the test's database waiting for a row lock now."""
    with rig.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn(*args)`` started in a thread; what it returned or raised lands in the dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["returned"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - the test reports it
            outcome["raised"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.postgres
def test_cancel_waits_for_a_device_message_that_finishes_the_round_instead_of_deadlocking(rig: Rig) -> None:
    device = rig.devs[0].id
    with rig.engine.connect() as message:
        with message.begin():
            # The device-message path's lock (participation.load), held as while it drives the round.
            message.execute(PARTICIPATION_LOCKED, {"device": device, "round": rig.round_id}).one()
            cancel, outcome = in_thread(rig.fed.jobs.cancel, rig.job_id, "operator")
            wait_for(lambda: waiting_for_a_lock(rig) or outcome, 10, "the cancel to wait for a row lock")
            assert outcome == {}, outcome  # it waits: the message holds the round
            # What finishing the round does to the job's row (finish._train), in the message's transaction.
            message.execute(
                update(Job).where(Job.id == rig.job_id).values(rounds_completed=Job.rounds_completed + 1)
            )
        cancel.join(timeout=15)
    assert not cancel.is_alive(), "the cancel is still waiting"
    assert "raised" not in outcome, f"the cancel failed: {outcome['raised']!r}"
    assert outcome["returned"].status == "cancelled"
    with rig.fed.read() as s:
        job = s.get(Job, rig.job_id)
        assert job is not None and (job.status, job.rounds_completed) == ("cancelled", 1)
    row = rig.round_row()
    assert (row["status"], row["reason"]) == ("abandoned", "job cancelled by the operator")


@pytest.mark.postgres
def test_cancel_abandons_a_round_the_ticker_opened_between_its_two_locks(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.clock.advance(STAGE_TIMEOUT + 1)
    rig.fed.tick()  # nobody answered: the first round is abandoned; the next tick opens the second
    assert rig.state()[0] == "abandoned"
    lock = rig.fed.lock
    opened: list[int] = []

    def lock_with_a_tick_before_the_job(stmt: Any) -> Any:
        if stmt.column_descriptions[0]["entity"] is Job and not opened:
            rig.fed.tick()  # another replica's ticker, between the cancel's lock of rounds and of the job
            with rig.fed.read() as s:
                opened.extend(s.scalars(select(Round.id).where(Round.status == "running")))
            assert opened, "the ticker opened no round"
        return lock(stmt)

    monkeypatch.setattr(rig.fed, "lock", lock_with_a_tick_before_the_job)
    assert rig.fed.jobs.cancel(rig.job_id, "operator").status == "cancelled"
    with rig.fed.read() as s:
        second = s.get(Round, opened[0])
        assert second is not None and second.id != rig.round_id
        assert (second.status, second.reason) == ("abandoned", "job cancelled by the operator")
        assert s.scalars(select(Round.id).where(Round.status == "running")).all() == []
