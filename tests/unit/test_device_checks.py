"""What a device message must satisfy before the coordinator uses it: payload checks and its place in a round."""

from __future__ import annotations

import math

import pytest

from coordinator.errors import Conflict, Forbidden, Invalid, NotFound
from coordinator.participation import check, member, one_less
from coordinator.rounds import ACTIVE, DROPPED
from coordinator.statements import PartRow, RoundRow
from coordinator.validation import (
    MAX_EXAMPLES,
    check_baseline,
    check_metrics,
    check_update_header,
    finite,
)

NOW = 100.0


def header(**kw: object) -> dict:
    return {"kind": "update", "round_id": 7, "num_examples": 10, **kw}


def test_finite_accepts_numbers_and_refuses_bools_nan_and_text() -> None:
    assert finite(1) and finite(-2.5)
    assert not finite(True) and not finite(math.nan) and not finite(math.inf) and not finite("1")


def test_metrics_must_be_few_and_finite() -> None:
    check_metrics({"auc": 0.8, "loss": 1})
    with pytest.raises(ValueError, match="'loss' must be a finite number"):
        check_metrics({"loss": math.nan})
    with pytest.raises(ValueError, match="at most 64"):
        check_metrics({f"m{i}": 1.0 for i in range(65)})


def check_statistics(stats: dict) -> None:
    """The built-in tabular app's check of a device's plaintext statistics (the coordinator runs it)."""
    from shared.apps import JobContext
    from shared.apps.tabular import app
    from shared.jobspec import validate_spec

    spec = validate_spec(
        {
            "name": "t",
            "rounds": 1,
            "data": {"features": [{"name": "x", "type": "numeric"}], "target": "y", "task": "binary"},
        }
    )
    assert app.statistics is not None
    app.statistics.check(stats, JobContext(spec))


def test_statistics_need_rows_and_finite_moments() -> None:
    check_statistics(
        {"rows": 3, "numeric": {"x": {"count": 3, "sum": 1.0, "sum_sq": 2.0}}, "categorical": {}}
    )
    for stats, message in (
        ({"rows": -1}, "rows must be a non-negative integer"),
        ({"rows": "3"}, "rows must be a non-negative integer"),
        ({"rows": 3, "numeric": []}, "statistics.numeric must be a table"),
        ({"rows": 3, "numeric": {"x": {"count": 3, "sum": math.inf, "sum_sq": 1}}}, "numeric.x needs finite"),
    ):
        with pytest.raises(ValueError, match=message):
            check_statistics(stats)


def test_update_header_is_normalised() -> None:
    meta = check_update_header(header(train_loss=0.5, metrics={"auc": 0.7}, holdout_examples=4), 7)
    assert meta == {"num_examples": 10, "metrics": {"auc": 0.7}, "train_loss": 0.5, "holdout_examples": 4}
    assert check_update_header(header(), 7)["train_loss"] == 0.0


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (header(kind="masked"), Invalid, "header kind must be 'update'"),
        (header(round_id=8), Conflict, "made for round 8, not round 7"),
        (header(num_examples=0), Invalid, "num_examples must be an integer from 1"),
        (header(num_examples=MAX_EXAMPLES + 1), Invalid, "num_examples"),
        (header(num_examples=True), Invalid, "num_examples"),
        (header(metrics=[1]), Invalid, "metrics must be a table"),
        (header(metrics={"auc": math.nan}), Invalid, "update: metric 'auc' must be a finite number"),
        (header(train_loss=math.inf), Invalid, "train_loss must be a finite number"),
        (header(holdout_examples=-1), Invalid, "holdout_examples must be a non-negative integer"),
    ],
)
def test_bad_update_headers_are_refused_with_the_field_named(bad: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_update_header(bad, 7)


def test_baseline_is_checked_field_by_field() -> None:
    leader, algorithm, fields = check_baseline(
        {
            "leader": "GBM_1",
            "algorithm": "x" * 100,
            "metrics": {"auc": 0.9},
            "contributions": {"features": {"a": 1}},
        }
    )
    assert leader == "GBM_1" and algorithm == "x" * 64
    assert fields == {
        "metrics": {"auc": 0.9},
        "leaderboard": [],
        "contributions": {"features": {"a": 1}},
        "provenance": {},
    }
    for data, message in (
        ({"leader": " "}, "'leader' must be the leader's model id"),
        ({"leader": "L", "leaderboard": {}}, "'leaderboard' must be a JSON array"),
        ({"leader": "L", "metrics": []}, "'metrics' must be a JSON object"),
        ({"leader": "L", "metrics": {"auc": math.nan}}, "every metric must be a finite number"),
        ({"leader": "L", "contributions": {"features": {"a": "big"}}}, "map feature names to finite numbers"),
        ({"leader": "L", "extra": 1}, r"unknown field\(s\) extra"),
    ):
        with pytest.raises(Invalid, match=message):
            check_baseline(data)


def rnd(**kw: object) -> RoundRow:
    fields: dict = {
        "id": 7,
        "job_id": 1,
        "number": 3,
        "kind": "train",
        "stage": "input",
        "status": "running",
        "stage_deadline": NOW + 10,
        "secure": False,
        "secagg": None,
        "model_version_in": 2,
        "waiting": 2,
    }
    fields.update(kw)
    return RoundRow(**fields)


def part(**kw: object) -> PartRow:
    fields: dict = {"id": 1, "status": ACTIVE, "stage_done": "configure", "reason": None}
    fields.update(kw)
    return PartRow(**fields)


def test_a_selected_active_device_in_time_may_send_its_stage() -> None:
    r, p = rnd(), part()
    assert check(r, p, "dev", 7, "input", NOW) == (r, p)
    assert one_less(r) == 1 and one_less(rnd(waiting=None)) is None


@pytest.mark.parametrize(
    "r, p, stage, error, message",
    [
        (None, None, "input", NotFound, "no round 7"),
        (rnd(), None, "input", Forbidden, "dev was not selected for round 7"),
        (rnd(status="abandoned"), part(), "input", Conflict, "round 7 is abandoned; the message is stale"),
        (rnd(), part(status=DROPPED, reason="late"), "input", Conflict, "dev is dropped in round 7: late"),
        (rnd(), part(), "configure", Conflict, "round 7 is in stage 'input', not 'configure'"),
        (rnd(), part(stage_done="input"), "input", Conflict, "already sent its 'input' message"),
        (
            rnd(stage_deadline=NOW),
            part(),
            "input",
            Conflict,
            "the deadline of stage 'input' in round 7 has passed",
        ),
    ],
)
def test_each_broken_rule_is_named(
    r: RoundRow | None, p: PartRow | None, stage: str, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        check(r, p, "dev", 7, stage, NOW)


def test_a_withdrawal_needs_an_active_device_in_a_running_round_whatever_the_stage() -> None:
    r, p = rnd(stage_deadline=NOW), part(stage_done="input")  # past the deadline, stage sent: still a member
    assert member(r, p, "dev", 7) == (r, p)
    for bad_r, bad_p, error, message in [
        (None, None, NotFound, "no round 7"),
        (rnd(), None, Forbidden, "dev was not selected for round 7"),
        (rnd(status="completed"), part(), Conflict, "round 7 is completed"),
        (
            rnd(),
            part(status=DROPPED, reason="withdrew: x"),
            Conflict,
            "dev is dropped in round 7: withdrew: x",
        ),
    ]:
        with pytest.raises(error, match=message):
            member(bad_r, bad_p, "dev", 7)
