"""Server-side optimisation by Flower's strategies, fed with the round's aggregate.

The coordinator learns only the weighted mean of the cohort's models (with
secure aggregation, only their sum), so each strategy sees that mean as one
result carrying the total example count. The weighted mean of one result is
itself, so FedAvg, FedAvgM (Hsu et al., 2019), FedProx (Li et al., MLSys
2020; its proximal term runs on the devices), FedAdam and FedYogi (Reddi et
al., ICLR 2021) apply exactly their published server update. Their state
between rounds (momentum, first and second moments) is persisted as a blob so
that a restarted coordinator continues the same optimiser.

Plaintext jobs may instead choose a Byzantine-robust rule, which needs each device's own update:
FedMedian (Yin et al., ICML 2018, coordinate-wise median), FedTrimmedAvg (Yin et al., ICML 2018,
coordinate-wise trimmed mean), Krum (Blanchard et al., NeurIPS 2017) and Bulyan (El Mhamdi et
al., ICML 2018). :func:`robust_mean` applies Flower's aggregation functions to the per-example
updates; the server step after it is FedAvg's (the robust mean is the new model's delta).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from shared.jobspec import ROBUST_STRATEGIES, StrategySpec
from shared.robustness import AggregateRejected

_STATE_ATTRS = {"fedavgm": ("momentum_vector",), "fedadam": ("m_t", "v_t"), "fedyogi": ("m_t", "v_t")}


def _no_metrics(_: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    return {}


def build_strategy(spec: StrategySpec, current: np.ndarray) -> Strategy:
    """A Flower strategy for ``spec`` whose current model is ``current``."""
    common: dict[str, Any] = {
        "min_fit_clients": 1,
        "min_available_clients": 1,
        "min_evaluate_clients": 1,
        "fit_metrics_aggregation_fn": _no_metrics,
    }
    name = spec.name
    # FedAvg and FedProx never read the current model on the server; the others step from it.
    if name == "fedavg" or name in ROBUST_STRATEGIES:
        # A robust rule has already combined the single updates (robust_mean): one result, FedAvg's step.
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=spec.proximal_mu, **common)
    common["initial_parameters"] = ndarrays_to_parameters([current])
    if name == "fedavgm":
        return FedAvgM(
            server_learning_rate=spec.server_learning_rate, server_momentum=spec.server_momentum, **common
        )
    opt: dict[str, Any] = {"eta": spec.eta, "eta_l": spec.eta_l, "beta_1": spec.beta_1, "tau": spec.tau}
    if name == "fedadam":
        return FedAdam(beta_2=spec.beta_2, **opt, **common)
    if name == "fedyogi":
        return FedYogi(beta_2=spec.beta_2, **opt, **common)
    raise ValueError(f"unknown strategy {name!r}")


def dump_state(spec: StrategySpec, strategy: Strategy) -> bytes | None:
    """The strategy's optimiser state, or ``None`` for a stateless strategy."""
    attrs = _STATE_ATTRS.get(spec.name)
    if not attrs:
        return None
    arrays: dict[str, Any] = {}
    for attr in attrs:
        value = getattr(strategy, attr, None)
        if value:
            arrays[attr] = np.asarray(value[0])
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def load_state(spec: StrategySpec, strategy: Strategy, blob: bytes | None) -> None:
    if not blob:
        return
    with np.load(io.BytesIO(blob)) as saved:
        for attr in _STATE_ATTRS.get(spec.name, ()):
            if attr in saved:
                setattr(strategy, attr, [saved[attr]])


def apply_strategy(
    spec: StrategySpec,
    current: np.ndarray,
    mean: np.ndarray,
    total_examples: int,
    server_round: int,
    state: bytes | None,
) -> tuple[np.ndarray, bytes | None]:
    """The next model from the current one and the cohort's weighted mean.

    ``server_round`` counts completed training rounds from 1 (Flower's
    convention, which its bias corrections and momentum depend on).
    """
    strategy = build_strategy(spec, current)
    load_state(spec, strategy, state)
    result = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([mean]),
        num_examples=int(total_examples),
        metrics={},
    )
    params, _ = strategy.aggregate_fit(server_round, [(None, result)], [])  # type: ignore[list-item]
    if params is None:
        raise RuntimeError(f"strategy {spec.name} produced no parameters")
    (new,) = parameters_to_ndarrays(params)
    out = np.asarray(new, dtype=np.float32)
    if not np.isfinite(out).all():
        raise AggregateRejected(f"strategy {spec.name} produced non-finite parameters")
    return out, dump_state(spec, strategy)


def robust_mean(spec: StrategySpec, updates: list[np.ndarray], weights: list[int]) -> np.ndarray:
    """The robust rule's combination of per-example updates (each of the model's size), by Flower's
    aggregation functions; ``weights`` are the devices' (capped) example counts.

    FedMedian and FedTrimmedAvg ignore the weights (a claimed weight is what a poisoner inflates);
    Krum and Bulyan select among the updates by their distances (Bulyan then trims the selection).
    """
    if spec.name not in ROBUST_STRATEGIES:
        raise ValueError(f"strategy {spec.name} is not a robust rule")
    if not updates:
        raise ValueError("no updates to combine")
    results = [([np.asarray(u, dtype=np.float64)], int(w)) for u, w in zip(updates, weights, strict=True)]
    n, f = len(results), spec.byzantine
    if spec.name == "fedmedian":
        (out,) = aggregate_median(results)
    elif spec.name == "fedtrimmedavg":
        (out,) = aggregate_trimmed_avg(results, spec.trim_fraction)
    elif spec.name == "krum":
        if n <= 2 * f + 2:
            raise AggregateRejected(f"krum with byzantine = {f} needs more than {2 * f + 2} updates, got {n}")
        (out,) = aggregate_krum(results, f, spec.krum_keep)
    else:
        if n < 4 * f + 3:
            raise AggregateRejected(
                f"bulyan with byzantine = {f} needs at least {4 * f + 3} updates, got {n}"
            )
        (out,) = aggregate_bulyan(results, f, aggregate_krum, to_keep=0)
    return np.asarray(out, dtype=np.float32)
