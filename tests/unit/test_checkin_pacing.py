"""The check-in pacing rule: who is held, who is told to come back when, and the online window."""

from __future__ import annotations

import pytest

from coordinator.pacing import JITTER, Pacing, online_window, plan, retry_after

P = Pacing(idle_retry=60.0, poll_retry=2.0, active_retry=0.5, long_poll=55.0)


def test_a_device_with_a_task_is_answered_at_once_even_if_it_can_wait() -> None:
    assert plan("task", 55.0, P, 0.5).hold == 0.0
    assert plan("task", 55.0, P, 0.5).retry_after == P.active_retry


@pytest.mark.parametrize("situation", ["in_round", "selectable", "idle"])
def test_a_device_that_can_wait_is_held_up_to_the_long_poll_never_longer(situation: str) -> None:
    for draw in (0.0, 0.5, 0.999):
        held = plan(situation, 600.0, P, draw).hold  # type: ignore[arg-type]
        assert P.long_poll * (1 - JITTER) <= held <= P.long_poll
    assert plan(situation, 5.0, P, 0.0).hold == 5.0  # type: ignore[arg-type]  # the device's own bound


def test_holds_that_began_together_end_apart() -> None:
    assert plan("idle", 55.0, P, 0.0).hold != plan("idle", 55.0, P, 0.9).hold


def test_no_hold_when_the_device_does_not_wait_or_long_polls_are_off() -> None:
    assert plan("idle", 0.0, P, 0.5).hold == 0.0
    assert plan("idle", 55.0, Pacing(long_poll=0.0), 0.5).hold == 0.0


def test_a_device_that_does_not_wait_comes_back_late_only_while_no_job_could_select_it() -> None:
    assert retry_after("in_round", P, 0.5) == P.active_retry
    assert retry_after("selectable", P, 0.5) == pytest.approx(P.poll_retry)
    assert retry_after("idle", P, 0.5) == pytest.approx(P.idle_retry)
    # ±10 %, so that a fleet enrolled together spreads out
    assert retry_after("idle", P, 0.0) == pytest.approx(54.0)
    assert 65.9 < retry_after("idle", P, 0.999) <= 66.0


def test_a_job_never_makes_a_device_wait_longer_than_having_none() -> None:
    short_idle = Pacing(idle_retry=0.3, poll_retry=2.0, active_retry=0.2)
    assert retry_after("selectable", short_idle, 0.5) == pytest.approx(0.3)


def test_the_online_window_covers_the_longest_wait_a_device_is_told() -> None:
    longest = retry_after("idle", P, 0.999999)
    assert online_window(30.0, P) > longest + 1.0
    assert online_window(600.0, P) == 600.0  # a longer configured window stands
    # the integration suites' settings (idle 0.3 s, window 4 s) keep their window
    assert online_window(4.0, Pacing(idle_retry=0.3, poll_retry=2.0, active_retry=0.2)) == 4.0
