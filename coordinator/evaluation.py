"""Central evaluation of a model version on the job's reference data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from shared.jobspec import DataSchema
from shared.tabular import Preprocessor, read_table_bytes, validate_table
from shared.training import evaluate
from shared.zoo import build_model, load_flat_parameters


def check_reference(data: bytes, schema: DataSchema) -> pd.DataFrame:
    """Parse reference data and check it against the job's schema (raises DataSchemaError)."""
    df = read_table_bytes(data, schema)
    validate_table(df, schema)
    return df


def metrics_on(
    df: pd.DataFrame, schema: DataSchema, preprocess: dict[str, Any], arch: dict[str, Any], vector: np.ndarray
) -> dict[str, float]:
    """The model's metrics on a frame, in original target units."""
    pre = Preprocessor.from_dict(preprocess)
    x, y = pre.transform(df)
    model = build_model(arch)
    load_flat_parameters(model, vector)
    return evaluate(model, x, y, task=schema.task, target_mean=pre.target_mean, target_std=pre.target_std)


def weighted_mean(items: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Example-weighted mean of per-device metrics (the federated evaluation)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    examples = 0
    for n, metrics in items:
        if n <= 0:
            continue
        examples += n
        for name, value in metrics.items():
            if name == "examples":
                continue
            totals[name] = totals.get(name, 0.0) + n * float(value)
            weights[name] = weights.get(name, 0.0) + n
    out = {name: totals[name] / weights[name] for name in totals}
    if examples:
        out["examples"] = float(examples)
    return out
