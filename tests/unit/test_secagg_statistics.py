"""The statistics round's integer encoding: the modular sum decodes to the plain merged statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.jobspec import DataSchema
from shared.secagg import statistics as st
from shared.tabular import Preprocessor, local_statistics, merge_statistics

SCHEMA = DataSchema.model_validate(
    {
        "features": [{"name": "x", "type": "numeric"}, {"name": "c", "type": "categorical"}],
        "target": "y",
        "task": "multiclass",
    }
)


def frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(3)
    return [
        pd.DataFrame({"x": rng.normal(-50, 20, n), "c": rng.choice(vals, n), "y": rng.choice(labels, n)})
        for n, vals, labels in (
            (40, ["a", "b"], ["p", "q"]),
            (25, ["b", "z"], ["q", "r"]),
            (60, ["a"], ["p"]),
        )
    ]


def test_modular_sum_of_encodings_decodes_to_the_merged_statistics() -> None:
    stats = [local_statistics(f, SCHEMA) for f in frames()]
    vocab = st.merge_vocabularies([st.vocabulary(s, SCHEMA) for s in stats])
    assert vocab == {"c": ["a", "b", "z"], "y": ["p", "q", "r"]}
    total = np.zeros(len(st.layout(SCHEMA, vocab)), dtype=np.uint64)
    for s in stats:
        total += st.encode(s, SCHEMA, vocab)  # wraps modulo 2**64, negative sums included
    decoded = st.decode(total, SCHEMA, vocab)
    plain = merge_statistics(stats)
    assert decoded["rows"] == plain["rows"] == 125
    assert decoded["categorical"] == plain["categorical"] and decoded["target"] == plain["target"]
    for key in ("count", "sum", "sum_sq"):
        assert decoded["numeric"]["x"][key] == pytest.approx(
            plain["numeric"]["x"][key], abs=len(stats) / st.SCALE
        )
    assert plain["numeric"]["x"]["sum"] < 0
    a = Preprocessor.from_statistics(decoded, SCHEMA)
    b = Preprocessor.from_statistics(plain, SCHEMA)
    assert a.feature_names == b.feature_names and a.classes == b.classes


def test_value_outside_the_vocabulary_is_refused() -> None:
    s = local_statistics(frames()[1], SCHEMA)
    with pytest.raises(st.StatisticsEncodingError, match="'z' is not in the round's vocabulary"):
        st.encode(s, SCHEMA, {"c": ["a", "b"], "y": ["q", "r"]})


def test_value_too_large_to_encode_is_refused() -> None:
    f = pd.DataFrame({"x": [1e30, 2.0], "c": ["a", "a"], "y": ["p", "p"]})
    s = local_statistics(f, SCHEMA)
    with pytest.raises(st.StatisticsEncodingError, match="too large"):
        st.encode(s, SCHEMA, st.vocabulary(s, SCHEMA))
