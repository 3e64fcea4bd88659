"""The bounds on one device's pull (docs/robustness.md): spec refusals, the arithmetic, robust rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator import secure
from coordinator.strategies import apply_strategy, robust_mean
from shared.jobspec import JobSpec, JobSpecError, SecAggSpec, StrategySpec, validate_spec
from shared.robustness import (
    AggregateRejected,
    aggregate_problem,
    capped_weight,
    plain_influence,
    secure_influence,
    update_norm,
    update_problem,
)
from shared.secagg.params import SecAggParams
from shared.secagg.protocol import check_weighted_total, finish, weighted_input
from shared.secagg.quantize import quantisation_bound

APP = {"name": "x", "rounds": 1, "model": {"app": "pkg.mod:app"}}


def spec(**extra: object) -> JobSpec:
    return validate_spec({**APP, **extra})


def refusal(**extra: object) -> str:
    with pytest.raises(JobSpecError) as err:
        validate_spec({**APP, **extra})
    return str(err.value)


# -- the spec ------------------------------------------------------------


def test_robustness_defaults_are_finite_and_documented() -> None:
    r = spec().robustness
    assert (r.max_update_norm, r.max_weight, r.max_parameter) == (1e3, 100_000, 1e4)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("training", "learning_rate"),
        ("training", "holdout"),
        ("cohort", "stage_timeout"),
        ("strategy", "eta"),
        ("strategy", "trim_fraction"),
        ("secagg", "clip"),
        ("secagg", "dropout"),
        ("robustness", "max_update_norm"),
        ("robustness", "max_parameter"),
        ("audit", "min_rank_correlation"),
        ("model", "dropout"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_refuses_nan_and_infinity_as_not_finite(
    section: str, field: str, value: float
) -> None:
    message = refusal(**{section: {field: value}})
    assert f"{section}.{field}: must be a finite number" in message
    assert "less than" not in message and "greater than" not in message


def test_nan_from_toml_is_refused_as_not_finite() -> None:
    from shared.jobspec import parse_spec_text

    text = 'name = "x"\nrounds = 1\n[model]\napp = "pkg.mod:app"\n[training]\nlearning_rate = nan\n'
    with pytest.raises(JobSpecError, match=r"training.learning_rate: must be a finite number \(got nan\)"):
        parse_spec_text(text)


@pytest.mark.parametrize(
    ("field", "value"), [("max_update_norm", 0), ("max_weight", 0), ("max_parameter", -1)]
)
def test_robustness_bounds_must_be_positive(field: str, value: float) -> None:
    assert f"robustness.{field}" in refusal(robustness={field: value})


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "bulyan"])
def test_robust_rules_are_refused_under_secure_aggregation(name: str) -> None:
    message = refusal(strategy={"name": name}, cohort={"target": 20, "minimum": 20})
    assert f"{name} needs every device's own update" in message and "secure = false" in message


@pytest.mark.parametrize(
    ("name", "byzantine", "minimum", "ok"),
    [
        ("krum", 1, 4, False),  # n > 2f + 2 = 4
        ("krum", 1, 5, True),
        ("krum", 2, 6, False),
        ("krum", 2, 7, True),
        ("bulyan", 1, 6, False),  # n >= 4f + 3 = 7
        ("bulyan", 1, 7, True),
        ("bulyan", 2, 10, False),
        ("bulyan", 2, 11, True),
        ("fedmedian", 5, 1, True),
        ("fedtrimmedavg", 5, 2, True),
    ],
)
def test_robust_rules_need_enough_devices_per_round(
    name: str, byzantine: int, minimum: int, ok: bool
) -> None:
    extra = {
        "secure": False,
        "strategy": {"name": name, "byzantine": byzantine},
        "cohort": {"target": 20, "minimum": minimum},
    }
    if ok:
        assert spec(**extra).strategy.name == name
    else:
        message = refusal(**extra)
        assert f"{name} with byzantine = {byzantine}" in message and "cohort.minimum" in message


def test_unknown_strategy_names_the_robust_ones() -> None:
    message = refusal(strategy={"name": "geomed"}, secure=False)
    assert "fedmedian" in message and "bulyan" in message


# -- plaintext bounds ----------------------------------------------------------


def test_capped_weight() -> None:
    assert capped_weight(50, 100) == 50
    assert capped_weight(10**9, 100) == 100
    assert capped_weight(0, 100) == 1


def test_update_norm_does_not_overflow_in_float32() -> None:
    x = np.full(4, 3e38, dtype=np.float32)
    assert update_norm(x) == pytest.approx(6e38, rel=1e-6)


def test_update_within_bounds_is_accepted() -> None:
    delta = np.full(100, 0.1, dtype=np.float32)  # norm 1
    assert update_problem(delta * 20, 20, max_update_norm=1.5, max_weight=100) is None


@pytest.mark.parametrize(
    ("weighted", "weight", "expected"),
    [
        (
            np.full(100, 3e38, dtype=np.float32),
            1,
            "L2 norm per example is 3e+39, above robustness.max_update_norm",
        ),
        (np.array([np.nan, 0.0], dtype=np.float32), 1, "non-finite"),
        (np.array([np.inf, 0.0], dtype=np.float32), 1, "non-finite"),
        (np.full(100, 0.2, dtype=np.float32), 1, "L2 norm per example is 2, above"),
        (np.zeros(10, dtype=np.float32), 101, "num_examples 101 exceeds robustness.max_weight = 100"),
    ],
)
def test_update_out_of_bounds_is_refused_with_the_reason(
    weighted: np.ndarray, weight: int, expected: str
) -> None:
    problem = update_problem(weighted, weight, max_update_norm=1.5, max_weight=100)
    assert problem is not None and expected in problem


def test_aggregate_problem() -> None:
    assert aggregate_problem(np.array([1.0, -2.0]), 2.0) is None
    assert "largest parameter is 3" in (aggregate_problem(np.array([1.0, -3.0]), 2.0) or "")
    assert "2 non-finite" in (aggregate_problem(np.array([np.nan, np.inf, 0.0]), 2.0) or "")


def test_plain_influence_bound_holds_for_the_worst_update() -> None:
    """The move of the weighted mean by one device never exceeds 2 B w / (w + W_others)."""
    rng = np.random.default_rng(0)
    bound, max_weight = 1.0, 50
    honest = [rng.normal(0, 1, 20) for _ in range(4)]
    honest = [h / np.linalg.norm(h) * bound * rng.uniform(0.1, 1) for h in honest]
    weights = [30, 40, 50, 60]
    others = sum(weights)
    mean_o = sum(w * h for w, h in zip(weights, honest, strict=True)) / others
    worst = -mean_o / np.linalg.norm(mean_o) * bound  # opposite the others, as long as allowed
    mean = (others * mean_o + max_weight * worst) / (others + max_weight)
    assert np.linalg.norm(mean - mean_o) <= plain_influence(bound, max_weight, others) + 1e-12


# -- SecAgg+ arithmetic --------------------------------------------------------


PARAMS = SecAggParams(k=2, t=2, clip=0.5, bits=16, weight_cap=100)


def test_weighted_input_clips_a_huge_update_and_the_mean_stays_within_the_secure_bound() -> None:
    rng = np.random.default_rng(1)
    d = 50
    honest = [rng.normal(0, 0.05, d).astype(np.float32) for _ in range(3)]
    honest_n = [80, 90, 100]
    poison = np.full(d, 3e38, dtype=np.float32)
    inputs = [weighted_input(h, n, PARAMS, rng) for h, n in zip(honest, honest_n, strict=True)]
    clean_total = np.asarray(np.sum(inputs, axis=0, dtype=np.uint64))
    # The device caps its claimed weight at weight_cap; weighted_input refuses more.
    with pytest.raises(ValueError, match="weight_cap=100"):
        weighted_input(poison, 10**6, PARAMS, rng)
    poisoned_total = clean_total + weighted_input(
        poison, capped_weight(10**6, PARAMS.weight_cap), PARAMS, rng
    )
    check_weighted_total(poisoned_total, PARAMS, 4)  # what the protocol allows: accepted
    clean, w_clean = finish(clean_total, PARAMS)
    poisoned, w_all = finish(poisoned_total, PARAMS)
    assert (w_clean, w_all) == (270, 370)
    per, l2 = secure_influence(PARAMS.clip, PARAMS.weight_cap, w_clean, d)
    step = quantisation_bound(PARAMS.clip, PARAMS.bits)
    move = np.abs(poisoned.astype(np.float64) - clean)
    assert move.max() <= per + step
    assert np.linalg.norm(move) <= l2 + step * math.sqrt(d)
    assert np.isfinite(poisoned).all() and np.abs(poisoned).max() <= PARAMS.clip + step


def test_a_forged_weight_or_value_is_rejected_once_unmasked() -> None:
    rng = np.random.default_rng(2)
    total = weighted_input(np.zeros(5, np.float32), 10, PARAMS, rng) + weighted_input(
        np.zeros(5, np.float32), 20, PARAMS, rng
    )
    check_weighted_total(total, PARAMS, 2)
    heavy = total.copy()
    heavy[-1] += np.uint64(10**6)  # a weight no device may claim
    with pytest.raises(AggregateRejected, match="summed weight"):
        check_weighted_total(heavy, PARAMS, 2)
    forged = total.copy()
    forged[0] = np.uint64(2**63)  # not w * q with q <= levels
    with pytest.raises(AggregateRejected, match="exceeds the summed weight times"):
        check_weighted_total(forged, PARAMS, 2)


def test_secure_setup_caps_the_weight_at_max_weight() -> None:
    cohort = ["a", "b", "c"]
    assert secure.setup(cohort, SecAggSpec(), 1, 1)["params"]["weight_cap"] == 2**20
    assert secure.setup(cohort, SecAggSpec(), 1, 1, max_weight=500)["params"]["weight_cap"] == 500
    assert (
        secure.setup(cohort, SecAggSpec(weight_cap=200), 1, 1, max_weight=500)["params"]["weight_cap"] == 200
    )


# -- robust rules --------------------------------------------------------------


def _updates() -> tuple[list[np.ndarray], list[int]]:
    honest = [np.array([0.1, -0.1, 0.0], np.float32) + np.float32(0.01 * i) for i in range(6)]
    poison = np.full(3, 1e6, dtype=np.float32)
    return [*honest, poison], [10, 10, 10, 10, 10, 10, 10**6]


@pytest.mark.parametrize(
    "strategy",
    [
        StrategySpec(name="fedmedian"),
        StrategySpec(name="fedtrimmedavg", trim_fraction=0.2),
        StrategySpec(name="krum", byzantine=1),
        StrategySpec(name="krum", byzantine=1, krum_keep=3),
        StrategySpec(name="bulyan", byzantine=1),
    ],
    ids=["fedmedian", "fedtrimmedavg", "krum", "multi-krum", "bulyan"],
)
def test_robust_rules_ignore_one_huge_update_with_a_huge_weight(strategy: StrategySpec) -> None:
    updates, weights = _updates()
    out = robust_mean(strategy, updates, weights)
    assert out.shape == (3,) and np.abs(out).max() < 0.2


def test_robust_rules_refuse_too_few_updates() -> None:
    updates, weights = _updates()
    with pytest.raises(AggregateRejected, match="bulyan with byzantine = 1 needs at least 7 updates, got 6"):
        robust_mean(StrategySpec(name="bulyan"), updates[:6], weights[:6])
    with pytest.raises(AggregateRejected, match="krum with byzantine = 2 needs more than 6 updates, got 6"):
        robust_mean(StrategySpec(name="krum", byzantine=2), updates[:6], weights[:6])
    with pytest.raises(ValueError, match="not a robust rule"):
        robust_mean(StrategySpec(name="fedavg"), updates, weights)


@pytest.mark.parametrize("name", ["fedmedian", "krum"])
def test_a_robust_rule_then_takes_fedavgs_step(name: str) -> None:
    current = np.ones(3, np.float32)
    mean = np.array([1.5, 0.5, 1.0], np.float32)
    new, state = apply_strategy(StrategySpec(name=name), current, mean, 30, 1, None)  # type: ignore[arg-type]
    assert np.array_equal(new, mean) and state is None


def test_a_non_finite_strategy_result_is_rejected() -> None:
    current = np.ones(3, np.float32)
    mean = np.array([np.nan, 0.5, 1.0], np.float32)
    with pytest.raises(AggregateRejected, match="non-finite"):
        apply_strategy(StrategySpec(name="fedavg"), current, mean, 30, 1, None)
