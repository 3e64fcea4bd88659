"""The job spec's [privacy] table (docs/privacy.md): what it accepts, and every refusal with its message."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator import privacy
from shared.jobspec import JobSpec, JobSpecError, validate_spec
from shared.privacy import PrivacySettings

SCHEMA = {"features": [{"name": "a", "type": "numeric"}], "target": "y", "task": "binary"}
GOOD = {"level": "device", "target_epsilon": 4.0, "delta": 1e-5, "clip": 0.5, "noise_multiplier": 1.0}


def job(privacy: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": "dp",
        "rounds": 5,
        "data": SCHEMA,
        "evaluation": {"federated": False},
        "cohort": {"target": 10, "minimum": 5},
        "privacy": {**GOOD, **(privacy or {})},
    }
    out.update(top)
    return out


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(JobSpecError) as err:
        validate_spec(data)
    return err.value.problems


def test_a_device_level_spec_is_accepted_and_survives_storage() -> None:
    spec = validate_spec(job())
    assert spec.privacy == PrivacySettings(**GOOD)
    stored = spec.model_dump(mode="json")
    assert stored["privacy"]["level"] == "device"
    assert JobSpec.model_validate(stored) == spec  # the coordinator reads the stored spec back
    assert validate_spec({k: v for k, v in job().items() if k != "privacy"}).privacy is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_epsilon": 0}, "privacy.target_epsilon: must be greater than 0 (got 0)"),
        ({"target_epsilon": -1.0}, "privacy.target_epsilon: must be greater than 0 (got -1.0)"),
        ({"delta": 1.0}, "privacy.delta: must be less than 1 (got 1.0)"),
        ({"delta": 2}, "privacy.delta: must be less than 1 (got 2)"),
        ({"clip": None}, "privacy.clip: required: the noise is calibrated to the clip"),
        ({"level": "global"}, "privacy.level: must be one of device, example, central (got 'global')"),
        ({"noise_multiplier": float("nan")}, "privacy.noise_multiplier: must be a finite number"),
    ],
    ids=["epsilon-zero", "epsilon-negative", "delta-one", "delta-two", "no-clip", "level", "nan"],
)
def test_bad_settings_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    settings = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    found = problems(job() | {"privacy": settings})
    assert any(p.startswith(message) for p in found), found


def test_every_bad_field_is_reported_at_once() -> None:
    found = problems(job({"target_epsilon": 0, "delta": 1.5, "bogus": 1}))
    assert [p.split(":")[0] for p in found] == ["privacy.bogus", "privacy.target_epsilon", "privacy.delta"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            job(secure=False),
            "privacy: level = 'device' adds each device's noise under secure aggregation: it needs secure = true",
        ),
        (
            job({"level": "central"}),
            "privacy: level = 'central' has the coordinator clip and noise the plaintext updates",
        ),
        (
            job(model={"zoo": "gbdt"}, audit={"enabled": False}),
            "privacy: differential privacy is not supported for zoo = 'gbdt' jobs",
        ),
        (
            job({"sampling": "poisson", "population": 100}),
            "privacy: sampling = 'poisson' claims amplification, but a round's cohort is whichever eligible",
        ),
        (
            job({"level": "central"}, secure=False, strategy={"name": "krum"}),
            "privacy: krum picks among single updates",
        ),
        (
            job(evaluation={"federated": True}),
            "evaluation: federated = true sends each device's holdout metrics in the clear",
        ),
    ],
    ids=["device-plaintext", "central-secure", "gbdt", "sampling", "robust", "federated-eval"],
)
def test_settings_the_engine_cannot_honour_are_refused(data: dict[str, Any], message: str) -> None:
    found = problems(data)
    # A check across sections is the spec's own: reported under "(spec)", as the other such checks are.
    assert len(found) == 1 and found[0].startswith(f"(spec): {message}"), found


def test_central_level_with_plaintext_rounds_is_accepted() -> None:
    spec = validate_spec(job({"level": "central"}, secure=False))
    assert spec.privacy is not None and spec.privacy.level == "central"


def test_the_coordinator_refuses_a_sum_that_could_wrap_and_names_what_to_lower() -> None:
    spec = validate_spec(job({"noise_multiplier": 1e15}))
    with pytest.raises(JobSpecError) as err:
        privacy.check_submission(spec)
    (message,) = err.value.problems
    assert message.startswith("privacy: the noised sum of 10 devices could wrap modulo 2**64")
    assert "lower bits (now 16)" in message and "the noise multiplier" in message
    privacy.check_submission(validate_spec(job()))  # z = 1: room to spare


def test_an_absent_noise_multiplier_is_calibrated_to_the_target_over_the_planned_rounds() -> None:
    from shared.privacy.accounting import epsilon, gaussian_round

    spec = validate_spec(job({"level": "central", "noise_multiplier": None}, secure=False))
    z = privacy.noise_multiplier(spec, 100)
    assert epsilon([gaussian_round(z)] * 5, 1e-5) <= 4.0 < epsilon([gaussian_round(z * 0.99)] * 5, 1e-5)
