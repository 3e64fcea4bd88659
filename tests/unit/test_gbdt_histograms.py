"""Level histograms: the vectorised sums, their fixed-point encoding under a modular sum, the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from shared.gbdt.histograms import (
    SCALE,
    HistogramError,
    LevelHistogram,
    check_histogram,
    decode,
    encode,
    level_histogram,
)
from shared.gbdt.objectives import gradients
from shared.gbdt.simulation import secure_sum

SLOTS, FEATURES, WIDTH = 3, 4, 6


def device(seed: int, n: int = 200, trees: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, WIDTH, size=(n, FEATURES)).astype(np.uint8)
    slots = rng.integers(-1, SLOTS, size=(n, trees)).astype(np.int32)
    grad, hess = gradients("binary:logistic", rng.normal(size=n), rng.integers(0, 2, n))
    return codes, slots, grad, hess


def test_level_histogram_equals_a_loop_over_rows() -> None:
    codes, slots, _, _ = device(0, n=120, trees=2)
    rng = np.random.default_rng(1)
    grad, hess = rng.normal(size=(120, 2)), rng.random(size=(120, 2))
    hist = level_histogram(codes, slots, grad, hess, SLOTS, WIDTH)
    g = np.zeros((SLOTS, FEATURES, WIDTH))
    h = np.zeros_like(g)
    rows = np.zeros(SLOTS, dtype=np.int64)
    for r in range(120):
        for t in range(2):
            s = slots[r, t]
            if s < 0:
                continue
            rows[s] += 1
            for f in range(FEATURES):
                g[s, f, codes[r, f]] += grad[r, t]
                h[s, f, codes[r, f]] += hess[r, t]
    assert np.allclose(hist.grad, g) and np.allclose(hist.hess, h)
    assert np.array_equal(hist.rows, rows)


def test_modular_sum_of_encodings_decodes_to_the_float_sum_within_the_fixed_point_step() -> None:
    hists = [level_histogram(*device(seed), SLOTS, WIDTH) for seed in range(25)]
    total = decode(secure_sum([encode(h, devices=25) for h in hists]), SLOTS, FEATURES, WIDTH)
    float_g = sum(h.grad for h in hists)
    float_h = sum(h.hess for h in hists)
    assert (float_g < 0).any()  # negative sums travel as two's complement and wrap back
    step = 25 / (2 * SCALE)
    assert np.abs(total.grad - float_g).max() <= step
    assert np.abs(total.hess - float_h).max() <= step
    assert np.array_equal(total.rows, sum(h.rows for h in hists))


def test_encode_refuses_a_sum_the_cohort_could_wrap_around() -> None:
    hist = level_histogram(*device(0), SLOTS, WIDTH)
    big = LevelHistogram(grad=hist.grad * 1e9, hess=hist.hess, rows=hist.rows)
    encode(big, devices=1)
    with pytest.raises(HistogramError) as err:
        encode(big, devices=10_000)
    assert err.value.reason == "too_large"


def test_decode_refuses_a_vector_of_another_length() -> None:
    vector = encode(level_histogram(*device(0), SLOTS, WIDTH), devices=1)
    with pytest.raises(HistogramError) as err:
        decode(vector[:-1], SLOTS, FEATURES, WIDTH)
    assert err.value.reason == "shape"


def _tampered(kind: str) -> tuple[LevelHistogram, int]:
    hist = level_histogram(*device(3), SLOTS, WIDTH)
    g, h, rows = hist.grad.copy(), hist.hess.copy(), hist.rows.copy()
    declared = 200
    if kind == "shape":
        g = g[:, :-1]
    elif kind == "non_finite":
        g[1, 2, 3] = np.nan
    elif kind == "negative_hessian":
        h[0, 0, 0] = -1.0
    elif kind == "negative_rows":
        rows[2] = -1
    elif kind == "rows_exceed":
        declared = int(rows.sum()) - 1
    elif kind == "features_disagree":
        g[1, 3, 0] += 0.5
    elif kind == "hessian_bound":
        h[2] *= 1.0 + 0.26 * rows[2] / h[2, 0].sum()
    elif kind == "gradient_bound":
        g[2] = 0.0
        g[2, :, 0] = rows[2] + 1.0
    return LevelHistogram(grad=g, hess=h, rows=rows), declared


@pytest.mark.parametrize(
    "reason",
    [
        "shape",
        "non_finite",
        "negative_hessian",
        "negative_rows",
        "rows_exceed",
        "features_disagree",
        "hessian_bound",
        "gradient_bound",
    ],
)
def test_bad_histogram_is_refused_with_the_named_reason(reason: str) -> None:
    hist, declared = _tampered(reason)
    with pytest.raises(HistogramError) as err:
        check_histogram(
            hist, n_slots=SLOTS, features=FEATURES, width=WIDTH, objective="binary:logistic", rows=declared
        )
    assert err.value.reason == reason


def test_honest_histograms_pass_the_checks_alone_and_summed() -> None:
    hists = [level_histogram(*device(seed), SLOTS, WIDTH) for seed in range(5)]
    for h in hists:
        check_histogram(
            h, n_slots=SLOTS, features=FEATURES, width=WIDTH, objective="binary:logistic", rows=200
        )
    total = decode(secure_sum([encode(h, devices=5) for h in hists]), SLOTS, FEATURES, WIDTH)
    check_histogram(
        total,
        n_slots=SLOTS,
        features=FEATURES,
        width=WIDTH,
        objective="binary:logistic",
        rows=1000,
        devices=5,
    )


def test_squared_error_hessian_must_equal_the_row_count() -> None:
    codes, slots, _, _ = device(4)
    grad, hess = gradients("reg:squarederror", np.zeros(200), np.random.default_rng(4).normal(size=200))
    hist = level_histogram(codes, slots, grad, hess, SLOTS, WIDTH)
    check_histogram(hist, n_slots=SLOTS, features=FEATURES, width=WIDTH, objective="reg:squarederror")
    scaled = LevelHistogram(grad=hist.grad, hess=hist.hess * 0.9, rows=hist.rows)
    with pytest.raises(HistogramError) as err:
        check_histogram(scaled, n_slots=SLOTS, features=FEATURES, width=WIDTH, objective="reg:squarederror")
    assert err.value.reason == "hessian_bound"
