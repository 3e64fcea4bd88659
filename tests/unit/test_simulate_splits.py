"""How ``aicfl simulate JOB.toml`` deals rows to virtual devices (``server.simulation.splits``) and
draws its dropouts (``server.simulation.dropouts``): pure functions over frames and seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from server.simulation.dropouts import draw_dropouts, silent
from server.simulation.splits import (
    Split,
    dirichlet_split,
    group_split,
    iid_split,
    parse_split,
    split_frame,
)


def frame(n: int = 600, groups: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "g": rng.choice(
                [f"g{i}" for i in range(groups)],
                size=n,
                p=np.linspace(1, 3, groups) / np.linspace(1, 3, groups).sum(),
            ),
            "x": rng.normal(size=n),
            "y": rng.choice(["a", "b", "c"], size=n),
        }
    )


def assert_partition(df: pd.DataFrame, parts: list[pd.DataFrame], n: int) -> None:
    """Every row on exactly one device, every device at least one row."""
    assert len(parts) == n
    assert all(len(p) >= 1 for p in parts)
    index = np.concatenate([p.index.to_numpy() for p in parts])
    assert len(index) == len(df) and len(set(index)) == len(df)


def test_parse_split_reads_each_form_and_refuses_others_with_the_flag_named() -> None:
    assert parse_split("group") == Split("group")
    assert parse_split("group:state") == Split("group", column="state")
    assert parse_split("dirichlet:0.5") == Split("dirichlet", alpha=0.5)
    assert parse_split("rows") == Split("rows")
    for bad, words in [
        ("dirichlet", "needs a concentration"),
        ("dirichlet:-1", "positive"),
        ("dirichlet:nan", "positive"),
        ("rows:3", "expected group"),
        ("labels", "expected group"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_split(bad)


def test_rows_split_is_iid_and_balanced() -> None:
    df = frame()
    parts = iid_split(df, 7, seed=1)
    assert_partition(df, parts, 7)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [p.index.tolist() for p in parts] == [p.index.tolist() for p in iid_split(df, 7, seed=1)]


def test_group_split_deals_whole_groups_when_there_are_enough() -> None:
    df = frame()
    parts = group_split(df, "g", 4, seed=2)
    assert_partition(df, parts, 4)
    owners = {g: {i for i, p in enumerate(parts) if g in set(p["g"])} for g in df["g"].unique()}
    assert all(len(o) == 1 for o in owners.values())  # a group is never split


def test_group_split_shares_groups_in_proportion_when_devices_outnumber_them() -> None:
    df = frame(groups=6)
    parts = group_split(df, "g", 50, seed=3)
    assert_partition(df, parts, 50)
    assert all(p["g"].nunique() == 1 for p in parts)  # each device still holds one group
    devices_of = pd.Series([p["g"].iloc[0] for p in parts]).value_counts()
    rows_of = df["g"].value_counts()
    assert set(devices_of.index) == set(rows_of.index)  # every group has a device
    share = (devices_of / 50) - (rows_of / len(df))
    assert share.abs().max() < 0.05  # devices in proportion to the group's rows


def test_dirichlet_split_skews_labels_more_as_alpha_shrinks() -> None:
    df = frame(n=3000)

    def skew(alpha: float) -> float:
        parts = dirichlet_split(df, "y", 20, alpha, seed=4)
        assert_partition(df, parts, 20)
        # The mean share of a device's most common label: 1/3 for IID, 1 for a single label.
        return float(np.mean([p["y"].value_counts(normalize=True).iloc[0] for p in parts]))

    low, high = skew(0.1), skew(100.0)
    assert low > 0.75 and high < 0.45 and low > high


def test_dirichlet_split_leaves_no_device_empty_even_when_draws_would() -> None:
    df = frame(n=300)
    parts = dirichlet_split(df, "y", 200, 0.05, seed=5)
    assert_partition(df, parts, 200)


def test_split_frame_refuses_what_cannot_be_dealt() -> None:
    df = frame(n=30)
    with pytest.raises(ValueError, match="cannot give 31 devices a row each"):
        split_frame(df, Split("rows"), 31, 0, target="y")
    with pytest.raises(ValueError, match="no column 'state'"):
        split_frame(df, Split("group", column="state"), 3, 0, target="y")
    with pytest.raises(ValueError, match="needs a column"):
        split_frame(df, Split("group"), 3, 0, target="y")


def test_dropouts_take_the_rate_of_the_cohort_at_stages_drawn_per_round() -> None:
    devices = [f"d{i}" for i in range(50)]
    stages = ("configure", "advertise_keys", "share_keys", "masked_input", "unmask")
    rng = np.random.default_rng(0)
    rounds = [draw_dropouts(devices, stages, 0.2, rng) for _ in range(40)]
    assert all(len(r) == 10 for r in rounds)
    assert len({frozenset(r) for r in rounds}) > 1  # drawn afresh each round
    at = np.bincount([s for r in rounds for s in r.values()], minlength=len(stages))
    assert (at > 40).all()  # every stage gets its share of the 400 drops
    d, s = next(iter(rounds[0].items()))
    assert not silent(rounds[0], d, s - 1) and silent(rounds[0], d, s) and silent(rounds[0], d, s + 1)
    assert draw_dropouts(devices, stages, 0.0, rng) == {}
    with pytest.raises(ValueError):
        draw_dropouts(devices, stages, 1.0, rng)
