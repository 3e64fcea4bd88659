"""A job's differential privacy, as the coordinator runs it: each round's mechanism, its cost, the budget.

``shared/privacy`` holds the mechanisms and the accountant; this module fixes, for one job, what a
round uses (the noise multiplier, given or calibrated; the clip, fixed or adaptive; the Skellam
parameters every device of a device-level round is sent), what a released round cost, and whether
the next round still fits the budget. A round's record (``Round.privacy``) is written when its sum is
unmasked or its noised aggregate computed, and holds everything the accountant needs: the ledger of a
job is its rounds' records, read back from the database (docs/privacy.md, "How it is wired").

Sampling is always ``none``: a cohort is whichever eligible devices check in, not a secret random
sample, so no amplification is claimed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.models import Round
from shared.jobspec import JobSpec, JobSpecError
from shared.privacy import PrivacySettings, QuantileClip, SkellamParams, check_no_wrap, honest_floor

# The model's size is known once the statistics round has fixed the preprocessing; the submission check
# uses this many values instead (the wrap-around and the calibration barely depend on it: D2**2 is
# (2**(bits-1))**2 + dim / 4 + ...), and every round checks again with the real size.
SUBMISSION_DIM = 1_000_000
# The levels the engine runs (shared/privacy/settings.py lists the spec's).
ENGINE_LEVELS = ("device", "central", "example")
_CALIBRATED: dict[tuple[Any, ...], float] = {}


def min_contributors(spec: JobSpec) -> int:
    """The honest survivors a device-level round's noise is calibrated for: ``cohort.minimum`` less the
    share ``secagg.corruption`` that may collude with the coordinator (``honest_floor``)."""
    return honest_floor(spec.cohort.minimum, spec.secagg.corruption)


def skellam_params(spec: JobSpec, p: PrivacySettings, dim: int, clip: float, z: float) -> SkellamParams:
    """The distributed Skellam mechanism of one device-level round of ``spec`` (docs/privacy.md)."""
    return SkellamParams(
        clip=clip,
        bits=spec.secagg.bits,
        dim=dim,
        noise_multiplier=z,
        min_contributors=min_contributors(spec),
        indicator_noise=p.indicator_noise if p.adaptive_quantile is not None else None,
    )


def round_cost(spec: JobSpec, p: PrivacySettings, dim: int, z: float) -> Any:
    """The accountant's ``RoundCost`` of one round with noise multiplier ``z`` (sampling: none)."""
    from shared.privacy import accounting

    if p.level == "device":
        # The clip does not enter the integer sensitivity (it depends on bits), so the initial one will do.
        return accounting.skellam_round(skellam_params(spec, p, dim, p.clip, z))
    return accounting.gaussian_round(z)


def noise_multiplier(spec: JobSpec, dim: int) -> float:
    """The job's noise multiplier: ``[privacy] noise_multiplier``, or the smallest that keeps the planned
    ``rounds`` within ``target_epsilon`` at ``delta`` (calibrated once per process and model size)."""
    from shared.privacy import accounting

    p = spec.privacy
    assert p is not None
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    key = (p, spec.secagg.bits, min_contributors(spec), dim if p.level == "device" else 0, spec.rounds)
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    if len(_CALIBRATED) > 256:
        _CALIBRATED.clear()
    if p.level == "example":
        plan = example_plan(spec, 1.0)
        _CALIBRATED[key] = accounting.calibrate_dpsgd(
            p.target_epsilon,
            p.delta,
            plan["sampling_rate"],
            plan["steps"],
            spec.rounds,
            p.accountant,
        )
    else:
        _CALIBRATED[key] = accounting.calibrate_noise_multiplier(
            lambda z: round_cost(spec, p, dim, z), spec.rounds, p.target_epsilon, p.delta, p.accountant
        )
    return _CALIBRATED[key]


def example_plan(spec: JobSpec, z: float) -> dict[str, Any]:
    """What one device's DP-SGD in one round of an example-level job must report (``DpSgdReport.wire``):
    noise multiplier ``z``, rate ``q = 1 / steps_per_epoch`` and ``epochs * int(1 / q)`` steps (Opacus
    takes ``int(1 / q)`` steps an epoch, one fewer than ``steps_per_epoch`` for some values)."""
    p = spec.privacy
    assert p is not None and p.level == "example" and p.steps_per_epoch is not None
    q = 1.0 / p.steps_per_epoch
    return {"noise_multiplier": z, "sampling_rate": q, "steps": spec.training.epochs * int(1.0 / q)}


def example_report_problem(spec: JobSpec, report: Any) -> str | None:
    """Why a device's DP-SGD report (``"dp"`` of its update) cannot be accounted as the job asked, or
    None: it must be the job's noise multiplier, rate and step count exactly. A device that trained with
    other parameters spent another budget than the one the coordinator would charge."""
    if spec.privacy is None or spec.privacy.level != "example":
        return None
    if not isinstance(report, dict):
        return "an example-level update must carry its DP-SGD report ('dp': noise_multiplier, sampling_rate, steps)"
    asked = example_plan(spec, noise_multiplier(spec, 0))
    wrong = []
    for name, want in asked.items():
        got = report.get(name)
        if (
            isinstance(got, bool)
            or not isinstance(got, int | float)
            or not math.isclose(got, want, rel_tol=1e-12)
        ):
            wrong.append(f"{name} {got!r} (asked {want!r})")
    if wrong:
        return "DP-SGD report differs from the job's: " + ", ".join(wrong)
    return None


def report_problem(spec_data: Mapping[str, Any], report: Any) -> str | None:
    """:func:`example_report_problem` for a training update of the job whose stored spec is ``spec_data``
    (None at once for any job but an example-level one)."""
    settings = spec_data.get("privacy")
    if not settings or settings.get("level") != "example":
        return None
    return example_report_problem(JobSpec.model_validate(spec_data), report)


def check_submission(spec: JobSpec) -> JobSpec:
    """What only the coordinator can check of ``[privacy]``: the engine runs the level, a noise multiplier
    exists (calibration), and a device-level round of the cohort's target size cannot wrap modulo 2**64
    (``check_no_wrap``). ``JobSpecError`` naming the problem.

    Returns the spec to store: at example level with the calibrated noise multiplier written into its
    ``[privacy]`` table, since every device runs DP-SGD with it and reads it from the spec its task carries
    (a device has no accountant to calibrate with)."""
    p = spec.privacy
    if p is None:
        return spec
    if p.level not in ENGINE_LEVELS:
        # The hook for per-example DP-SGD: add "example" to ENGINE_LEVELS once the agent's training runs it.
        raise JobSpecError(
            [
                f"privacy: level = '{p.level}' (per-example DP-SGD on each device) is not run by the engine yet;"
                " use level = 'device' (with secure = true) or level = 'central' (with secure = false)"
            ]
        )
    try:
        z = noise_multiplier(spec, SUBMISSION_DIM)
    except ValueError as err:
        raise JobSpecError([f"privacy: {err}"]) from None
    if p.level == "device":
        try:
            check_no_wrap(skellam_params(spec, p, SUBMISSION_DIM, p.clip, z), spec.cohort.target)
        except ValueError as err:
            raise JobSpecError([f"privacy: {err}"]) from None
    if p.level == "example" and p.noise_multiplier is None:
        return spec.model_copy(update={"privacy": dataclasses.replace(p, noise_multiplier=z)})
    return spec


def device_round(spec: JobSpec, s: Session, job_id: int, dim: int, devices: int) -> dict[str, Any]:
    """The Skellam parameters of a device-level round about to start with ``devices`` accepted devices,
    as every device and the unmasking read them (``SkellamParams`` fields); ValueError if it could wrap."""
    p = spec.privacy
    assert p is not None and p.level == "device"
    params = skellam_params(spec, p, dim, current_clip(s, job_id, p), noise_multiplier(spec, dim))
    check_no_wrap(params, devices)
    return asdict(params)


def current_clip(s: Session, job_id: int, p: PrivacySettings) -> float:
    """This round's clip: the initial one, or with adaptive clipping the one the last spent round chose."""
    if p.adaptive_quantile is None:
        return p.clip
    for record in reversed(spent_records(s, job_id)):
        if record.get("next_clip") is not None:
            return float(record["next_clip"])
    return p.clip


def spent_records(s: Session, job_id: int) -> list[dict[str, Any]]:
    """The privacy records of the job's rounds that released a noised sum, in round order."""
    rows = s.scalars(
        select(Round.privacy).where(Round.job_id == job_id, Round.privacy.is_not(None)).order_by(Round.number)
    )
    return [dict(r) for r in rows if r]  # a JSON null (no record) reads as None too


def cost_of(record: dict[str, Any]) -> Any:
    """The ``RoundCost`` a round's record says it spent."""
    from shared.privacy.accounting import RoundCost

    cost = record["cost"]
    skellam = cost.get("skellam")
    return RoundCost(float(cost["noise_multiplier"]), skellam=tuple(skellam) if skellam else None)


def next_clip(p: PrivacySettings, clip: float, fraction_under: float | None) -> float | None:
    """The adaptive clip's next value from this round's noised fraction under the clip (Andrew et al.)."""
    if p.adaptive_quantile is None or fraction_under is None or p.indicator_noise is None:
        return None
    state = QuantileClip(clip, p.adaptive_quantile, p.clip_learning_rate, p.indicator_noise)
    return state.next(fraction_under).clip


def record(
    s: Session,
    r: Round,
    spec: JobSpec,
    *,
    cost: Any,
    noise_multiplier: float,
    clip: float,
    contributors: int,
    fraction_under: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Charge round ``r`` to the job's ledger: epsilon after it, at the job's delta, stored on the round.

    Called once the round's noised sum exists, before the model is applied: a round whose aggregate is
    then rejected has still been released to the coordinator and counts as spent.
    """
    from shared.privacy import accounting

    p = spec.privacy
    assert p is not None
    ledger = [cost_of(x) for x in spent_records(s, r.job_id)]
    eps = accounting.epsilon([*ledger, cost], p.delta, p.accountant)
    out = {
        "level": p.level,
        "trusts_coordinator": p.level == "central",
        "epsilon": eps,
        "delta": p.delta,
        "target_epsilon": p.target_epsilon,
        "noise_multiplier": noise_multiplier,
        "clip": clip,
        "next_clip": next_clip(p, clip, fraction_under),
        "fraction_under": fraction_under,
        "contributors": contributors,
        "sampling": "none",
        "accountant": p.accountant,
        "cost": {
            "noise_multiplier": cost.noise_multiplier,
            "skellam": list(cost.skellam) if cost.skellam else None,
        },
        **(extra or {}),
    }
    r.privacy = out
    return out


def _example_ledgers(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Each device's DP-SGD ledger at example level: ``dpsgd_costs`` of every round its update was in."""
    from shared.privacy.accounting import dpsgd_costs

    ledgers: dict[str, list[Any]] = {}
    for record in records:
        cost = record["cost"]
        steps = dpsgd_costs(float(cost["noise_multiplier"]), float(cost["sampling_rate"]), int(cost["steps"]))
        for device in record.get("devices", []):
            ledgers.setdefault(device, []).extend(steps)
    return ledgers


def record_example(
    s: Session, r: Round, spec: JobSpec, devices: Iterable[str], plan: Mapping[str, Any]
) -> dict[str, Any]:
    """Charge an example-level round: every device in ``devices`` (those whose update was released, its
    DP-SGD report checked equal to ``plan``) extends its own ledger with ``dpsgd_costs(**plan)``; a
    device's epsilon is ``epsilon`` of its ledger at the job's delta, the round's the largest over all the
    job's devices so far. Stored on the round with the same fields as the other levels."""
    from shared.privacy import accounting

    p = spec.privacy
    assert p is not None and p.level == "example"
    released = sorted(set(devices))
    cost = {
        "noise_multiplier": float(plan["noise_multiplier"]),
        "sampling_rate": float(plan["sampling_rate"]),
        "steps": int(plan["steps"]),
    }
    ledgers = _example_ledgers([*spent_records(s, r.job_id), {"cost": cost, "devices": released}])
    # Devices with the same ledger (they took part in the same rounds) have the same epsilon: computed once.
    by_ledger: dict[tuple[Any, ...], float] = {}
    for ledger in ledgers.values():
        if tuple(ledger) not in by_ledger:
            by_ledger[tuple(ledger)] = accounting.epsilon(ledger, p.delta, p.accountant)
    per_device = {d: by_ledger[tuple(ledger)] for d, ledger in sorted(ledgers.items())}
    out = {
        "level": "example",
        "trusts_coordinator": False,
        "epsilon": max(per_device.values(), default=0.0),
        "delta": p.delta,
        "target_epsilon": p.target_epsilon,
        "noise_multiplier": cost["noise_multiplier"],
        "clip": p.clip,
        "next_clip": None,
        "fraction_under": None,
        "contributors": len(released),
        "sampling": "none",
        "accountant": p.accountant,
        "cost": cost,
        "devices": released,
        "device_epsilon": per_device,
    }
    r.privacy = out
    return out


def _check_example_budget(s: Session, job_id: int, spec: JobSpec) -> str | None:
    # Any device may be selected next: the one whose ledger plus the planned round spends most decides.
    from shared.privacy import accounting

    p = spec.privacy
    assert p is not None
    records = spent_records(s, job_id)
    plan = example_plan(spec, noise_multiplier(spec, 0))
    planned = accounting.dpsgd_costs(plan["noise_multiplier"], plan["sampling_rate"], plan["steps"])
    ledgers = {tuple(x) for x in _example_ledgers(records).values()} | {()}
    worst = max(ledgers, key=len)
    if all(_fits_all(ledger, tuple(planned), p.target_epsilon, p.delta, p.accountant) for ledger in ledgers):
        return None
    would = max(accounting.epsilon([*ledger, *planned], p.delta, p.accountant) for ledger in ledgers)
    spent = records[-1]["epsilon"] if records else 0.0
    return (
        f"privacy budget: one more round would spend epsilon {would:.4g} > target_epsilon {p.target_epsilon:g}"
        f" at delta {p.delta:g} for a device that took part in {len(worst) // max(1, len(planned))} rounds;"
        f" stopped after {len(records)} noised rounds at epsilon {spent:.4g}"
    )


@functools.lru_cache(maxsize=256)
def _fits_all(
    ledger: tuple[Any, ...], planned: tuple[Any, ...], target: float, delta: float, accountant: Any
) -> bool:
    from shared.privacy import accounting

    return accounting.epsilon([*ledger, *planned], delta, accountant) <= target


def check_budget(s: Session, job_id: int, spec: JobSpec, dim: int) -> str | None:
    """Before a training round opens: None when it fits the budget, else why the job ends
    (``next_round_fits``: the rounds spent plus this one's cost, within ``target_epsilon``; at example
    level for every device that could be selected, each with its own ledger)."""
    from shared.privacy import accounting

    p = spec.privacy
    if p is None:
        return None
    if p.level == "example":
        return _check_example_budget(s, job_id, spec)
    records = spent_records(s, job_id)
    ledger = tuple(cost_of(x) for x in records)
    nxt = round_cost(spec, p, dim, noise_multiplier(spec, dim))
    if _fits(ledger, nxt, p.target_epsilon, p.delta, p.accountant):
        return None
    spent = records[-1]["epsilon"] if records else 0.0
    would = accounting.epsilon([*ledger, nxt], p.delta, p.accountant)
    return (
        f"privacy budget: one more round would spend epsilon {would:.4g} > target_epsilon {p.target_epsilon:g}"
        f" at delta {p.delta:g}; stopped after {len(records)} noised rounds at epsilon {spent:.4g}"
    )


@functools.lru_cache(maxsize=256)
def _fits(ledger: tuple[Any, ...], nxt: Any, target: float, delta: float, accountant: Any) -> bool:
    # Asked on every tick while a job waits for its cohort: the same ledger gives the same answer.
    from shared.privacy import accounting

    return accounting.next_round_fits(list(ledger), nxt, target, delta, accountant)


def summary(
    settings: dict[str, Any] | None, records: Iterable[dict[str, Any] | None]
) -> dict[str, Any] | None:
    """A job's privacy as shown to people, from its stored ``[privacy]`` table and its rounds' records:
    the level, epsilon spent of the target at delta, the noise and the clip, whether it trusts the
    coordinator; None for a job without differential privacy."""
    if not settings:
        return None
    spent = [x for x in records if x]
    last = spent[-1] if spent else {}
    return {
        "level": settings.get("level"),
        "trusts_coordinator": settings.get("level") == "central",
        "epsilon": last.get("epsilon", 0.0),
        "target_epsilon": settings.get("target_epsilon"),
        "delta": settings.get("delta"),
        "noise_multiplier": last.get("noise_multiplier", settings.get("noise_multiplier")),
        "clip": last.get("next_clip") or last.get("clip", settings.get("clip")),
        "rounds_spent": len(spent),
        "sampling": "none: a cohort is whoever checks in, not a random sample, so no amplification is claimed",
    }


def central_rng() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG, for the coordinator's noise."""
    import os

    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))
