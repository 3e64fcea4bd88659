"""How a pooled table is dealt to N virtual devices: natural groups, Dirichlet label skew, or IID rows.

Three rules, each a pure function of the frame, N and a seed:

- ``group:COLUMN`` (:func:`group_split`): each device holds rows of one group of ``COLUMN`` (a US
  state, a neighbourhood), as real devices hold non-identically distributed data. With no more
  devices than groups, whole groups are dealt (``shared.datasets.natural_split``). With more, each
  group is shared by several devices, in proportion to its rows (largest remainders, at least one
  device per group), its rows dealt at random among them: every device still holds a single group.
- ``dirichlet:ALPHA`` (:func:`dirichlet_split`): label skew, the standard Dirichlet partition over
  the target (Yurochkin et al. 2019; Hsu, Qi and Brown 2019; the NIID-Bench implementation of
  Li et al. 2022): for each class, its rows are split among the devices in proportions drawn from
  Dir(ALPHA), a device already holding its share of the rows taking no more. Small ALPHA gives each
  device few classes; large ALPHA approaches IID.
- ``rows`` (:func:`iid_split`): rows shuffled and dealt in near-equal parts.

Every device gets at least one row, or ``ValueError`` says why it cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared.datasets import natural_split

SPLIT_KINDS = ("group", "dirichlet", "rows")
#: Draws of the Dirichlet partition before devices left empty are given rows from the largest ones.
DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class Split:
    """A parsed ``--split``: ``kind``, and the column (group) or the concentration (dirichlet)."""

    kind: str
    column: str | None = None
    alpha: float | None = None

    def describe(self) -> str:
        if self.kind == "group":
            return f"group:{self.column}" if self.column else "group"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        return "rows"


def parse_split(text: str) -> Split:
    """``group``, ``group:COLUMN``, ``dirichlet:ALPHA`` or ``rows``; ``ValueError`` saying what is wrong."""
    kind, _, arg = text.strip().partition(":")
    if kind == "group":
        return Split("group", column=arg or None)
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(
                f"--split {text!r}: dirichlet needs a concentration, e.g. dirichlet:0.5"
            ) from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"--split {text!r}: the Dirichlet concentration must be a positive number")
        return Split("dirichlet", alpha=alpha)
    if kind == "rows" and not arg:
        return Split("rows")
    raise ValueError(f"--split {text!r}: expected group[:COLUMN], dirichlet:ALPHA or rows")


def _enough_rows(df: pd.DataFrame, n: int) -> None:
    if n < 1:
        raise ValueError(f"need at least one device, got {n}")
    if n > len(df):
        raise ValueError(f"cannot give {n} devices a row each: the data has {len(df)} training rows")


def iid_split(df: pd.DataFrame, n: int, seed: int) -> list[pd.DataFrame]:
    """Rows shuffled with ``seed`` and dealt into ``n`` parts whose sizes differ by one at most."""
    _enough_rows(df, n)
    order = np.random.default_rng(seed).permutation(len(df))
    return [df.iloc[np.sort(part)] for part in np.array_split(order, n)]


def _shares(sizes: np.ndarray, n: int) -> np.ndarray:
    """``n`` devices over groups of ``sizes`` rows: proportional, largest remainders, each group at
    least one device and at most one per row."""
    k = len(sizes)
    exact = sizes / sizes.sum() * n
    alloc = np.clip(np.floor(exact).astype(np.int64), 1, sizes)
    # Hand out (or take back) devices one at a time where the proportional share is furthest off.
    while alloc.sum() < n:
        room = alloc < sizes
        gap = np.where(room, exact - alloc, -np.inf)
        alloc[int(np.argmax(gap))] += 1
    while alloc.sum() > n:
        spare = alloc > 1
        gap = np.where(spare, alloc - exact, -np.inf)
        alloc[int(np.argmax(gap))] -= 1
    assert alloc.sum() == n and len(alloc) == k
    return alloc


def group_split(df: pd.DataFrame, column: str, n: int, seed: int) -> list[pd.DataFrame]:
    """Each device holds rows of one group of ``column``; see the module's docstring."""
    if column not in df.columns:
        raise ValueError(f"--split group:{column}: the data has no column {column!r}")
    _enough_rows(df, n)
    codes, uniques = pd.factorize(df[column], use_na_sentinel=False)
    if n <= len(uniques):
        return natural_split(df, column, n, seed)
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes, minlength=len(uniques))
    alloc = _shares(sizes, n)
    parts: list[pd.DataFrame] = []
    for g in range(len(uniques)):
        rows = rng.permutation(np.flatnonzero(codes == g))
        parts.extend(df.iloc[np.sort(p)] for p in np.array_split(rows, int(alloc[g])))
    return [parts[i] for i in rng.permutation(n)]


def dirichlet_split(
    df: pd.DataFrame, target: str, n: int, alpha: float, seed: int, min_rows: int = 1
) -> list[pd.DataFrame]:
    """Label skew over ``target``: the Dirichlet partition of the module's docstring.

    Drawn again (up to :data:`DIRICHLET_TRIES` times) while a device has fewer than ``min_rows``
    rows; after that, such devices take rows at random from the largest devices, so that every
    device can train.
    """
    if target not in df.columns:
        raise ValueError(f"--split dirichlet: the data has no target column {target!r}")
    _enough_rows(df, n * min_rows)
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(df[target], use_na_sentinel=False)
    total = len(df)
    best: list[list[int]] | None = None
    for _ in range(DIRICHLET_TRIES):
        held: list[list[int]] = [[] for _ in range(n)]
        for c in range(len(uniques)):
            rows = rng.permutation(np.flatnonzero(codes == c))
            p = rng.dirichlet(np.full(n, alpha))
            # A device already holding its share of the rows takes no more (NIID-Bench's balancing).
            p = p * np.array([len(h) < total / n for h in held])
            p = p / p.sum() if p.sum() > 0 else np.full(n, 1.0 / n)
            cuts = (np.cumsum(p) * len(rows)).astype(np.int64)[:-1]
            for h, part in zip(held, np.split(rows, cuts), strict=True):
                h.extend(part.tolist())
        if best is None or min(map(len, held)) > min(map(len, best)):
            best = held
        if min(map(len, held)) >= min_rows:
            break
    assert best is not None
    held = best
    for i in range(n):
        while len(held[i]) < min_rows:
            donor = max(range(n), key=lambda j: len(held[j]))
            held[i].append(held[donor].pop(int(rng.integers(len(held[donor])))))
    return [df.iloc[np.sort(np.asarray(h, dtype=np.int64))] for h in held]


def split_frame(df: pd.DataFrame, split: Split, n: int, seed: int, *, target: str) -> list[pd.DataFrame]:
    """Deal ``df`` to ``n`` devices by ``split`` (a group split needs its column set)."""
    if split.kind == "rows":
        return iid_split(df, n, seed)
    if split.kind == "dirichlet":
        assert split.alpha is not None
        return dirichlet_split(df, target, n, split.alpha, seed)
    if split.column is None:
        raise ValueError("--split group needs a column (group:COLUMN) for this data")
    return group_split(df, split.column, n, seed)
