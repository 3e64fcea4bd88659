"""The built-in app: the zoo models (``mlp``, ``logreg``) on a CSV or Parquet table.

The first app that uses the app interface, and the one a job spec gets when it names none. Its
statistics round fixes the preprocessing (standardisation, one-hot vocabularies, class order) from
every device's rows under SecAgg+; that preprocessing is the job's setup, signed into each version.
pandas and pyarrow are imported here, when a table is read, not by the agent itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from shared.apps.base import (
    App,
    DataError,
    DeviceContext,
    DpSgdConfig,
    JobContext,
    LocalData,
    Metrics,
    Statistics,
    TrainConfig,
)

if TYPE_CHECKING:
    import pandas as pd

    from shared.jobspec import DataSchema
    from shared.tabular import Preprocessor


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _schema(job: JobContext) -> DataSchema:
    return job.spec.tabular


def _preprocessor(job: JobContext) -> Preprocessor:
    from shared.tabular import Preprocessor

    if job.setup is None:
        raise DataError("the job's preprocessing is not fixed yet (its statistics round has not finished)")
    return Preprocessor.from_dict(dict(job.setup))


@dataclass
class Rows:
    """A device's table rows and, once the job's preprocessing is fixed, their model arrays."""

    frame: pd.DataFrame
    schema: DataSchema
    pre: Preprocessor | None
    whole: pd.DataFrame | None = None  # the device's whole table, which the schema check reads

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pre is None:
            raise DataError("the job's preprocessing is not fixed yet")
        return self.pre.transform(self.frame)


class TabularStatistics(Statistics):
    """Sums, counts and value sets of the table's columns (``shared.tabular``), their secure vector
    (``shared.secagg.statistics``) and the preprocessing they fix."""

    def local(self, data: LocalData, job: JobContext) -> dict[str, Any]:
        from shared.tabular import local_statistics

        return local_statistics(data.train.frame, _schema(job))

    def check(self, summary: Mapping[str, Any], job: JobContext) -> None:
        """Row count and finite moments: what ``merge`` divides by and squares."""
        rows = summary.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ValueError("statistics.rows must be a non-negative integer")
        for section in ("numeric", "categorical"):
            if not isinstance(summary.get(section, {}), dict):
                raise ValueError(f"statistics.{section} must be a table")
        for col, v in summary.get("numeric", {}).items():
            if not isinstance(v, dict) or not all(_finite(v.get(k)) for k in ("count", "sum", "sum_sq")):
                raise ValueError(f"statistics.numeric.{col} needs finite count, sum and sum_sq")

    def merge(self, summaries: Sequence[Mapping[str, Any]], job: JobContext) -> dict[str, Any]:
        from shared.tabular import merge_statistics

        return merge_statistics([dict(s) for s in summaries])

    def setup(self, merged: Mapping[str, Any], job: JobContext) -> dict[str, Any]:
        from shared.tabular import Preprocessor

        return Preprocessor.from_statistics(dict(merged), _schema(job)).to_dict()

    def vocabulary(self, local: Mapping[str, Any], job: JobContext) -> dict[str, list[str]]:
        from shared.secagg import statistics

        return statistics.vocabulary(local, _schema(job))

    def layout(self, vocabulary: Mapping[str, Sequence[str]], job: JobContext) -> Sequence[Any]:
        from shared.secagg import statistics

        return statistics.layout(_schema(job), vocabulary)

    def encode(
        self, local: Mapping[str, Any], vocabulary: Mapping[str, Sequence[str]], job: JobContext
    ) -> np.ndarray:
        from shared.secagg import statistics

        return statistics.encode(local, _schema(job), vocabulary)

    def decode(
        self, total: np.ndarray, vocabulary: Mapping[str, Sequence[str]], job: JobContext
    ) -> dict[str, Any]:
        from shared.secagg import statistics

        return statistics.decode(total, _schema(job), vocabulary)


class TreeModel:
    """A ``zoo = "gbdt"`` model: a boosted ensemble and its bin edges (``shared.gbdt.model``), once loaded.

    Its parameters are the bytes of the version (a uint8 vector), not float32 weights: trees are
    grown from summed histograms (docs/gbdt.md), never trained on a device.
    """

    def __init__(self) -> None:
        self.content: Any = None  # a shared.gbdt.model.BoostedModel

    def predict(self, x: np.ndarray) -> np.ndarray:
        from shared.gbdt import predict

        if self.content is None:
            raise ValueError("the boosted model has no trees loaded")
        return predict(self.content.ensemble, x)


def _boosted(job: JobContext) -> bool:
    return job.spec.model.zoo == "gbdt"


class TabularApp(App):
    """``[model] zoo = "mlp" | "logreg"`` over the ``[data]`` schema's columns, or ``"gbdt"``'s trees."""

    name = "aicfl.tabular"
    version = "1"
    statistics = TabularStatistics()

    def describe(self, job: JobContext) -> dict[str, Any]:
        """The zoo architecture (``shared.zoo.architecture``), sized by the preprocessing; for gbdt, the
        objective, the features and the ``[gbdt]`` settings."""
        from shared.zoo import architecture

        pre = _preprocessor(job)
        if _boosted(job):
            from shared.gbdt.model import FORMAT
            from shared.gbdt.rounds import OBJECTIVES

            return {
                "zoo": "gbdt",
                "format": FORMAT,
                "objective": OBJECTIVES[_schema(job).task],
                "input_dim": pre.input_dim,
                "output_dim": pre.output_dim,
                **job.spec.gbdt.model_dump(),
            }
        return architecture(job.spec.model, pre.input_dim, pre.output_dim)

    def build_model(self, job: JobContext) -> Any:
        from shared.zoo import build_model

        if _boosted(job):
            return TreeModel()
        return build_model(self.describe(job))

    def get_parameters(self, model: Any) -> np.ndarray:
        if isinstance(model, TreeModel):
            from shared.gbdt.model import to_vector

            return to_vector(model.content)
        return super().get_parameters(model)

    def set_parameters(self, model: Any, vector: np.ndarray) -> None:
        if isinstance(model, TreeModel):
            from shared.gbdt.model import from_bytes

            model.content = from_bytes(np.asarray(vector, dtype=np.uint8))
            return
        super().set_parameters(model, vector)

    def tree_rows(self, data: LocalData) -> tuple[np.ndarray, np.ndarray]:
        """The device's training rows as trees see them: the preprocessed features and encoded target."""
        rows: Rows = data.train
        return rows.arrays

    def load_frame(self, device: DeviceContext) -> pd.DataFrame:
        """The device's rows, read from its file with the job's column types."""
        from shared.tabular import load_table

        return load_table(device.data_path, _schema(device.job))

    def load_data(self, device: DeviceContext) -> LocalData:
        schema = _schema(device.job)
        frame = self.load_frame(device)
        pre = _preprocessor(device.job) if device.job.setup is not None else None
        train_idx, hold_idx = device.holdout_split(len(frame))
        return LocalData(
            train=Rows(frame.iloc[train_idx], schema, pre, whole=frame),
            holdout=Rows(frame.iloc[hold_idx], schema, pre),
            train_examples=len(train_idx),
            holdout_examples=len(hold_idx),
        )

    def check_data(self, data: LocalData, job: JobContext) -> None:
        from shared.tabular import validate_table

        rows: Rows = data.train
        # The whole table, holdout rows included, follows the schema.
        validate_table(rows.whole if rows.whole is not None else rows.frame, _schema(job))

    def train(self, model: nn.Module, data: LocalData, config: TrainConfig) -> Metrics:
        from shared.training import train_local

        rows: Rows = data.train
        x, y = rows.arrays
        if config.dp is not None:
            return self._train_dp(model, rows, config, config.dp)
        result = train_local(
            model,
            x,
            y,
            task=rows.schema.task,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            optimizer=config.optimizer,  # type: ignore[arg-type]
            seed=config.seed,
            proximal_mu=config.proximal_mu,
            threads=config.threads,
        )
        return {"loss": float(result["loss"])}

    @staticmethod
    def _train_dp(model: nn.Module, rows: Rows, config: TrainConfig, dp: DpSgdConfig) -> Metrics:
        """Example-level differential privacy: the same training with DP-SGD (docs/privacy.md), the
        round's cost in :data:`DP_METRICS`."""
        from shared.privacy.example import train_local_dp

        x, y = rows.arrays
        report = train_local_dp(
            model,
            x,
            y,
            task=rows.schema.task,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            optimizer=config.optimizer,  # type: ignore[arg-type]
            seed=config.seed,
            noise_multiplier=dp.noise_multiplier,
            clip=dp.clip,
            steps_per_epoch=dp.steps_per_epoch,
            proximal_mu=config.proximal_mu,
            threads=config.threads,
        )
        wire = report.wire()
        return {
            "loss": report.loss if math.isfinite(report.loss) else 0.0,
            **{f"dp_{name}": float(value) for name, value in wire.items()},
        }

    def evaluate(self, model: nn.Module, data: LocalData) -> Metrics:
        return self._metrics(model, data.holdout)

    @staticmethod
    def _metrics(model: Any, rows: Rows, examples: bool = False) -> Metrics:
        from shared.training import evaluate, metrics_from_predictions

        assert rows.pre is not None
        x, y = rows.arrays
        if isinstance(model, TreeModel):
            predictions = model.predict(x)
            if rows.schema.task == "regression":
                predictions = rows.pre.inverse_target(predictions)
            found = metrics_from_predictions(
                rows.schema.task,
                y,
                predictions,
                target_mean=rows.pre.target_mean,
                target_std=rows.pre.target_std,
            )
            return {k: float(v) for k, v in found.items() if examples or k != "examples"}
        metrics = evaluate(
            model,
            x,
            y,
            task=rows.schema.task,
            target_mean=rows.pre.target_mean,
            target_std=rows.pre.target_std,
        )
        return {k: float(v) for k, v in metrics.items() if examples or k != "examples"}

    def load_reference(self, data: bytes, job: JobContext) -> pd.DataFrame:
        from shared.tabular import read_table_bytes, validate_table

        df = read_table_bytes(data, _schema(job))
        validate_table(df, _schema(job))
        return df

    def evaluate_central(self, model: nn.Module, reference: pd.DataFrame, job: JobContext) -> Metrics | None:
        if job.setup is None:
            return None
        return self._metrics(model, Rows(reference, _schema(job), _preprocessor(job)), examples=True)


app = TabularApp()
