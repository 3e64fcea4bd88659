"""SecAgg+ degree under dropout: every neighbourhood keeps t survivors but with the promised probability."""

from __future__ import annotations

import hashlib
import math
import re
from fractions import Fraction

import numpy as np
import pytest

from shared.secagg.graph import neighbour_graph
from shared.secagg.params import DEFAULT_FAIL_PROB, derive_params, neighbourhood_shortfall


def start_degree(n: int) -> int:
    """The log formula k starts from (and the whole of the old rule at these sizes), kept even for n * k."""
    k = min(n - 1, max(4, math.ceil(3 * math.log2(n))))
    return k + 1 if (n * k) % 2 else k


def majority(k: int, corruption: float = 0.1) -> int:
    return min(k, max(k // 2 + 1, math.ceil(corruption * k) + 1))


def gets_complete_graph(n: int, dropout: float) -> bool:
    p = derive_params(n, dropout=dropout)
    return p.k == n - 1 and p.t == majority(n - 1)


def exact_shortfall(k: int, t: int, dropout: float) -> Fraction:
    """P[Binomial(k, 1 - dropout) < t] in rationals, term by term: no floating point anywhere."""
    q = Fraction(dropout)  # the float's exact binary value
    a, b = q.numerator, q.denominator  # P[survive] = (b - a) / b
    return Fraction(sum(math.comb(k, j) * (b - a) ** j * a ** (k - j) for j in range(t)), b**k)


def failed_rounds(n: int, k: int, t: int, dropout: float, rounds: int, graphs: int = 20) -> int:
    """Rounds, out of ``rounds`` random drop patterns, in which some device keeps fewer than t live neighbours."""
    rng = np.random.default_rng(7)
    ids = [f"d{i:04d}" for i in range(n)]
    index = {d: i for i, d in enumerate(ids)}
    failed = 0
    for g in range(graphs):
        graph = neighbour_graph(ids, k, hashlib.sha256(b"graph-%d" % g).digest())
        adjacency = np.zeros((n, n), dtype=np.int32)
        for u, neighbours in graph.items():
            adjacency[index[u], [index[v] for v in neighbours]] = 1
        alive = (rng.random((rounds // graphs, n)) >= dropout).astype(np.int32)
        survivors = alive @ adjacency.T  # live neighbours of every device, per drop pattern
        failed += int((survivors < t).any(axis=1).sum())
    return failed


def test_chosen_degree_survives_random_dropout_where_the_expected_survivors_rule_does_not() -> None:
    # n = 200 devices, each dropping with probability 0.2. The old rule asked only that the expected
    # survivors k - floor(0.2 k) reach t: it kept the log formula's k = 23, t = 12, whose union bound is
    # 200 * P[Binomial(23, 0.8) < 12], about 0.1. The new k must keep all 200 neighbourhoods reconstructible.
    n, dropout = 200, 0.2
    old_k = start_degree(n)
    old_t = majority(old_k)
    assert (old_k, old_t) == (23, 12) and old_k - math.floor(dropout * old_k) >= old_t
    p = derive_params(n, dropout=dropout)
    assert p.k > old_k
    assert n * neighbourhood_shortfall(p.k, p.t, dropout) <= DEFAULT_FAIL_PROB
    assert failed_rounds(n, p.k, p.t, dropout, rounds=2000) == 0
    old_failures = failed_rounds(n, old_k, old_t, dropout, rounds=2000)
    assert old_failures >= 50, old_failures  # union bound: at most one round in ten; about one in twenty seen


@pytest.mark.parametrize(
    ("k", "t", "dropout"),
    [
        (9, 5, 0.2),
        (23, 12, 0.2),  # lower tail below the mode
        (81, 41, 0.2),
        (40, 21, 0.5),  # t next to the mode
        (40, 30, 0.5),  # t above the mode: computed as one minus the upper tail
        (30, 16, 0.9),
        (1200, 601, 0.4375),  # C(1200, 600) overflows a float
        (1200, 1100, 0.75),  # P[survivors = t - 1] underflows, the shortfall is all but 1
        (5, 5, 0.3),
    ],
)
def test_shortfall_matches_the_exact_binomial_sum(k: int, t: int, dropout: float) -> None:
    exact = exact_shortfall(k, t, dropout)
    assert neighbourhood_shortfall(k, t, dropout) == pytest.approx(float(exact), rel=1e-9, abs=1e-300)


def test_shortfall_edges() -> None:
    assert neighbourhood_shortfall(10, 0, 0.3) == 0.0
    assert neighbourhood_shortfall(10, 11, 0.3) == 1.0
    assert neighbourhood_shortfall(10, 10, 0.0) == 0.0
    assert neighbourhood_shortfall(10, 1, 0.3) == pytest.approx(0.3**10, rel=1e-12)


@pytest.mark.parametrize(
    ("n", "dropout"), [(50, 0.1), (100, 0.2), (200, 0.2), (1000, 0.1), (1000, 0.3), (5001, 0.2)]
)
def test_chosen_degree_is_the_smallest_valid_one_within_the_bound(n: int, dropout: float) -> None:
    p = derive_params(n, dropout=dropout)
    assert p.t == majority(p.k) and (n * p.k) % 2 == 0
    assert n * float(exact_shortfall(p.k, p.t, dropout)) <= DEFAULT_FAIL_PROB
    for smaller in range(start_degree(n), p.k):
        if (n * smaller) % 2 == 0:
            assert n * float(exact_shortfall(smaller, majority(smaller), dropout)) > DEFAULT_FAIL_PROB, (
                smaller
            )


def test_documented_degrees() -> None:
    # The figures derive_params's docstring quotes.
    assert [derive_params(n, dropout=0).k for n in (10, 50, 100, 1000, 10_000)] == [9, 17, 20, 30, 40]
    assert [derive_params(n).k for n in (50, 100, 1000, 10_000)] == [21, 23, 30, 40]  # dropout 0.1
    assert [derive_params(n, dropout=0.2).k for n in (50, 100, 1000, 10_000)] == [49, 51, 61, 71]
    assert [derive_params(1000, dropout=d).k for d in (0.1, 0.3)] == [30, 155]


def test_a_stricter_bound_costs_neighbours() -> None:
    ks = [derive_params(1000, dropout=0.2, fail_prob=f).k for f in (1e-3, 1e-6, 1e-9)]
    assert ks[0] < ks[1] < ks[2]
    with pytest.raises(ValueError, match=r"fail_prob must be in \(0, 1\), got 0"):
        derive_params(1000, fail_prob=0)


def test_small_cohorts_fall_back_to_the_complete_graph() -> None:
    # 10 devices at dropout 0.2 miss the bound even on the complete graph (one round in five fails);
    # they still get it while its expected survivors reach t, and a clear refusal when not.
    assert gets_complete_graph(10, 0.2) and gets_complete_graph(50, 0.3)
    assert 10 * neighbourhood_shortfall(9, 5, 0.2) > DEFAULT_FAIL_PROB
    with pytest.raises(ValueError, match=r"dropout=0\.6 .* complete graph \(n=40\)"):
        derive_params(40, dropout=0.6)
    with pytest.raises(ValueError, match=r"dropout=0\.6 .* complete graph \(n=1000\)"):
        derive_params(1000, dropout=0.6)


def test_explicit_degree_above_the_cohort_is_capped_at_the_complete_graph() -> None:
    # A spec asking k = 20, t = 11 meets a round where only 10 devices checked in.
    p = derive_params(10, k=20, t=11)
    assert (p.k, p.t) == (9, 5)  # t scaled by 9/20 and rounded up: still a majority
    assert (derive_params(10, k=20).k, derive_params(10, k=20).t) == (9, 5)
    assert (derive_params(6, k=10, t=10).k, derive_params(6, k=10, t=10).t) == (5, 5)
    assert (derive_params(3, k=8, t=5).k, derive_params(3, k=8, t=5).t) == (2, 2)
    assert derive_params(10, k=9, t=7).t == 7  # within the cohort: taken as given


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be at least 1, got k=0"),
        ({"k": 20, "t": 21}, "t must be between 1 and k = 20, got t=21"),
        ({"k": 20, "t": 0}, "t must be between 1 and k = 20, got t=0"),
        ({"k": 4, "t": 5}, "t must be between 1 and k = 4, got t=5"),
    ],
)
def test_explicit_nonsense_is_still_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        derive_params(10, **kwargs)  # type: ignore[arg-type]
