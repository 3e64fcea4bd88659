"""The round state machine and cohort selection, as pure functions over data."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.rounds import (
    ACTIVE,
    DECLINED,
    DROPPED,
    EXCLUDED,
    STAGES,
    ParticipantView,
    RoundView,
    decide,
    next_stage,
    select_cohort,
    stage_index,
)

DEADLINE = 1000.0
BEFORE = DEADLINE - 1
AFTER = DEADLINE + 1


def p(device_id: str, stage_done: str | None, status: str = ACTIVE) -> ParticipantView:
    return ParticipantView(device_id=device_id, status=status, stage_done=stage_done)


def view(stage: str, participants: list[ParticipantView], minimum: int = 2, kind: str = "train") -> RoundView:
    return RoundView(
        kind=kind, stage=stage, deadline=DEADLINE, minimum=minimum, participants=tuple(participants)
    )


def test_stage_helpers_follow_the_protocol_order() -> None:
    assert STAGES["train"] == ("configure", "input")
    assert stage_index("train", None) == -1
    assert stage_index("train", "configure") == 0
    assert stage_index("train", "input") == 1
    assert next_stage("train", "configure") == "input"
    assert next_stage("train", "input") is None


def test_all_done_advances_before_the_deadline() -> None:
    d = decide(view("configure", [p("a", "configure"), p("b", "configure"), p("c", "configure")]), BEFORE)
    assert d.action == "advance"
    assert d.next_stage == "input"
    assert d.drop == ()


def test_device_ahead_of_the_stage_counts_as_done() -> None:
    d = decide(view("configure", [p("a", "input"), p("b", "configure")]), BEFORE)
    assert d.action == "advance"


def test_waits_while_some_are_late_before_the_deadline() -> None:
    d = decide(view("configure", [p("a", "configure"), p("b", "configure"), p("c", None)]), BEFORE)
    assert d.action == "wait"
    assert d.drop == ()
    assert d.next_stage is None


def test_waits_even_when_the_minimum_is_already_done() -> None:
    parts = [p("a", "configure"), p("b", "configure"), p("c", "configure"), p("d", None)]
    assert decide(view("configure", parts, minimum=2), BEFORE).action == "wait"


def test_at_the_deadline_late_devices_are_dropped_and_the_round_advances() -> None:
    parts = [p("a", "configure"), p("b", "configure"), p("c", None), p("d", None)]
    for now in (DEADLINE, AFTER):
        d = decide(view("configure", parts, minimum=2), now)
        assert d.action == "advance"
        assert d.next_stage == "input"
        assert d.drop == ("c", "d")


def test_below_minimum_after_the_deadline_abandons_with_stage_and_numbers() -> None:
    parts = [p("a", "input"), p("b", "configure"), p("c", "configure")]
    d = decide(view("input", parts, minimum=2), AFTER)
    assert d.action == "abandon"
    assert d.drop == ("b", "c")
    assert d.reason is not None
    assert "'input'" in d.reason
    assert "only 1 of 3" in d.reason
    assert "minimum is 2" in d.reason


def test_declines_below_minimum_abandon_at_once() -> None:
    parts = [p("a", "configure"), p("b", None, DECLINED), p("c", None, DECLINED), p("d", None)]
    d = decide(view("input", parts, minimum=3), BEFORE)
    assert d.action == "abandon"
    assert d.reason is not None
    assert "only 2 devices remain" in d.reason
    assert "'input'" in d.reason
    assert "minimum is 3" in d.reason
    assert set(d.drop) == {"a", "d"}


def test_inactive_participants_are_neither_waited_for_nor_dropped() -> None:
    parts = [
        p("a", "configure"),
        p("b", "configure"),
        p("x", None, DROPPED),
        p("y", None, DECLINED),
        p("z", None, EXCLUDED),
    ]
    d = decide(view("configure", parts, minimum=2), BEFORE)
    assert d.action == "advance"
    assert d.drop == ()


def test_last_stage_done_finishes() -> None:
    d = decide(view("input", [p("a", "input"), p("b", "input")]), BEFORE)
    assert d.action == "finish"
    assert d.next_stage is None
    assert d.drop == ()


def test_last_stage_at_deadline_finishes_without_the_late() -> None:
    d = decide(view("input", [p("a", "input"), p("b", "input"), p("c", "configure")]), AFTER)
    assert d.action == "finish"
    assert d.drop == ("c",)


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_round_kind_finishes_after_its_last_stage(kind: str) -> None:
    last = STAGES[kind][-1]
    assert decide(view(last, [p("a", last), p("b", last)], kind=kind), BEFORE).action == "finish"


# -- cohort selection ---------------------------------------------------------------

DEVICES = [f"dev-{i:03d}" for i in range(50)]


def select(eligible: list[str], **kw: object) -> list[str] | None:
    args: dict[str, object] = {
        "target": 10,
        "minimum": 3,
        "seed": 1,
        "round_number": 0,
        "waited": None,
        "selection_timeout": 10.0,
    }
    args.update(kw)
    return select_cohort(eligible, **args)  # type: ignore[arg-type]


def test_below_minimum_selects_nobody() -> None:
    assert select(DEVICES[:2], waited=1e9) is None


def test_duplicate_check_ins_do_not_count_towards_the_minimum() -> None:
    assert select(["a", "a", "b", "b"], minimum=3, waited=1e9) is None


def test_waits_for_the_target_until_the_selection_timeout() -> None:
    eligible = DEVICES[:5]
    assert select(eligible, waited=None) is None
    assert select(eligible, waited=9.9) is None
    cohort = select(eligible, waited=10.0)
    assert cohort == sorted(eligible)


def test_target_reached_selects_at_once() -> None:
    cohort = select(DEVICES, target=10, waited=None)
    assert cohort is not None
    assert len(cohort) == 10
    assert set(cohort) <= set(DEVICES)


def test_selects_min_of_target_and_eligible() -> None:
    assert len(select(DEVICES[:7], target=10, waited=60.0) or []) == 7
    assert len(select(DEVICES[:12], target=10, waited=60.0) or []) == 10


def test_selection_is_deterministic_for_seed_and_round() -> None:
    first = select(DEVICES, seed=42, round_number=3)
    again = select(list(reversed(DEVICES)), seed=42, round_number=3)
    assert first is not None
    assert first == again


def test_selection_differs_across_rounds_and_seeds() -> None:
    by_round = {tuple(select(DEVICES, seed=42, round_number=r) or ()) for r in range(5)}
    assert len(by_round) == 5
    by_seed = {tuple(select(DEVICES, seed=s, round_number=3) or ()) for s in range(5)}
    assert len(by_seed) == 5


@settings(max_examples=200, deadline=None)
@given(
    eligible=st.lists(st.sampled_from(DEVICES[:20]), max_size=40),
    target=st.integers(min_value=1, max_value=25),
    minimum=st.integers(min_value=1, max_value=25),
    seed=st.integers(min_value=0, max_value=2**32),
    round_number=st.integers(min_value=0, max_value=1000),
    waited=st.none() | st.floats(min_value=0, max_value=100),
)
def test_selection_never_has_duplicates_and_respects_target_and_minimum(
    eligible: list[str], target: int, minimum: int, seed: int, round_number: int, waited: float | None
) -> None:
    cohort = select_cohort(
        eligible,
        target=target,
        minimum=minimum,
        seed=seed,
        round_number=round_number,
        waited=waited,
        selection_timeout=10.0,
    )
    unique = set(eligible)
    if cohort is None:
        assert len(unique) < minimum or (len(unique) < target and (waited is None or waited < 10.0))
        return
    assert len(cohort) == len(set(cohort))
    assert set(cohort) <= unique
    assert len(cohort) == min(target, len(unique))
    assert len(cohort) >= min(minimum, target)
    assert cohort == sorted(cohort)


# -- property: decide() over random participant states ----------------------------

_participants = st.lists(
    st.tuples(
        st.sampled_from([ACTIVE, ACTIVE, ACTIVE, DROPPED, DECLINED, EXCLUDED]),
        st.sampled_from([None, "configure", "input"]),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    states=_participants,
    stage=st.sampled_from(["configure", "input"]),
    minimum=st.integers(min_value=1, max_value=8),
    now=st.sampled_from([BEFORE, DEADLINE, AFTER]),
)
def test_decide_never_advances_short_and_drops_exactly_the_active_late(
    states: list[tuple[str, str | None]], stage: str, minimum: int, now: float
) -> None:
    parts = [p(f"d{i:02d}", done, status) for i, (status, done) in enumerate(states)]
    d = decide(view(stage, parts, minimum=minimum), now)

    here = stage_index("train", stage)
    active = [x for x in parts if x.status == ACTIVE]
    done = [x for x in active if stage_index("train", x.stage_done) >= here]
    late = sorted(x.device_id for x in active if stage_index("train", x.stage_done) < here)

    if d.action in ("advance", "finish"):
        assert len(done) >= minimum
        assert d.action == ("finish" if stage == "input" else "advance")
        assert d.next_stage == (None if stage == "input" else "input")
        assert not late or now >= DEADLINE
    if d.action == "wait":
        assert late and now < DEADLINE
        assert d.drop == ()
    else:
        assert list(d.drop) == late
    if d.action == "abandon":
        assert d.reason and repr(stage) in d.reason and str(minimum) in d.reason
        assert len(active) < minimum or ((now >= DEADLINE or not late) and len(done) < minimum)
    else:
        assert len(active) >= minimum
