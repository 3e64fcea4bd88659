"""Tabular data: loading, checking against the schema, federated statistics, preprocessing."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from shared.jobspec import DataSchema
from shared.tabular import (
    DataSchemaError,
    Preprocessor,
    load_table,
    local_statistics,
    merge_statistics,
    validate_table,
)


def churn_schema(**overrides: object) -> DataSchema:
    data: dict[str, object] = {
        "features": [
            {"name": "account_length", "type": "numeric"},
            {"name": "total_day_minutes", "type": "numeric"},
            {"name": "plan", "type": "categorical"},
        ],
        "target": "churn",
        "task": "binary",
        "positive": "yes",
    }
    data.update(overrides)
    return DataSchema.model_validate(data)


def churn_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    account = rng.integers(1, 200, n).astype(float)
    account[::7] = np.nan  # missing numeric values are allowed
    return pd.DataFrame(
        {
            "account_length": account,
            "total_day_minutes": rng.normal(180, 50, n),
            "plan": rng.choice(["basic", "gold", "silver", "platinum"], n, p=[0.5, 0.25, 0.2, 0.05]),
            "churn": rng.choice(["no", "yes"], n, p=[0.8, 0.2]),
            "ignored": "x",
        }
    )


def regression_schema() -> DataSchema:
    return DataSchema.model_validate(
        {
            "features": [{"name": "x", "type": "numeric"}, {"name": "site", "type": "categorical"}],
            "target": "price",
            "task": "regression",
        }
    )


def regression_frame(n: int = 40, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"x": rng.normal(5, 2, n), "site": rng.choice(["a", "b"], n), "price": rng.normal(1e5, 2e4, n)}
    )


def assert_stats_close(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    assert a["categorical"] == b["categorical"]
    assert a["numeric"].keys() == b["numeric"].keys()
    for col in a["numeric"]:
        assert a["numeric"][col]["count"] == b["numeric"][col]["count"]
        assert a["numeric"][col]["sum"] == pytest.approx(b["numeric"][col]["sum"], rel=1e-12)
        assert a["numeric"][col]["sum_sq"] == pytest.approx(b["numeric"][col]["sum_sq"], rel=1e-12)
    assert a["target"].keys() == b["target"].keys()
    for key in a["target"]:
        assert a["target"][key] == pytest.approx(b["target"][key], rel=1e-12)


# --------------------------------------------------------------------------- statistics


def test_statistics_merged_from_a_split_equal_statistics_of_the_whole() -> None:
    schema, df = churn_schema(), churn_frame()
    parts = [df.iloc[:13], df.iloc[13:40], df.iloc[40:]]
    merged = merge_statistics([local_statistics(p, schema) for p in parts])
    assert_stats_close(merged, local_statistics(df, schema))


def test_regression_statistics_merged_from_a_split_equal_statistics_of_the_whole() -> None:
    schema, df = regression_schema(), regression_frame()
    merged = merge_statistics([local_statistics(df.iloc[:9], schema), local_statistics(df.iloc[9:], schema)])
    assert_stats_close(merged, local_statistics(df, schema))


def test_local_statistics_hold_only_aggregates_and_are_json() -> None:
    schema, df = churn_schema(), churn_frame()
    stats = json.loads(json.dumps(local_statistics(df, schema)))
    assert stats["rows"] == len(df)
    account = df["account_length"].dropna()
    assert stats["numeric"]["account_length"] == {
        "count": len(account),
        "sum": pytest.approx(account.sum()),
        "sum_sq": pytest.approx((account**2).sum()),
    }
    assert stats["categorical"]["plan"] == df["plan"].value_counts().to_dict()
    assert stats["target"] == df["churn"].value_counts().to_dict()
    assert "ignored" not in json.dumps(stats)


def test_merge_statistics_refuses_an_empty_list() -> None:
    with pytest.raises(ValueError):
        merge_statistics([])


def test_categorical_values_count_the_same_whatever_the_dtype() -> None:
    schema = DataSchema.model_validate(
        {"features": [{"name": "area", "type": "categorical"}], "target": "y", "task": "multiclass"}
    )
    ints = pd.DataFrame({"area": [415, 408], "y": ["a", "b"]})
    floats_with_gap = pd.DataFrame({"area": [415.0, np.nan], "y": [1.0, 2.0]})
    assert local_statistics(ints, schema)["categorical"]["area"] == {"415": 1, "408": 1}
    stats = local_statistics(floats_with_gap, schema)
    assert stats["categorical"]["area"] == {"415": 1}
    assert stats["target"] == {"1": 1, "2": 1}


# --------------------------------------------------------------------------- preprocessor


def fitted(schema: DataSchema, frames: list[pd.DataFrame]) -> Preprocessor:
    return Preprocessor.from_statistics(
        merge_statistics([local_statistics(f, schema) for f in frames]), schema
    )


def test_preprocessor_standardises_with_the_pooled_mean_and_std() -> None:
    schema, df = churn_schema(), churn_frame()
    pre = fitted(schema, [df.iloc[:30], df.iloc[30:]])
    X, _ = pre.transform(df)
    account = df["account_length"].to_numpy()
    expected = (account - np.nanmean(account)) / np.nanstd(account)
    col = pre.feature_names.index("account_length")
    np.testing.assert_allclose(X[:, col], np.nan_to_num(expected, nan=0.0), rtol=1e-5, atol=1e-6)
    assert X.dtype == np.float32 and X.shape == (len(df), pre.input_dim)
    assert np.all(X[np.isnan(account), col] == 0.0)


def test_one_hot_vocabulary_is_sorted_by_count_and_capped() -> None:
    schema = churn_schema(max_categories=2)
    df = pd.DataFrame(
        {
            "account_length": [1.0] * 6,
            "total_day_minutes": [2.0] * 6,
            "plan": ["gold", "basic", "gold", "basic", "silver", "gold"],
            "churn": ["no"] * 6,
        }
    )
    pre = fitted(schema, [df])
    assert pre.feature_names == ["account_length", "total_day_minutes", "plan=gold", "plan=basic"]
    new = df.iloc[:3].assign(plan=["basic", "silver", None])
    X = pre.transform_features(new.drop(columns=["churn"]))
    np.testing.assert_array_equal(X[:, 2:], [[0, 1], [0, 0], [0, 0]])


def test_vocabulary_ties_break_by_value() -> None:
    schema = churn_schema()
    df = churn_frame(4).assign(plan=["b", "a", "c", "a"])
    assert fitted(schema, [df]).vocabularies["plan"] == ["a", "b", "c"]


def test_preprocessor_round_trips_through_json() -> None:
    schema, df = churn_schema(), churn_frame()
    pre = fitted(schema, [df])
    again = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again.to_dict() == pre.to_dict()
    X1, y1 = pre.transform(df)
    X2, y2 = again.transform(df)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    assert again.feature_names == pre.feature_names and again.classes == pre.classes


def test_regression_preprocessor_round_trips_and_inverts_the_target() -> None:
    schema, df = regression_schema(), regression_frame()
    pre = Preprocessor.from_dict(json.loads(json.dumps(fitted(schema, [df]).to_dict())))
    _, y = pre.transform(df)
    assert pre.target_mean == pytest.approx(df["price"].mean())
    assert pre.target_std == pytest.approx(df["price"].std(ddof=0))
    assert y.dtype == np.float32 and abs(float(y.mean())) < 1e-5
    np.testing.assert_allclose(pre.inverse_target(y), df["price"], rtol=1e-6)
    assert pre.output_dim == 1 and pre.classes == []


def test_binary_target_uses_the_named_positive_label() -> None:
    df = churn_frame()
    pre = fitted(churn_schema(), [df])
    _, y = pre.transform(df)
    assert pre.classes == ["no", "yes"] and pre.output_dim == 1
    np.testing.assert_array_equal(y, (df["churn"] == "yes").astype(np.float32))


def test_binary_positive_defaults_to_the_larger_label() -> None:
    df = churn_frame().assign(churn=lambda d: d["churn"].map({"no": "stay", "yes": "leave"}))
    pre = fitted(churn_schema(positive=None), [df])
    _, y = pre.transform(df)
    assert pre.positive == "stay"
    np.testing.assert_array_equal(y, (df["churn"] == "stay").astype(np.float32))


def test_binary_target_with_three_labels_in_the_federation_is_refused() -> None:
    schema = churn_schema(positive=None)
    a = churn_frame(10).assign(churn="no")
    b = churn_frame(10).assign(churn=["yes"] * 5 + ["maybe"] * 5)
    with pytest.raises(DataSchemaError, match="churn") as err:
        fitted(schema, [a, b])
    assert err.value.column == "churn"


def test_multiclass_target_indexes_sorted_labels() -> None:
    schema = churn_schema(task="multiclass", positive=None)
    df = churn_frame().assign(
        churn=lambda d: np.where(d["plan"] == "gold", "c", np.where(d.index % 2, "a", "b"))
    )
    pre = fitted(schema, [df])
    _, y = pre.transform(df)
    assert pre.classes == ["a", "b", "c"] and pre.output_dim == 3
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, df["churn"].map({"a": 0, "b": 1, "c": 2}))


def test_transform_refuses_a_label_the_federation_never_saw() -> None:
    schema = churn_schema(task="multiclass", positive=None)
    pre = fitted(schema, [churn_frame()])
    with pytest.raises(DataSchemaError, match=r"column 'churn' \(target\): label 'maybe' is not one of"):
        pre.transform(churn_frame(5).assign(churn=["no", "no", "maybe", "yes", "no"]))


# --------------------------------------------------------------------------- validation


def test_validate_accepts_good_data_with_missing_feature_values() -> None:
    validate_table(churn_frame(), churn_schema())


def test_validate_names_a_missing_column() -> None:
    df = churn_frame().drop(columns=["total_day_minutes"])
    with pytest.raises(DataSchemaError) as err:
        validate_table(df, churn_schema())
    assert err.value.column == "total_day_minutes"
    assert str(err.value).startswith("column 'total_day_minutes': missing from the data")


def test_validate_names_a_non_numeric_value_and_its_row() -> None:
    df = churn_frame().astype({"account_length": object})
    df.loc[16, "account_length"] = "abc"
    with pytest.raises(DataSchemaError) as err:
        validate_table(df, churn_schema())
    assert err.value.column == "account_length"
    assert str(err.value) == "column 'account_length': expected numbers, found 'abc' (row 17)"


def test_validate_accepts_numbers_written_as_text() -> None:
    df = churn_frame().assign(total_day_minutes=lambda d: d["total_day_minutes"].map(str))
    validate_table(df, churn_schema())


def test_validate_refuses_infinite_numbers() -> None:
    df = churn_frame()
    df.loc[3, "total_day_minutes"] = np.inf
    with pytest.raises(DataSchemaError, match=r"column 'total_day_minutes': .*finite.*\(row 4\)"):
        validate_table(df, churn_schema())


def test_validate_refuses_a_missing_target() -> None:
    df = churn_frame()
    df.loc[5, "churn"] = None
    with pytest.raises(DataSchemaError, match=r"column 'churn' \(target\): missing value \(row 6\)") as err:
        validate_table(df, churn_schema())
    assert err.value.is_target


def test_validate_refuses_a_third_binary_label() -> None:
    df = churn_frame()
    df.loc[2, "churn"] = "maybe"
    with pytest.raises(DataSchemaError, match=r"column 'churn' \(target\).*'maybe'"):
        validate_table(df, churn_schema())


def test_validate_checks_labels_against_known_classes() -> None:
    df = churn_frame(20).assign(churn="no")
    df.loc[19, "churn"] = "maybe"
    schema = churn_schema(task="multiclass", positive=None)
    with pytest.raises(DataSchemaError, match=r"label 'maybe' is not one of 'no', 'yes' \(row 20\)"):
        validate_table(df, schema, classes=["no", "yes"])


def test_validate_refuses_a_non_numeric_regression_target() -> None:
    df = regression_frame().astype({"price": object})
    df.loc[0, "price"] = "cheap"
    with pytest.raises(DataSchemaError, match=r"column 'price' \(target\): expected numbers"):
        validate_table(df, regression_schema())


def test_validate_refuses_an_empty_table() -> None:
    with pytest.raises(DataSchemaError, match="no rows") as err:
        validate_table(churn_frame().iloc[:0], churn_schema())
    assert err.value.column is None


def test_data_schema_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(DataSchemaError("x", "bad", True)))
    assert (err.column, err.problem, err.is_target) == ("x", "bad", True)
    assert str(err) == "column 'x' (target): bad"


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".pq"])
def test_load_table_reads_csv_and_parquet(tmp_path, suffix: str) -> None:
    df = churn_frame(10)
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    loaded = load_table(path)
    pd.testing.assert_frame_equal(loaded, df, check_dtype=False)


def test_load_table_keeps_leading_zeros_of_categorical_codes(tmp_path) -> None:
    path = tmp_path / "zip.csv"
    path.write_text("account_length,total_day_minutes,plan,churn\n1,2,007,no\n")
    assert load_table(path, churn_schema())["plan"].tolist() == ["007"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.csv", None, "does not exist"),
        ("data.xlsx", b"x", "unknown file type '.xlsx'"),
        ("empty.csv", b"", "is empty"),
        ("bad.parquet", b"not parquet at all", "not a readable Parquet file"),
    ],
)
def test_load_table_explains_files_it_cannot_use(
    tmp_path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataSchemaError, match=message) as err:
        load_table(path)
    assert err.value.column is None
