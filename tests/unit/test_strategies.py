"""Server strategies fed with the cohort's mean: hand-computed steps, state that survives a restart."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from coordinator.strategies import apply_strategy, build_strategy, dump_state, load_state
from shared.jobspec import StrategySpec

RNG = np.random.default_rng(1234)
C0 = RNG.normal(size=64).astype(np.float32)
A1 = (C0 + RNG.normal(scale=0.1, size=64)).astype(np.float32)
A2_SHIFT = RNG.normal(scale=0.1, size=64).astype(np.float32)
N = 137  # total examples in the cohort; a weighted mean of one result ignores it


def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def fit_result(mean: np.ndarray) -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([mean]),
        num_examples=N,
        metrics={},
    )


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_return_the_mean_itself(name: str) -> None:
    spec = StrategySpec(name=name)  # type: ignore[arg-type]
    new, state = apply_strategy(spec, C0, A1, N, 1, None)
    assert new.dtype == np.float32 and new.shape == A1.shape
    # Flower computes mean * n / n, which may differ by one rounding step.
    np.testing.assert_array_max_ulp(new, A1, maxulp=2)
    assert not np.allclose(new, C0)
    assert state is None


def test_fedavgm_two_rounds_match_a_hand_computation() -> None:
    lr, beta = 0.5, 0.9
    spec = StrategySpec(name="fedavgm", server_learning_rate=lr, server_momentum=beta)

    c1, state1 = apply_strategy(spec, C0, A1, N, 1, None)
    g1 = f64(C0) - f64(A1)  # pseudo-gradient: the update is its opposite
    m1 = g1
    np.testing.assert_allclose(c1, f64(C0) - lr * m1, rtol=1e-5, atol=1e-6)
    assert state1 is not None

    a2 = (c1 + A2_SHIFT).astype(np.float32)
    c2, _ = apply_strategy(spec, c1, a2, N, 2, state1)
    g2 = f64(c1) - f64(a2)
    m2 = beta * m1 + g2
    expected = f64(c1) - lr * m2
    np.testing.assert_allclose(c2, expected, rtol=1e-5, atol=1e-6)
    # Momentum matters: plain server SGD would land elsewhere.
    assert not np.allclose(c2, f64(c1) - lr * g2, atol=1e-4)


def adam_step(
    current: np.ndarray, mean: np.ndarray, m: np.ndarray, v: np.ndarray, server_round: int, spec: StrategySpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One FedAdam server step as flwr's FedAdam.aggregate_fit writes it (Reddi et al., 2021)."""
    delta = f64(mean) - f64(current)
    m = spec.beta_1 * m + (1 - spec.beta_1) * delta
    v = spec.beta_2 * v + (1 - spec.beta_2) * delta * delta
    eta_norm = (
        spec.eta
        * np.sqrt(1 - spec.beta_2 ** (server_round + 1.0))
        / (1 - spec.beta_1 ** (server_round + 1.0))
    )
    return f64(current) + eta_norm * m / (np.sqrt(v) + spec.tau), m, v


ADAM = StrategySpec(name="fedadam", eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)


def test_fedadam_two_rounds_match_a_hand_computation() -> None:
    zeros = np.zeros_like(C0, dtype=np.float64)

    c1, state1 = apply_strategy(ADAM, C0, A1, N, 1, None)
    e1, m1, v1 = adam_step(C0, A1, zeros, zeros, 1, ADAM)
    np.testing.assert_allclose(c1, e1, rtol=1e-5, atol=1e-6)

    a2 = (c1 + A2_SHIFT).astype(np.float32)
    c2, state2 = apply_strategy(ADAM, c1, a2, N, 2, state1)
    e2, m2, v2 = adam_step(c1, a2, m1, v1, 2, ADAM)
    np.testing.assert_allclose(c2, e2, rtol=1e-5, atol=1e-6)

    # The second step used the first step's moments: without them it differs.
    fresh, _, _ = adam_step(c1, a2, zeros, zeros, 2, ADAM)
    assert not np.allclose(c2, fresh, atol=1e-4)

    restored = build_strategy(ADAM, c2)
    load_state(ADAM, restored, state2)
    np.testing.assert_allclose(restored.m_t[0], m2, rtol=1e-5, atol=1e-9)  # type: ignore[attr-defined]
    np.testing.assert_allclose(restored.v_t[0], v2, rtol=1e-5, atol=1e-12)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "spec",
    [
        ADAM,
        StrategySpec(name="fedyogi", eta=0.05),
        StrategySpec(name="fedavgm", server_learning_rate=0.7, server_momentum=0.8),
    ],
    ids=lambda s: s.name,
)
def test_restarted_coordinator_takes_the_same_second_step(spec: StrategySpec) -> None:
    # One coordinator keeps the Flower strategy in memory across both rounds.
    live = build_strategy(spec, C0)
    p1, _ = live.aggregate_fit(1, [(None, fit_result(A1))], [])  # type: ignore[list-item]
    assert p1 is not None
    a2 = (parameters_to_ndarrays(p1)[0] + A2_SHIFT).astype(np.float32)
    p2, _ = live.aggregate_fit(2, [(None, fit_result(a2))], [])  # type: ignore[list-item]
    assert p2 is not None
    (live_c2,) = parameters_to_ndarrays(p2)

    # The other restarts between rounds: only the state blob carries over.
    c1, state1 = apply_strategy(spec, C0, A1, N, 1, None)
    assert state1 is not None
    restarted_c2, _ = apply_strategy(spec, c1, a2, N, 2, state1)

    np.testing.assert_allclose(restarted_c2, live_c2, rtol=1e-5, atol=1e-6)
    # And losing the state would not have given the same step.
    if spec.name != "fedavgm":  # fedavgm without its momentum on round 2 refuses outright
        amnesiac, _ = apply_strategy(spec, c1, a2, N, 2, None)
        assert not np.allclose(amnesiac, live_c2, atol=1e-4)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_optimiser_state_blob_round_trips(name: str) -> None:
    spec = StrategySpec(name=name)  # type: ignore[arg-type]
    strategy = build_strategy(spec, C0)
    strategy.m_t = [np.arange(64, dtype=np.float64)]  # type: ignore[attr-defined]
    strategy.v_t = [np.full(64, 0.25)]  # type: ignore[attr-defined]
    blob = dump_state(spec, strategy)
    assert blob

    other = build_strategy(spec, C0)
    load_state(spec, other, blob)
    assert np.array_equal(other.m_t[0], strategy.m_t[0])  # type: ignore[attr-defined]
    assert np.array_equal(other.v_t[0], strategy.v_t[0])  # type: ignore[attr-defined]


def test_fedavgm_momentum_round_trips() -> None:
    spec = StrategySpec(name="fedavgm")
    strategy = build_strategy(spec, C0)
    strategy.momentum_vector = [np.linspace(0, 1, 64)]  # type: ignore[attr-defined]
    other = build_strategy(spec, C0)
    load_state(spec, other, dump_state(spec, strategy))
    assert np.array_equal(other.momentum_vector[0], np.linspace(0, 1, 64))  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_stateless_strategies_have_no_state_blob(name: str) -> None:
    spec = StrategySpec(name=name)  # type: ignore[arg-type]
    assert dump_state(spec, build_strategy(spec, C0)) is None
