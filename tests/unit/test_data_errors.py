"""Data that cannot be used is refused with a message naming the file, column or statistic at fault."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.datasets import natural_split, test_split
from shared.jobspec import DataSchema
from shared.tabular import (
    DataSchemaError,
    Preprocessor,
    category_strings,
    load_table,
    local_statistics,
    merge_statistics,
    read_table_bytes,
)

SCHEMA = DataSchema.model_validate(
    {
        "features": [{"name": "x", "type": "numeric"}, {"name": "c", "type": "categorical"}],
        "target": "y",
        "task": "binary",
    }
)


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- files and bytes


def test_a_folder_named_like_a_data_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.csv").mkdir()
    with pytest.raises(DataSchemaError, match=r"data file '.*data.csv' is not a regular file") as err:
        load_table(tmp_path / "data.csv")
    assert err.value.column is None


def test_a_csv_of_blank_lines_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("\n\n")
    with pytest.raises(DataSchemaError, match=r"data file '.*blank.csv' is empty"):
        load_table(path)


def test_a_parquet_file_without_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "none.parquet"
    path.write_bytes(parquet_bytes(pd.DataFrame(index=range(3))))
    with pytest.raises(DataSchemaError, match=r"data file '.*none.parquet' has no columns"):
        load_table(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\n", "the table is empty"),
        (b"", "the table is empty"),
        (b"PAR1 this is no parquet", "not a readable Parquet table: "),
        (b'x,y\n"1,no\n', "not a readable CSV table: "),
    ],
    ids=["blank", "no-bytes", "bad-parquet", "unclosed-quote"],
)
def test_table_bytes_that_are_no_table_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(DataSchemaError, match=f"^{message}") as err:
        read_table_bytes(data)
    assert err.value.column is None


def test_table_bytes_without_columns_are_refused() -> None:
    with pytest.raises(DataSchemaError, match="^the table has no columns$"):
        read_table_bytes(parquet_bytes(pd.DataFrame(index=range(2))))


def test_table_bytes_read_with_the_schema_keep_category_codes_as_text() -> None:
    df = read_table_bytes(b"x,c,y\n1.5,007,1\n2,010,0\n", SCHEMA)
    assert df["c"].tolist() == ["007", "010"] and df["y"].tolist() == ["1", "0"]
    assert df["x"].tolist() == [1.5, 2.0]


# --------------------------------------------------------------------------- values and statistics


def test_boolean_categories_are_spelled_like_their_text() -> None:
    # A Parquet bool column and a CSV "True"/"False" column must land in the same categories.
    assert category_strings(pd.Series([True, False, None], dtype=object)).tolist() == ["True", "False", pd.NA]
    assert category_strings(pd.Series([np.True_, np.False_])).tolist() == ["True", "False"]


@pytest.mark.parametrize(
    "part",
    [{"rows": 3}, {"rows": 3, "numeric": [], "categorical": {}, "target": {}}, "not a dict"],
    ids=["missing-sections", "list-section", "string"],
)
def test_merging_something_that_is_not_local_statistics_is_refused(part: object) -> None:
    good = local_statistics(pd.DataFrame({"x": [1.0], "c": ["a"], "y": ["no"]}), SCHEMA)
    with pytest.raises(ValueError, match="^not a set of local statistics: "):
        merge_statistics([good, part])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("drop", "column", "problem"),
    [
        (("numeric", "x"), "x", "no statistics were collected for this column"),
        (("categorical", "c"), "c", "no statistics were collected for this column"),
        (("target", None), "y", "no target labels were collected"),
    ],
)
def test_a_preprocessor_needs_statistics_for_every_column(
    drop: tuple[str, str | None], column: str, problem: str
) -> None:
    stats = local_statistics(pd.DataFrame({"x": [1.0, 2.0], "c": ["a", "b"], "y": ["no", "yes"]}), SCHEMA)
    section, name = drop
    if name is None:
        stats[section] = {}
    else:
        del stats[section][name]
    with pytest.raises(DataSchemaError) as err:
        Preprocessor.from_statistics(stats, SCHEMA)
    assert (err.value.column, err.value.problem) == (column, problem)


def test_a_regression_preprocessor_needs_target_values() -> None:
    schema = DataSchema.model_validate(
        {"features": [{"name": "x", "type": "numeric"}], "target": "price", "task": "regression"}
    )
    stats = {
        "rows": 0,
        "numeric": {"x": {"count": 0, "sum": 0.0, "sum_sq": 0.0}},
        "categorical": {},
        "target": {},
    }
    with pytest.raises(DataSchemaError, match="column 'price' \\(target\\): no target values were collected"):
        Preprocessor.from_statistics(stats, schema)


def test_a_numeric_column_missing_on_every_device_becomes_zero() -> None:
    df = pd.DataFrame({"x": [np.nan, np.nan], "c": ["a", "b"], "y": ["no", "yes"]})
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(df, SCHEMA)]), SCHEMA)
    assert (pre.means["x"], pre.stds["x"]) == (0.0, 1.0)
    x, _ = pre.transform(df)
    assert x[:, pre.feature_names.index("x")].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ({"format": "something/else"}, "not a preprocessor description"),
        ("aicfl.preprocessor/1", "not a preprocessor description"),
        ({"format": "aicfl.preprocessor/1", "schema": {}}, "not a valid preprocessor description: "),
        ({"format": "aicfl.preprocessor/1"}, "not a valid preprocessor description: "),
    ],
    ids=["other-format", "not-a-dict", "bad-schema", "missing-fields"],
)
def test_a_damaged_preprocessor_description_is_refused(description: object, message: str) -> None:
    # It travels in every signed model header; a device must not build inputs from half of one.
    with pytest.raises(ValueError, match=f"^{message}"):
        Preprocessor.from_dict(description)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- example splits


def test_splits_name_a_column_that_is_not_there() -> None:
    df = pd.DataFrame({"state": ["a", "b", "c"], "y": [0, 1, 0]})
    with pytest.raises(ValueError, match="^no column 'label' to stratify on$"):
        test_split(df, 0.5, seed=0, stratify_column="label")
    with pytest.raises(ValueError, match="^no group column 'region' in the data$"):
        natural_split(df, "region", 2, seed=0)


def test_a_split_for_no_device_is_refused() -> None:
    df = pd.DataFrame({"state": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="^n_devices must be at least 1, got 0$"):
        natural_split(df, "state", 0, seed=0)
