"""Bad [privacy] settings are refused with the setting named and the reason given; good ones are accepted."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shared.privacy import PrivacySettings, PrivacySettingsError, validate_privacy

GOOD: dict[str, Any] = {"level": "device", "target_epsilon": 4.0, "delta": 1e-6, "clip": 1.0}


def _problems(**changes: Any) -> list[str]:
    data = {**GOOD, **changes}
    data = {k: v for k, v in data.items() if v is not ...}
    with pytest.raises(PrivacySettingsError) as err:
        validate_privacy(data)
    return err.value.problems


def test_good_settings_are_accepted_with_their_defaults() -> None:
    settings = validate_privacy(GOOD)
    assert settings == PrivacySettings(level="device", target_epsilon=4.0, delta=1e-6, clip=1.0)
    assert settings.noise_multiplier is None and settings.accountant == "rdp" and settings.sampling == "none"
    central = validate_privacy(
        {
            **GOOD,
            "level": "central",
            "noise_multiplier": 1.1,
            "accountant": "pld",
            "sampling": "poisson",
            "population": 1000,
        }
    )
    assert central.population == 1000 and central.noise_multiplier == 1.1


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"target_epsilon": 0}, "privacy.target_epsilon: must be greater than 0"),
        ({"target_epsilon": -1.0}, "privacy.target_epsilon: must be greater than 0"),
        ({"target_epsilon": math.nan}, "privacy.target_epsilon: must be a finite number"),
        ({"target_epsilon": math.inf}, "privacy.target_epsilon: must be a finite number"),
        ({"target_epsilon": True}, "privacy.target_epsilon: must be a number"),
        ({"delta": 1.0}, "privacy.delta: must be less than 1"),
        ({"delta": 2.0}, "privacy.delta: must be less than 1"),
        ({"delta": 0.0}, "privacy.delta: must be greater than 0"),
        ({"delta": -1e-9}, "privacy.delta: must be greater than 0"),
        ({"delta": math.nan}, "privacy.delta: must be a finite number"),
        ({"clip": ...}, "privacy.clip: required: the noise is calibrated to the clip"),
        ({"clip": ..., "noise_multiplier": 1.0}, "privacy.clip: required"),
        ({"clip": 0.0}, "privacy.clip: must be greater than 0"),
        ({"clip": math.inf}, "privacy.clip: must be a finite number"),
        ({"noise_multiplier": 0.0}, "privacy.noise_multiplier: must be greater than 0"),
        ({"noise_multiplier": math.nan}, "privacy.noise_multiplier: must be a finite number"),
        ({"level": "user"}, "privacy.level: must be one of device, example, central (got 'user')"),
        ({"level": ...}, "privacy.level: required field is missing"),
        ({"level": None}, "privacy.level: required field is missing"),
        ({"clip": None}, "privacy.clip: required"),
        ({"clip_learning_rate": None}, "privacy.clip_learning_rate: must be a number (got None)"),
        ({"delta": "1e-5"}, "privacy.delta: must be a number (got '1e-5')"),
        ({"epsilon": 3}, "privacy.epsilon: unknown field"),
        ({"accountant": "pld"}, "privacy.accountant: pld accounts Gaussian mechanisms only"),
        (
            {"sampling": "fixed", "population": 100},
            "privacy.sampling: level = device is accounted for poisson",
        ),
        ({"sampling": "poisson"}, "privacy.population: required with sampling = poisson"),
        (
            {"level": "central", "sampling": "fixed", "population": 100, "accountant": "pld"},
            "privacy.accountant: pld has no sampling without replacement",
        ),
        ({"population": 0, "sampling": "poisson"}, "privacy.population: must be a whole number"),
        ({"adaptive_quantile": 0.5}, "privacy.indicator_noise: required with adaptive_quantile"),
        (
            {"adaptive_quantile": 1.0, "indicator_noise": 5.0},
            "privacy.adaptive_quantile: must be less than 1",
        ),
        (
            {"adaptive_quantile": 0.5, "indicator_noise": 0.4, "noise_multiplier": 1.0},
            "privacy.indicator_noise: must exceed noise_multiplier / 2",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_named_reason(changes: dict[str, Any], expected: str) -> None:
    problems = _problems(**changes)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    problems = _problems(target_epsilon=-1, delta=1.5, clip=...)
    assert [p.split(":")[0] for p in problems] == ["privacy.clip", "privacy.target_epsilon", "privacy.delta"]
    assert str(PrivacySettingsError(problems)) == "; ".join(problems)


def test_a_table_is_required() -> None:
    with pytest.raises(PrivacySettingsError, match="expected a table"):
        validate_privacy(["level", "device"])  # type: ignore[arg-type]
