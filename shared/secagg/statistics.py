"""The statistics round under secure aggregation: feature statistics as one integer vector.

Before round 1 the coordinator needs global counts, sums and sums of squares
of the numeric columns, the counts of each category and of each label
(``shared.tabular.local_statistics``). Under SecAgg+ those travel as one
vector summed modulo 2**64, so the coordinator learns only the cohort's
totals. The vector's layout needs the category values in advance: devices
name the values they hold (the sets, not their counts) when they accept the
round, the coordinator merges them, and the layout follows from the merged
vocabulary.

Sums are fixed-point with :data:`SCALE` fractional steps, in two's complement:
the modular sum of the encodings is the encoding of the sum as long as each
total stays within ±2**62 / SCALE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.jobspec import DataSchema

SCALE = 2**12
LIMIT = 2**62
MAX_VALUES = 10_000


class StatisticsEncodingError(ValueError):
    """Statistics that cannot be encoded (a value too large, a category outside the vocabulary)."""


def vocabulary(stats: Mapping[str, Any], schema: DataSchema) -> dict[str, list[str]]:
    """The category values and labels a device holds (no counts), from its local statistics."""
    out = {col: sorted(counts) for col, counts in stats.get("categorical", {}).items()}
    if schema.task != "regression":
        out[schema.target] = sorted(stats.get("target", {}))
    return out


def merge_vocabularies(vocabs: Sequence[Mapping[str, Sequence[str]]]) -> dict[str, list[str]]:
    """The union of the devices' vocabularies, sorted; refuses one over :data:`MAX_VALUES` values."""
    merged: dict[str, set[str]] = {}
    for v in vocabs:
        for col, values in v.items():
            merged.setdefault(col, set()).update(str(x) for x in values)
    for col, found in merged.items():
        if len(found) > MAX_VALUES:
            raise StatisticsEncodingError(
                f"column {col!r} has {len(found)} distinct values; at most {MAX_VALUES}"
            )
    return {col: sorted(found) for col, found in sorted(merged.items())}


def layout(schema: DataSchema, vocab: Mapping[str, Sequence[str]]) -> list[tuple[str, str, str]]:
    """The slots of the vector: (section, column, field or value)."""
    slots: list[tuple[str, str, str]] = [("rows", "", "")]
    for f in schema.features:
        if f.type == "numeric":
            slots += [("numeric", f.name, k) for k in ("count", "sum", "sum_sq")]
        else:
            slots += [("categorical", f.name, v) for v in vocab.get(f.name, [])]
    if schema.task == "regression":
        slots += [("target", "", k) for k in ("count", "sum", "sum_sq")]
    else:
        slots += [("target", "", v) for v in vocab.get(schema.target, [])]
    return slots


def _fixed(value: float, what: str) -> int:
    scaled = int(round(float(value) * SCALE))
    if not -LIMIT < scaled < LIMIT:
        raise StatisticsEncodingError(f"{what} = {value:g} is too large to aggregate securely")
    return scaled


def encode(stats: Mapping[str, Any], schema: DataSchema, vocab: Mapping[str, Sequence[str]]) -> np.ndarray:
    """A device's local statistics as a uint64 vector in the round's layout."""
    values: list[int] = []
    for section, col, key in layout(schema, vocab):
        if section == "rows":
            values.append(int(stats["rows"]))
        elif section == "numeric":
            v = stats["numeric"][col][key]
            values.append(int(v) if key == "count" else _fixed(v, f"{col}.{key}"))
        elif section == "categorical":
            values.append(int(stats["categorical"].get(col, {}).get(key, 0)))
        elif schema.task == "regression":
            v = stats["target"][key]
            values.append(int(v) if key == "count" else _fixed(v, f"target.{key}"))
        else:
            values.append(int(stats["target"].get(key, 0)))
    held = vocabulary(stats, schema)
    for col, vals in held.items():
        missing = set(vals) - set(vocab.get(col, []))
        if missing:
            raise StatisticsEncodingError(
                f"column {col!r}: value {sorted(missing)[0]!r} is not in the round's vocabulary"
            )
    return np.array(values, dtype=np.int64).view(np.uint64)


def decode(total: np.ndarray, schema: DataSchema, vocab: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The cohort's merged statistics (the format of ``shared.tabular.merge_statistics``) from the summed vector."""
    slots = layout(schema, vocab)
    if total.size != len(slots):
        raise StatisticsEncodingError(f"expected {len(slots)} values, got {total.size}")
    ints = total.astype(np.uint64).view(np.int64)
    out: dict[str, Any] = {"rows": 0, "numeric": {}, "categorical": {}, "target": {}}
    for (section, col, key), raw in zip(slots, ints.tolist(), strict=True):
        if section == "rows":
            out["rows"] = int(raw)
        elif section == "numeric":
            out["numeric"].setdefault(col, {})[key] = int(raw) if key == "count" else raw / SCALE
        elif section == "categorical":
            if raw:
                out["categorical"].setdefault(col, {})[key] = int(raw)
        elif schema.task == "regression":
            out["target"][key] = int(raw) if key == "count" else raw / SCALE
        elif raw:
            out["target"][key] = int(raw)
    for f in schema.features:
        if f.type == "categorical":
            out["categorical"].setdefault(f.name, {})
    return out
