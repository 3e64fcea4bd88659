"""The settings of a job's future ``[privacy]`` section, and their validation.

A frozen dataclass and one validator over a parsed TOML table, so that
``shared/jobspec/`` can call :func:`validate_privacy` from its own model
and report the problems as it reports its own: one ``"privacy.<field>:
<what is wrong>"`` line per problem, every problem at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

Level = Literal["device", "example", "central"]
Accountant = Literal["rdp", "pld"]
Sampling = Literal["none", "poisson", "fixed"]

_LEVELS = ("device", "example", "central")
_ACCOUNTANTS = ("rdp", "pld")
_SAMPLINGS = ("none", "poisson", "fixed")


class PrivacySettingsError(ValueError):
    """A ``[privacy]`` section that cannot be accepted; ``problems`` names each field and what is wrong."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _doc(text: str, default: Any = MISSING) -> Any:
    # The field's meaning travels with it, for the job spec reference that shared/jobspec generates.
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy for a job: the unit protected, the budget, the noise and the clip."""

    level: Level = _doc(
        "device: distributed Skellam noise under SecAgg+, protects a device's whole data from the coordinator"
        " too; example: per-example DP-SGD on each device; central: Gaussian noise added by the coordinator,"
        " which sees the updates (trusts the coordinator)"
    )
    target_epsilon: float = _doc("the budget: epsilon over the whole job, at delta (> 0)")
    delta: float = _doc("delta of the (epsilon, delta) guarantee; well below 1 / devices (0 < delta < 1)")
    clip: float = _doc("the L2 norm each update is clipped to; the initial clip when adaptive (> 0)")
    noise_multiplier: float | None = _doc(
        "noise standard deviation over the clip; absent: calibrated so that the planned rounds reach"
        " target_epsilon (> 0)",
        None,
    )
    adaptive_quantile: float | None = _doc(
        "adaptive clipping (Andrew et al. 2021): the share of devices whose update norm the clip should"
        " cover; absent: a fixed clip (0 < q < 1)",
        None,
    )
    clip_learning_rate: float = _doc("adaptive clipping: step of the geometric clip update (> 0)", 0.2)
    indicator_noise: float | None = _doc(
        "adaptive clipping: noise std on the count of devices under the clip, in devices; needed with"
        " adaptive_quantile (> noise_multiplier / 2)",
        None,
    )
    accountant: Accountant = _doc(
        "rdp or pld (pld: Gaussian mechanisms only, so not with level = device)", "rdp"
    )
    sampling: Sampling = _doc(
        "how a round's cohort is drawn from the population: none (no amplification claimed), poisson, or"
        " fixed (a uniformly drawn cohort of fixed size); claim only what the coordinator does",
        "none",
    )
    population: int | None = _doc(
        "devices the cohort is drawn from, with poisson or fixed sampling (>= 1)", None
    )
    steps_per_epoch: int | None = _doc(
        "level = example only, and required there: DP-SGD steps per epoch on every device; each step"
        " samples each example with probability 1 / steps_per_epoch, so neither the rate nor the step count"
        " depends on a device's example count (>= 1)",
        None,
    )


_FIELDS = {f.name: f for f in fields(PrivacySettings)}
_REQUIRED = ("level", "target_epsilon", "delta")


def _number(value: object) -> float | None:
    # bool is an int to Python, never a number to a person writing a spec.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def validate_privacy(data: Mapping[str, Any], section: str = "privacy") -> PrivacySettings:
    """The settings of a parsed ``[privacy]`` table; :class:`PrivacySettingsError` naming every bad field.

    Refused: an unknown field; a missing level, target_epsilon, delta or
    clip (noise calibrated to no clip bounds nothing); epsilon <= 0, delta
    outside (0, 1), a noise multiplier <= 0, NaN or infinity anywhere; an
    adaptive clip without its indicator noise, or with one that leaves the
    update no budget; sampling that claims amplification without a
    population; PLD accounting with fixed-size sampling (dp-accounting's PLD
    has no sampling without replacement); PLD accounting or fixed-size
    sampling at device level (the Skellam mechanism has an RDP bound only,
    and a bound for Poisson sampling only: ``shared/privacy/accounting.py``);
    level = example without ``steps_per_epoch``, and ``steps_per_epoch`` at
    any other level.
    """
    if not isinstance(data, Mapping):
        raise PrivacySettingsError([f"{section}: expected a table of fields"])
    problems: list[str] = []

    def bad(name: str, message: str) -> None:
        problems.append(f"{section}.{name}: {message}")

    for name in sorted(set(data) - set(_FIELDS)):
        bad(name, "unknown field")
    values: dict[str, Any] = {}
    for name in _REQUIRED:
        if data.get(name) is None:
            bad(name, "required field is missing")
    if data.get("clip") is None:
        bad("clip", "required: the noise is calibrated to the clip, and without one it bounds nothing")

    def choice(name: str, allowed: tuple[str, ...], default: str | None) -> None:
        value = data.get(name, default)
        if value is None:
            return
        if value not in allowed:
            bad(name, f"must be one of {', '.join(allowed)} (got {value!r})")
        else:
            values[name] = value

    def positive(name: str, *, upper: float | None = None, optional: bool = False) -> None:
        if name not in data or (data[name] is None and (optional or name in (*_REQUIRED, "clip"))):
            return  # absent, or missing and already reported
        raw = data[name]
        value = _number(raw)
        if value is None:
            bad(name, f"must be a number (got {raw!r})")
        elif not math.isfinite(value):
            bad(name, f"must be a finite number (got {raw!r})")
        elif value <= 0:
            bad(name, f"must be greater than 0 (got {raw!r})")
        elif upper is not None and value >= upper:
            bad(name, f"must be less than {upper:g} (got {raw!r})")
        else:
            values[name] = value

    choice("level", _LEVELS, None)
    choice("accountant", _ACCOUNTANTS, "rdp")
    choice("sampling", _SAMPLINGS, "none")
    positive("target_epsilon")
    positive("delta", upper=1.0)
    positive("clip")
    positive("noise_multiplier", optional=True)
    positive("adaptive_quantile", upper=1.0, optional=True)
    positive("clip_learning_rate")
    positive("indicator_noise", optional=True)
    if "population" in data and data["population"] is not None:
        raw = data["population"]
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            bad("population", f"must be a whole number of devices, at least 1 (got {raw!r})")
        else:
            values["population"] = raw
    if data.get("steps_per_epoch") is not None:
        raw = data["steps_per_epoch"]
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            bad("steps_per_epoch", f"must be a whole number of steps, at least 1 (got {raw!r})")
        elif values.get("level", "example") != "example":
            bad("steps_per_epoch", f"applies to level = example (DP-SGD) only, not level = {values['level']}")
        else:
            values["steps_per_epoch"] = raw
    elif values.get("level") == "example":
        bad(
            "steps_per_epoch",
            "required with level = example: it fixes each step's sampling rate (1 / steps_per_epoch), so that"
            " neither the rate nor the step count reveals a device's example count",
        )

    if "adaptive_quantile" in values and data.get("indicator_noise") is None:
        bad(
            "indicator_noise",
            "required with adaptive_quantile: the count of devices under the clip needs noise too",
        )
    z, s = values.get("noise_multiplier"), values.get("indicator_noise")
    if z is not None and s is not None and 2.0 * s <= z:
        bad(
            "indicator_noise",
            f"must exceed noise_multiplier / 2 = {z / 2:g}, or the clip bit spends the whole budget",
        )
    sampling = values.get("sampling", "none")
    if sampling != "none" and data.get("population") is None:
        bad("population", f"required with sampling = {sampling}: the sampling rate is the cohort over it")
    if sampling == "fixed" and values.get("accountant") == "pld":
        bad("accountant", "pld has no sampling without replacement; sampling = fixed needs rdp")
    if values.get("level") == "device":
        if values.get("accountant") == "pld":
            bad("accountant", "pld accounts Gaussian mechanisms only; level = device (Skellam) needs rdp")
        if sampling == "fixed":
            bad(
                "sampling",
                "level = device is accounted for poisson sampling or none; fixed has no Skellam bound here",
            )
    if problems:
        raise PrivacySettingsError(problems)
    merged = {name: data[name] for name in data}
    merged.update(values)
    return PrivacySettings(**merged)
