"""Example-level differential privacy in the job spec (docs/privacy.md): what it accepts, every refusal
with its message, and what the coordinator fixes at submission (the noise multiplier, the DP-SGD plan)
and checks of each device's report."""

from __future__ import annotations

import math
from typing import Any

import pytest

from coordinator import privacy
from shared.jobspec import JobSpec, JobSpecError, validate_spec
from shared.privacy.accounting import calibrate_dpsgd, dpsgd_costs, epsilon

SCHEMA = {"features": [{"name": "a", "type": "numeric"}], "target": "y", "task": "binary"}
EXAMPLE = {"level": "example", "target_epsilon": 3.0, "delta": 1e-5, "clip": 1.0, "steps_per_epoch": 4}


def job(privacy: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": "dp-sgd",
        "rounds": 5,
        "data": SCHEMA,
        "evaluation": {"federated": False},
        "training": {"epochs": 2},
        "secure": False,
        "privacy": {**EXAMPLE, **(privacy or {})},
    }
    out.update(top)
    return out


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(JobSpecError) as err:
        validate_spec(data)
    return err.value.problems


@pytest.mark.parametrize("secure", [False, True])
def test_example_level_is_accepted_in_plaintext_and_under_secure_aggregation(secure: bool) -> None:
    spec = validate_spec(job(secure=secure))
    assert spec.privacy is not None and (spec.privacy.level, spec.privacy.steps_per_epoch) == ("example", 4)
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps_per_epoch": None}, "privacy.steps_per_epoch: required with level = example"),
        (
            {"steps_per_epoch": 0},
            "privacy.steps_per_epoch: must be a whole number of steps, at least 1 (got 0)",
        ),
        ({"steps_per_epoch": 2.5}, "privacy.steps_per_epoch: must be a whole number of steps, at least 1"),
        ({"steps_per_epoch": True}, "privacy.steps_per_epoch: must be a whole number of steps, at least 1"),
        (
            {"level": "central"},
            "privacy.steps_per_epoch: applies to level = example (DP-SGD) only, not level = central",
        ),
    ],
    ids=["missing", "zero", "fraction", "bool", "other-level"],
)
def test_bad_steps_per_epoch_is_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    settings = {k: v for k, v in {**EXAMPLE, **change}.items() if v is not None}
    found = problems(job() | {"privacy": settings})
    assert len(found) == 1 and found[0].startswith(message), found


@pytest.mark.parametrize(
    ("top", "message"),
    [
        (
            {"model": {"app": "digits_cnn.app:app"}},
            "privacy: level = 'example' runs DP-SGD in the built-in tabular app's training loop; app",
        ),
        (
            {"strategy": {"name": "fedprox", "proximal_mu": 0.1}},
            "privacy: level = 'example' does not run FedProx",
        ),
        (
            {"model": {"zoo": "gbdt"}},
            "privacy: differential privacy is not supported for zoo = 'gbdt' jobs",
        ),
    ],
    ids=["app", "fedprox", "gbdt"],
)
def test_what_dp_sgd_cannot_train_is_refused(top: dict[str, Any], message: str) -> None:
    data = job(**top)
    if "app" in top.get("model", {}):
        data.pop("data")
    found = problems(data)
    assert len(found) == 1 and message in found[0], found


def test_submission_writes_the_calibrated_noise_multiplier_into_the_spec_the_devices_read() -> None:
    spec = validate_spec(job())
    stored = privacy.check_submission(spec)
    assert stored.privacy is not None and spec.privacy is not None
    # q = 1 / steps_per_epoch, epochs * steps_per_epoch steps a round, the job's rounds.
    want = calibrate_dpsgd(3.0, 1e-5, 0.25, 2 * 4, 5)
    assert stored.privacy.noise_multiplier == want
    assert epsilon(dpsgd_costs(want, 0.25, 8 * 5), 1e-5) <= 3.0
    assert stored.privacy == spec.privacy.__class__(**{**EXAMPLE, "noise_multiplier": want})
    given = validate_spec(job({"noise_multiplier": 1.7}))
    assert privacy.check_submission(given) == given  # a given multiplier is the job's own


def test_a_device_report_is_accepted_only_as_the_job_asked_it() -> None:
    spec = privacy.check_submission(validate_spec(job({"noise_multiplier": 1.5, "steps_per_epoch": 99})))
    # Opacus takes int(1 / q) steps an epoch: 98 for steps_per_epoch = 99 (1 / (1 / 99) < 99 in floats).
    steps = 2 * int(1 / (1 / 99))
    good = {"noise_multiplier": 1.5, "sampling_rate": 1 / 99, "steps": steps}
    assert privacy.example_plan(spec, 1.5) == good
    assert privacy.example_report_problem(spec, good) is None
    assert privacy.example_report_problem(spec, {**good, "noise_multiplier": 0.5}) == (
        "DP-SGD report differs from the job's: noise_multiplier 0.5 (asked 1.5)"
    )
    assert privacy.example_report_problem(spec, {**good, "steps": steps + 1, "sampling_rate": 0.5}) == (
        f"DP-SGD report differs from the job's: sampling_rate 0.5 (asked {1 / 99!r}), steps {steps + 1}"
        f" (asked {steps})"
    )
    missing = privacy.example_report_problem(spec, None)
    assert missing is not None and missing.startswith("an example-level update must carry its DP-SGD report")
    assert math.isclose(good["sampling_rate"], 1 / 99)
