"""Local tabular data, checked against the job's :class:`~shared.jobspec.DataSchema`.

A device reads its own CSV or Parquet file (:func:`load_table`), checks it
against the schema (:func:`validate_table`) and reports only aggregates of it
(:func:`local_statistics`). The coordinator sums those aggregates
(:func:`merge_statistics`) and builds one :class:`Preprocessor` that every
device then applies, so that all devices standardise and one-hot encode with
the same global means, deviations and vocabularies.

Missing values: a missing numeric value is allowed; it is left out of the
statistics and becomes the global mean (0 after standardising). A missing
categorical value encodes as all zeros, like an unknown category. The target
must never be missing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.jobspec import DataSchema

STD_FLOOR = 1e-6
_PREPROCESSOR_FORMAT = "aicfl.preprocessor/1"
_CSV_SUFFIXES = (".csv",)
_PARQUET_SUFFIXES = (".parquet", ".pq")


class DataSchemaError(ValueError):
    """Local data that does not follow the schema; ``str()`` says which column and what is wrong.

    ``column`` is ``None`` for problems with the file as a whole (missing,
    unreadable, empty).
    """

    def __init__(self, column: str | None, problem: str, is_target: bool = False):
        self.column = column
        self.problem = problem
        self.is_target = is_target
        if column is None:
            message = problem
        else:
            role = " (target)" if is_target else ""
            message = f"column {column!r}{role}: {problem}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call __init__ with the formatted message only.
        return (type(self), (self.column, self.problem, self.is_target))


# --------------------------------------------------------------------------- loading


def load_table(path: str | Path, schema: DataSchema | None = None) -> pd.DataFrame:
    """Read a CSV (``.csv``) or Parquet (``.parquet``, ``.pq``) file into a DataFrame.

    With ``schema``, a CSV's categorical columns (and a classification target)
    are read as text, so that codes such as ``"007"`` keep their leading zeros.
    Raises :class:`DataSchemaError` (``column=None``) when the file is missing,
    unreadable, empty or of an unknown kind.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _CSV_SUFFIXES + _PARQUET_SUFFIXES:
        raise DataSchemaError(
            None, f"data file '{p}': unknown file type {suffix or '(none)'!r}; expected .csv, .parquet or .pq"
        )
    if not p.exists():
        raise DataSchemaError(None, f"data file '{p}' does not exist")
    if not p.is_file():
        raise DataSchemaError(None, f"data file '{p}' is not a regular file")
    try:
        if p.stat().st_size == 0:
            raise DataSchemaError(None, f"data file '{p}' is empty")
        df = pd.read_csv(p, dtype=_text_dtypes(schema)) if suffix in _CSV_SUFFIXES else pd.read_parquet(p)
    except DataSchemaError:
        raise
    except pd.errors.EmptyDataError:
        raise DataSchemaError(None, f"data file '{p}' is empty") from None
    except OSError as err:
        raise DataSchemaError(None, f"data file '{p}' cannot be read: {err.strerror or err}") from None
    except Exception as err:  # pandas/pyarrow raise many parser error types
        kind = "CSV" if suffix in _CSV_SUFFIXES else "Parquet"
        raise DataSchemaError(None, f"data file '{p}' is not a readable {kind} file: {err}") from None
    if len(df.columns) == 0:
        raise DataSchemaError(None, f"data file '{p}' has no columns")
    return df


def _text_dtypes(schema: DataSchema | None) -> dict[str, Any] | None:
    # Categorical columns (and a classification target) read as text keep codes such as "007".
    if schema is None:
        return None
    text_columns = [f.name for f in schema.features if f.type == "categorical"]
    if schema.task != "regression":
        text_columns.append(schema.target)
    return dict.fromkeys(text_columns, str)


def read_table_bytes(data: bytes, schema: DataSchema | None = None) -> pd.DataFrame:
    """A CSV or Parquet table from bytes (Parquet recognised by its ``PAR1`` magic).

    The in-memory counterpart of :func:`load_table`, for tables that arrive
    over the API (a job's reference data). With ``schema``, a CSV's categorical
    columns and a classification target are read as text. Raises
    :class:`DataSchemaError` (``column=None``) when the bytes are empty or
    neither format.
    """
    if not data:
        raise DataSchemaError(None, "the table is empty")
    kind = "Parquet" if data[:4] == b"PAR1" else "CSV"
    try:
        if kind == "Parquet":
            df = pd.read_parquet(io.BytesIO(data))
        else:
            df = pd.read_csv(io.BytesIO(data), dtype=_text_dtypes(schema))
    except pd.errors.EmptyDataError:
        raise DataSchemaError(None, "the table is empty") from None
    except Exception as err:  # pandas/pyarrow raise many parser error types
        raise DataSchemaError(None, f"not a readable {kind} table: {err}") from None
    if len(df.columns) == 0:
        raise DataSchemaError(None, "the table has no columns")
    return df


# --------------------------------------------------------------------------- checking


def _category_string(value: Any) -> str:
    # One spelling per value whatever dtype a device's reader picked: a column
    # with a missing value becomes float, and 415.0 must still count as "415".
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def category_strings(series: pd.Series) -> pd.Series:
    """The canonical text of each value of a categorical column; missing values stay missing."""
    # In numpy, not through Series.__setitem__ (a pandas slow path: a third of a simulated device's
    # statistics and data checks).
    present = series.notna().to_numpy()
    out = np.full(len(series), pd.NA, dtype=object)
    if present.any():
        values = series.to_numpy(dtype=object)[present]
        out[present] = np.array([_category_string(v) for v in values], dtype=object)
    return pd.Series(out, index=series.index, dtype=object)


def _first_position(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _numeric_values(df: pd.DataFrame, column: str, is_target: bool = False) -> np.ndarray:
    """The column as float64 (NaN where missing); raise on text that is not a number or on infinities."""
    series = df[column]
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_complex_dtype(series.dtype):
        values = series.to_numpy(dtype="float64", na_value=np.nan)
    else:
        coerced = pd.to_numeric(series, errors="coerce")
        bad = (coerced.isna() & series.notna()).to_numpy()
        if bad.any():
            i = _first_position(bad)
            raise DataSchemaError(
                column, f"expected numbers, found {series.iloc[i]!r} (row {i + 1})", is_target
            )
        values = coerced.to_numpy(dtype="float64", na_value=np.nan)
    infinite = np.isinf(values)
    if infinite.any():
        i = _first_position(infinite)
        raise DataSchemaError(column, f"expected finite numbers, found {values[i]} (row {i + 1})", is_target)
    return values


def _check_columns(df: pd.DataFrame, names: Sequence[str], schema: DataSchema) -> None:
    missing = [n for n in names if n not in df.columns]
    if not missing:
        return
    first = missing[0]
    found = [str(c) for c in df.columns]
    shown = ", ".join(repr(c) for c in found[:12]) + (", …" if len(found) > 12 else "")
    also = f"; also missing: {', '.join(repr(m) for m in missing[1:])}" if len(missing) > 1 else ""
    raise DataSchemaError(
        first, f"missing from the data (columns found: {shown}){also}", first == schema.target
    )


def _check_rows(df: pd.DataFrame) -> None:
    if len(df) == 0:
        raise DataSchemaError(None, "the data has no rows")


def _check_features(df: pd.DataFrame, schema: DataSchema) -> None:
    _check_columns(df, [f.name for f in schema.features], schema)
    for feature in schema.features:
        if feature.type == "numeric":
            _numeric_values(df, feature.name)


def _target_values(df: pd.DataFrame, schema: DataSchema) -> np.ndarray | pd.Series:
    """The target as float64 (regression) or canonical label strings (classification)."""
    series = df[schema.target]
    missing = series.isna().to_numpy()
    if missing.any():
        i = _first_position(missing)
        raise DataSchemaError(
            schema.target, f"missing value (row {i + 1}); every row needs a target", is_target=True
        )
    if schema.task == "regression":
        return _numeric_values(df, schema.target, is_target=True)
    return category_strings(series)


def _check_labels(labels: pd.Series, allowed: Iterable[str], column: str) -> None:
    allowed_list = list(allowed)
    unknown = ~labels.isin(allowed_list).to_numpy()
    if unknown.any():
        i = _first_position(unknown)
        listed = ", ".join(repr(a) for a in allowed_list)
        raise DataSchemaError(
            column, f"label {labels.iloc[i]!r} is not one of {listed} (row {i + 1})", is_target=True
        )


def validate_table(df: pd.DataFrame, schema: DataSchema, classes: Sequence[str] | None = None) -> None:
    """Check that ``df`` follows ``schema``; raise :class:`DataSchemaError` naming the first problem.

    Checks: at least one row; every feature and the target present; numeric
    columns hold numbers (text that parses as a number is fine) and no
    infinities; the target has no missing value; a binary target has at most
    two labels (and includes no label other than ``schema.positive`` and one
    other). Missing numeric or categorical feature values are allowed: they
    are imputed later. With ``classes`` (the federation's labels), every
    target label must be one of them. Row numbers in messages count data rows
    from 1.
    """
    _check_rows(df)
    _check_columns(df, [f.name for f in schema.features] + [schema.target], schema)
    _check_features(df, schema)
    target = _target_values(df, schema)
    if schema.task == "regression":
        return
    assert isinstance(target, pd.Series)
    if classes is not None:
        _check_labels(target, classes, schema.target)
    if schema.task == "binary":
        labels = sorted(set(target.tolist()) | ({schema.positive} if schema.positive else set()))
        if len(labels) > 2:
            shown = ", ".join(repr(label) for label in labels[:10])
            raise DataSchemaError(
                schema.target,
                f"a binary target has at most 2 labels, found {len(labels)} ({shown})"
                + (f" with positive label {schema.positive!r}" if schema.positive else ""),
                is_target=True,
            )


# --------------------------------------------------------------------------- statistics


def _moments(values: np.ndarray) -> dict[str, Any]:
    present = values[~np.isnan(values)]
    return {
        "count": int(present.size),
        "sum": float(present.sum()),
        "sum_sq": float(np.square(present).sum()),
    }


def _counts(labels: pd.Series) -> dict[str, int]:
    counts = labels.dropna().value_counts(sort=False)
    return {str(k): int(v) for k, v in counts.items()}


def local_statistics(df: pd.DataFrame, schema: DataSchema) -> dict[str, Any]:
    """Aggregates of the local data that the federation needs to build the :class:`Preprocessor`.

    Validates ``df`` first. Holds counts, sums and sums of squares only, never
    a row: ``{"rows": n, "numeric": {col: {"count", "sum", "sum_sq"}},
    "categorical": {col: {value: count}}, "target": ...}`` where the target
    part is ``{"count", "sum", "sum_sq"}`` for regression and
    ``{label: count}`` for classification. JSON-serialisable.
    """
    validate_table(df, schema)
    numeric: dict[str, dict[str, Any]] = {}
    categorical: dict[str, dict[str, int]] = {}
    for feature in schema.features:
        if feature.type == "numeric":
            numeric[feature.name] = _moments(_numeric_values(df, feature.name))
        else:
            categorical[feature.name] = _counts(category_strings(df[feature.name]))
    target = _target_values(df, schema)
    target_stats: dict[str, Any]
    if schema.task == "regression":
        assert isinstance(target, np.ndarray)
        target_stats = _moments(target)
    else:
        assert isinstance(target, pd.Series)
        target_stats = _counts(target)
    return {"rows": len(df), "numeric": numeric, "categorical": categorical, "target": target_stats}


def _add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def merge_statistics(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum several :func:`local_statistics` results into the statistics of the pooled data.

    Every leaf is a count or a sum, so a key-wise sum is exact (up to floating
    point) whatever the split.
    """
    if not stats:
        raise ValueError("merge_statistics needs at least one set of statistics")
    merged: dict[str, Any] = {"rows": 0, "numeric": {}, "categorical": {}, "target": {}}
    for part in stats:
        try:
            merged["rows"] += part["rows"]
            for section in ("numeric", "categorical"):
                for column, values in part[section].items():
                    _add_counts(merged[section].setdefault(column, {}), values)
            _add_counts(merged["target"], part["target"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a set of local statistics: {err!r}") from None
    return merged


# --------------------------------------------------------------------------- preprocessing


class Preprocessor:
    """The global transformation from a table to model inputs and targets.

    Numeric features become ``(x - mean) / std`` (std floored at 1e-6; a
    missing value becomes 0, the mean). Categorical features become one-hot
    columns over the federation's vocabulary (most frequent first, ties by
    value, at most ``schema.max_categories``); unknown and missing values
    become all zeros. Targets: binary -> float 0/1 with 1 for the positive
    label (``schema.positive``, else the lexicographically larger label);
    multiclass -> int64 index into the sorted labels; regression -> float
    standardised with the global mean and deviation.
    """

    def __init__(
        self,
        schema: DataSchema,
        means: dict[str, float],
        stds: dict[str, float],
        vocabularies: dict[str, list[str]],
        classes: list[str],
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ):
        self.schema = schema
        self.means = dict(means)
        self.stds = dict(stds)
        self.vocabularies = {k: list(v) for k, v in vocabularies.items()}
        self.classes = list(classes)
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        self._class_index = {label: i for i, label in enumerate(self.classes)}
        self._category_index = {
            col: {value: i for i, value in enumerate(vocab)} for col, vocab in self.vocabularies.items()
        }
        names: list[str] = []
        for feature in schema.features:
            if feature.type == "numeric":
                names.append(feature.name)
            else:
                names.extend(f"{feature.name}={value}" for value in self.vocabularies[feature.name])
        self.feature_names = names

    # ---- construction

    @classmethod
    def from_statistics(cls, merged: dict[str, Any], schema: DataSchema) -> Preprocessor:
        """Build the preprocessor from :func:`merge_statistics` output."""
        means: dict[str, float] = {}
        stds: dict[str, float] = {}
        vocabularies: dict[str, list[str]] = {}
        for feature in schema.features:
            if feature.type == "numeric":
                moments = merged.get("numeric", {}).get(feature.name)
                if moments is None:
                    raise DataSchemaError(feature.name, "no statistics were collected for this column")
                means[feature.name], stds[feature.name] = _mean_std(moments)
            else:
                counts = merged.get("categorical", {}).get(feature.name)
                if counts is None:
                    raise DataSchemaError(feature.name, "no statistics were collected for this column")
                ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                vocabularies[feature.name] = [value for value, count in ranked if count > 0][
                    : schema.max_categories
                ]
        target = merged.get("target") or {}
        classes: list[str] = []
        target_mean, target_std = 0.0, 1.0
        if schema.task == "regression":
            if not target.get("count"):
                raise DataSchemaError(schema.target, "no target values were collected", is_target=True)
            target_mean, target_std = _mean_std(target)
        else:
            labels = {label for label, count in target.items() if count > 0}
            if not labels:
                raise DataSchemaError(schema.target, "no target labels were collected", is_target=True)
            if schema.task == "binary":
                if schema.positive is not None:
                    labels.add(schema.positive)
                if len(labels) > 2:
                    shown = ", ".join(repr(label) for label in sorted(labels)[:10])
                    raise DataSchemaError(
                        schema.target,
                        f"a binary target has at most 2 labels, the federation has {len(labels)} ({shown})",
                        is_target=True,
                    )
                positive = schema.positive if schema.positive is not None else max(labels)
                # The positive label goes last so that classes[1] (or classes[-1]) is what 1.0 means.
                classes = sorted(labels - {positive}) + [positive]
            else:
                classes = sorted(labels)
        return cls(schema, means, stds, vocabularies, classes, target_mean, target_std)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form; :meth:`from_dict` rebuilds an identical preprocessor."""
        return {
            "format": _PREPROCESSOR_FORMAT,
            "schema": self.schema.model_dump(mode="json"),
            "numeric": {col: {"mean": self.means[col], "std": self.stds[col]} for col in self.means},
            "categorical": {col: list(vocab) for col, vocab in self.vocabularies.items()},
            "classes": list(self.classes),
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Rebuild a preprocessor from :meth:`to_dict` output."""
        if not isinstance(d, dict) or d.get("format") != _PREPROCESSOR_FORMAT:
            raise ValueError(f"not a preprocessor description (expected format {_PREPROCESSOR_FORMAT!r})")
        try:
            schema = DataSchema.model_validate(d["schema"])
            numeric = d["numeric"]
            return cls(
                schema,
                means={col: float(v["mean"]) for col, v in numeric.items()},
                stds={col: float(v["std"]) for col, v in numeric.items()},
                vocabularies={col: [str(x) for x in vocab] for col, vocab in d["categorical"].items()},
                classes=[str(c) for c in d["classes"]],
                target_mean=float(d["target_mean"]),
                target_std=float(d["target_std"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a valid preprocessor description: {err}") from None

    # ---- shape

    @property
    def input_dim(self) -> int:
        """Width of the feature matrix (numeric columns plus one-hot columns)."""
        return len(self.feature_names)

    @property
    def column_features(self) -> list[str]:
        """For each input column (as in :attr:`feature_names`), the schema feature it encodes.

        A numeric feature owns one column; a categorical one owns its one-hot
        columns (none when its vocabulary is empty). Attributions on the
        columns add up to attributions on the original features through it.
        """
        owners: list[str] = []
        for feature in self.schema.features:
            if feature.type == "numeric":
                owners.append(feature.name)
            else:
                owners.extend([feature.name] * len(self.vocabularies[feature.name]))
        return owners

    @property
    def output_dim(self) -> int:
        """Model outputs: 1 for binary and regression, the number of classes for multiclass."""
        return len(self.classes) if self.schema.task == "multiclass" else 1

    @property
    def positive(self) -> str | None:
        """The label encoded as 1.0 for a binary task, else ``None``."""
        return self.classes[-1] if self.schema.task == "binary" else None

    # ---- transformation

    def transform_features(self, df: pd.DataFrame) -> np.ndarray:
        """The float32 feature matrix ``(n, input_dim)``; the target column need not be present."""
        _check_features(df, self.schema)
        n = len(df)
        out = np.zeros((n, self.input_dim), dtype=np.float32)
        offset = 0
        rows = np.arange(n)
        for feature in self.schema.features:
            if feature.type == "numeric":
                mean, std = self.means[feature.name], self.stds[feature.name]
                values = (_numeric_values(df, feature.name) - mean) / std
                out[:, offset] = np.nan_to_num(values, nan=0.0)
                offset += 1
            else:
                index = self._category_index[feature.name]
                codes = category_strings(df[feature.name]).map(index).to_numpy(dtype="float64", na_value=-1)
                hit = codes >= 0
                out[rows[hit], offset + codes[hit].astype(np.int64)] = 1.0
                offset += len(index)
        return out

    def transform_target(self, df: pd.DataFrame) -> np.ndarray:
        """The encoded target: float32 0/1 (binary), int64 index (multiclass), float32 standardised."""
        _check_rows(df)
        _check_columns(df, [self.schema.target], self.schema)
        target = _target_values(df, self.schema)
        if self.schema.task == "regression":
            assert isinstance(target, np.ndarray)
            return ((target - self.target_mean) / self.target_std).astype(np.float32)
        assert isinstance(target, pd.Series)
        _check_labels(target, self.classes, self.schema.target)
        if self.schema.task == "binary":
            return (target == self.classes[-1]).to_numpy(dtype=np.float32)
        return target.map(self._class_index).to_numpy(dtype=np.int64)

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)``: :meth:`transform_features` and :meth:`transform_target` of ``df``."""
        _check_rows(df)
        return self.transform_features(df), self.transform_target(df)

    def inverse_target(self, values: np.ndarray) -> np.ndarray:
        """Regression outputs back in the target's original units."""
        return np.asarray(values, dtype=np.float64) * self.target_std + self.target_mean


def _mean_std(moments: dict[str, Any]) -> tuple[float, float]:
    count = moments.get("count", 0)
    if count <= 0:
        # A column missing on every device: impute 0 and leave the scale alone.
        return 0.0, 1.0
    mean = moments["sum"] / count
    variance = max(moments["sum_sq"] / count - mean * mean, 0.0)
    return float(mean), float(max(math.sqrt(variance), STD_FLOOR))
