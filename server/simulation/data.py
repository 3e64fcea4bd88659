"""The simulation's data: a pooled table, its held-out test rows, and one small frame per device.

The pool is a bundled data set (``shared.datasets``: ``mlc_churn``, ``ames``) or a CSV/Parquet
file. A fifth of its rows (stratified by the target for a classifier) is held out as the job's
reference rows: the coordinator's central evaluation of every version, and the final model's and
the ceiling's test rows, as in the demo. The rest is dealt to the devices (``splits``).

The rows go through ``shared.tabular.load_table`` once, so each device's frame has the column
types its app would read from its own file; the devices then keep their frames in memory.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from server.simulation.splits import Split, split_frame
from shared.datasets import DATASETS, load_dataset, test_split
from shared.jobspec import DataSchema
from shared.tabular import load_table

TEST_FRACTION = 0.2


class DataSetupError(ValueError):
    """The data cannot be loaded or dealt as asked; the message says why."""


@dataclass
class SimulationData:
    """What the devices hold and what the final model is measured on."""

    parts: list[pd.DataFrame]  # one frame per device
    train: pd.DataFrame  # every device's rows pooled (the ceiling's training rows)
    test: pd.DataFrame  # the held-out rows
    reference: bytes  # ``test`` as CSV: the job's reference data
    name: str  # the data set's name or the file's
    split: str  # the split as described


def _typed(df: pd.DataFrame, schema: DataSchema) -> pd.DataFrame:
    """``df`` as a device reads it from a CSV file: categorical columns and a class target as text."""
    with tempfile.TemporaryDirectory(prefix="aicfl-sim-data-") as tmp:
        path = Path(tmp) / "pool.csv"
        df.to_csv(path, index=False)
        return load_table(path, schema)


def load_pool(source: str, schema: DataSchema) -> tuple[pd.DataFrame, str, str | None]:
    """The pooled rows of a bundled set or a file: ``(frame, name, natural group column or None)``."""
    if source in DATASETS:
        df, _, group = load_dataset(source)
        return df, source, group
    path = Path(source)
    if not path.exists():
        raise DataSetupError(
            f"--data {source}: neither a bundled data set ({', '.join(DATASETS)}) nor a file"
        )
    try:
        return load_table(path, schema), path.name, None
    except ValueError as err:
        raise DataSetupError(f"--data {source}: {err}") from None


def prepare(
    source: str, schema: DataSchema, split: Split, devices: int, seed: int
) -> tuple[SimulationData, dict[str, Any]]:
    """Load, hold out the test rows, deal the rest; also returns the split as described."""
    df, name, group = load_pool(source, schema)
    missing = [c for c in [schema.target, *(f.name for f in schema.features)] if c not in df.columns]
    if missing:
        raise DataSetupError(f"--data {source}: no column {missing[0]!r} that the job's [data] names")
    if split.kind == "group" and split.column is None:
        if group is None:
            raise DataSetupError(f"--split group needs a column for --data {source}: group:COLUMN")
        split = Split("group", column=group)
    stratify = schema.target if schema.task != "regression" else None
    try:
        train, test = test_split(df, TEST_FRACTION, seed, stratify_column=stratify)
        parts = split_frame(_typed(train, schema), split, devices, seed, target=schema.target)
    except ValueError as err:
        raise DataSetupError(f"--devices {devices}: {err}") from None
    buf = io.StringIO()
    test.to_csv(buf, index=False)
    data = SimulationData(
        parts=parts,
        train=pd.concat(parts),
        test=test,
        reference=buf.getvalue().encode(),
        name=name,
        split=split.describe(),
    )
    return data, {"split": split.describe(), "rows": [len(p) for p in parts]}
