"""SecAgg+ settings and inputs out of range are refused with the bound they break; odd cohorts still get a graph."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from shared.jobspec import DataSchema
from shared.secagg import statistics as st
from shared.secagg.params import SecAggParams, derive_params
from shared.secagg.quantize import dequantize_weighted_mean, quantize
from shared.tabular import local_statistics, merge_statistics


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 4, "t": 5}, "need 1 <= t <= k, got t=5, k=4"),
        ({"k": 4, "t": 0}, "need 1 <= t <= k, got t=0, k=4"),
        ({"clip": 0.0}, "clip must be a positive finite number, got 0.0"),
        ({"clip": math.inf}, "clip must be a positive finite number, got inf"),
        ({"bits": 33}, "bits must be between 1 and 32, got 33"),
        ({"weight_cap": 0}, "weight_cap must be at least 1, got 0"),
    ],
)
def test_round_parameters_out_of_range_are_refused(fields: dict[str, float], message: str) -> None:
    # The parameters arrive in every secure task; a device must not compute with nonsense.
    with pytest.raises(ValueError, match=f"^{message}$"):
        SecAggParams(**{"k": 4, "t": 3, "clip": 1.0, **fields})  # type: ignore[arg-type]


def test_levels_are_the_largest_quantised_value() -> None:
    assert SecAggParams(k=4, t=3, clip=1.0, bits=16).levels == 65535
    assert SecAggParams(k=4, t=3, clip=1.0, bits=1).levels == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "dropout must be in [0, 1), got -0.1"),
        ({"corruption": 1.0}, "corruption must be in [0, 1), got 1.0"),
        ({"bits": 0}, "bits must be between 1 and 32, got 0"),
        ({"weight_cap": 0}, "weight_cap must be at least 1, got 0"),
    ],
)
def test_derived_parameters_refuse_fractions_and_sizes_out_of_range(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        derive_params(20, **kwargs)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_an_odd_cohort_gets_an_even_degree_so_that_its_graph_exists() -> None:
    # n = 41: the formula gives k = ceil(3 log2 41) = 17, and no 17-regular graph has 41 nodes. (Without
    # dropout: at the default 0.2 the cohort is small enough to get the complete graph, k = 40.)
    p = derive_params(41, dropout=0)
    assert p.k == 18 and (41 * p.k) % 2 == 0
    assert p.t > p.k / 2


def test_a_demanding_threshold_raises_the_degree_past_the_odd_ones() -> None:
    # n = 17: k starts at ceil(3 log2 17) = 13, odd, so 14. Tolerating 65% colluders needs
    # t = 11 of 14; 30% dropout leaves fewer too often at any degree, so the cohort gets the
    # complete graph, 16 (t = 12, 12 survivors expected).
    p = derive_params(17, dropout=0.3, corruption=0.65)
    assert (p.k, p.t) == (16, 12)
    assert p.k - math.floor(0.3 * p.k) >= p.t


def test_quantize_into_a_wrong_buffer_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="out must be a uint64 array of 3 values"):
        quantize(np.zeros(3), 1.0, 8, rng, out=np.empty(3, dtype=np.float64))
    with pytest.raises(ValueError, match="out must be a uint64 array of 3 values"):
        quantize(np.zeros(3), 1.0, 8, rng, out=np.empty(4, dtype=np.uint64))
    with pytest.raises(ValueError, match="bits must be between 1 and 32, got 40"):
        quantize(np.zeros(3), 1.0, 40, rng)


def test_a_mean_over_no_examples_is_refused() -> None:
    with pytest.raises(ValueError, match="the total weight must be positive, got 0"):
        dequantize_weighted_mean(np.zeros(3, dtype=np.uint64), 0, 1.0, 8)


REGRESSION = DataSchema.model_validate(
    {
        "features": [{"name": "x", "type": "numeric"}, {"name": "c", "type": "categorical"}],
        "target": "price",
        "task": "regression",
    }
)


def test_a_regression_jobs_statistics_decode_to_the_plain_merged_ones() -> None:
    frames = [
        pd.DataFrame({"x": [1.0, -2.0, 3.5], "c": ["a", "b", "a"], "price": [-10.25, 20.5, 7.0]}),
        pd.DataFrame({"x": [0.5, 4.0], "c": ["b", "b"], "price": [100.0, -3.5]}),
    ]
    stats = [local_statistics(f, REGRESSION) for f in frames]
    vocab = st.merge_vocabularies([st.vocabulary(s, REGRESSION) for s in stats])
    assert vocab == {"c": ["a", "b"]}  # a regression target has no vocabulary
    total = np.zeros(len(st.layout(REGRESSION, vocab)), dtype=np.uint64)
    for s in stats:
        total += st.encode(s, REGRESSION, vocab)
    decoded = st.decode(total, REGRESSION, vocab)
    plain = merge_statistics(stats)
    assert decoded["target"]["count"] == plain["target"]["count"] == 5
    for key in ("sum", "sum_sq"):
        assert decoded["target"][key] == pytest.approx(plain["target"][key], abs=2 / st.SCALE)


def test_a_summed_vector_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(st.StatisticsEncodingError, match="expected 9 values, got 8"):
        st.decode(np.zeros(8, dtype=np.uint64), REGRESSION, {"c": ["a", "b"]})


def test_a_column_with_too_many_distinct_values_is_refused_before_the_vector_grows() -> None:
    values = [str(i) for i in range(st.MAX_VALUES + 1)]
    with pytest.raises(
        st.StatisticsEncodingError, match=f"column 'c' has {st.MAX_VALUES + 1} distinct values"
    ):
        st.merge_vocabularies([{"c": values[:5000]}, {"c": values[5000:]}])
