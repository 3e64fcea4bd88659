"""Bundled data sets and their natural federated splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared import datasets
from shared.jobspec import DataSchema
from shared.tabular import validate_table


@pytest.fixture(scope="module")
def churn() -> tuple[pd.DataFrame, dict, str]:
    return datasets.load_dataset("mlc_churn")


def test_mlc_churn_has_its_schema_and_state_as_the_split(churn) -> None:
    df, schema_dict, group = churn
    schema = DataSchema.model_validate(schema_dict)
    assert df.shape == (5000, 20) and "rownames" not in df.columns
    assert group == "state" and df[group].nunique() == 51
    names = {f.name: f.type for f in schema.features}
    assert "state" not in names and "churn" not in names
    assert {n for n, t in names.items() if t == "categorical"} == {
        "area_code",
        "international_plan",
        "voice_mail_plan",
    }
    assert len(names) == 18
    assert (schema.target, schema.task, schema.positive) == ("churn", "binary", "yes")
    validate_table(df, schema)


def test_ames_is_a_regression_set_split_by_neighborhood() -> None:
    df, schema_dict, group = datasets.load_dataset("ames")
    schema = DataSchema.model_validate(schema_dict)
    assert schema.task == "regression" and schema.target == "Sale_Price"
    assert group == "Neighborhood" and df[group].nunique() == 28
    assert group not in {f.name for f in schema.features}
    validate_table(df, schema)


def test_unknown_data_set_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="mlc_churn.*ames"):
        datasets.load_dataset("iris")


def test_natural_split_partitions_rows_exactly_and_keeps_groups_whole(churn) -> None:
    df, _, group = churn
    parts = datasets.natural_split(df, group, 7, seed=0)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    combined = pd.concat(parts)
    assert combined.index.is_unique
    assert sorted(combined.index) == sorted(df.index)
    pd.testing.assert_frame_equal(combined.sort_index(), df)
    owners = [set(p[group]) for p in parts]
    for i, a in enumerate(owners):
        for b in owners[i + 1 :]:
            assert not a & b
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= df[group].value_counts().max()


def test_natural_split_is_reproducible_under_its_seed(churn) -> None:
    df, _, group = churn
    a = datasets.natural_split(df, group, 5, seed=1)
    b = datasets.natural_split(df, group, 5, seed=1)
    assert [list(p.index) for p in a] == [list(p.index) for p in b]
    c = datasets.natural_split(df, group, 5, seed=2)
    assert [list(p.index) for p in a] != [list(p.index) for p in c]


def test_natural_split_gives_every_device_a_group_even_when_sizes_are_skewed() -> None:
    df = pd.DataFrame({"g": ["big"] * 50 + ["a", "b", "c"], "x": range(53)})
    parts = datasets.natural_split(df, "g", 4, seed=0)
    assert sorted(len(p) for p in parts) == [1, 1, 1, 50]


def test_natural_split_keeps_rows_with_a_missing_group() -> None:
    df = pd.DataFrame({"g": ["a", None, "b", None], "x": range(4)})
    parts = datasets.natural_split(df, "g", 3, seed=0)
    assert sorted(pd.concat(parts)["x"]) == [0, 1, 2, 3]


def test_natural_split_refuses_more_devices_than_groups() -> None:
    df = pd.DataFrame({"g": ["a", "a", "b"], "x": range(3)})
    with pytest.raises(ValueError, match="3 devices.*2 groups"):
        datasets.natural_split(df, "g", 3, seed=0)


def test_test_split_is_disjoint_seeded_and_stratified(churn) -> None:
    df, _, _ = churn
    train, test = datasets.test_split(df, 0.2, seed=0, stratify_column="churn")
    assert len(test) == pytest.approx(0.2 * len(df), abs=2)
    assert not set(train.index) & set(test.index)
    assert len(train) + len(test) == len(df)
    overall = (df["churn"] == "yes").mean()
    assert (test["churn"] == "yes").mean() == pytest.approx(overall, abs=0.002)
    again, _ = datasets.test_split(df, 0.2, seed=0, stratify_column="churn")
    assert list(again.index) == list(train.index)
    other, _ = datasets.test_split(df, 0.2, seed=1)
    assert list(other.index) != list(train.index)


def test_test_split_refuses_fractions_that_leave_a_side_empty() -> None:
    df = pd.DataFrame({"x": np.arange(3)})
    with pytest.raises(ValueError):
        datasets.test_split(df, 1.0, seed=0)
    with pytest.raises(ValueError, match="too few"):
        datasets.test_split(df, 0.1, seed=0)
