"""The job spec's sections: one strict model per TOML table ([data], [model], [cohort], [training],
[strategy], [evaluation], [secagg], [robustness], [audit], [gbdt]), each checking its own fields.
The whole spec and the checks across sections are :mod:`shared.jobspec.spec`."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["binary", "multiclass", "regression"]
StrategyName = Literal[
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "bulyan"
]
# Byzantine-robust rules: each needs the single updates, so plaintext rounds only (docs/robustness.md).
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "bulyan")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"5m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, '30s', '5m' or '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30, '30s', '5m' or '1h', got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError("must be a finite number")
    if seconds <= 0:
        raise ValueError("must be a positive duration")
    return seconds


Duration = Annotated[float, Field(gt=0)]


class StrictModel(BaseModel):
    # allow_inf_nan=False: NaN or infinity in any float field is refused as "must be a finite number",
    # before a range check could call it out of range (NaN compares false with every bound).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Feature(StrictModel):
    """One input column of the tabular schema."""

    name: str = Field(min_length=1, description="the column name in every device's data file")
    type: Literal["numeric", "categorical"] = Field(description="numeric: standardised; categorical: one-hot")


class DataSchema(StrictModel):
    """The tabular schema every device's local data must follow."""

    features: list[Feature] = Field(
        min_length=1, description="the input columns, as [[data.features]] tables"
    )
    target: str = Field(min_length=1, description="the column to predict")
    task: Task = Field(description="binary, multiclass or regression")
    positive: str | None = Field(
        default=None, description="binary tasks: the label counted as the positive class"
    )
    max_categories: int = Field(
        default=64, ge=2, le=4096, description="the largest vocabulary kept per categorical column"
    )

    @model_validator(mode="after")
    def _columns_distinct(self) -> DataSchema:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be distinct; repeated: {', '.join(dupes)}")
        if self.target in names:
            raise ValueError(f"the target {self.target!r} is also listed as a feature")
        if self.positive is not None and self.task != "binary":
            raise ValueError("'positive' applies to binary tasks only")
        return self


class ModelSpec(StrictModel):
    """The model: an app's (``app``), or one of the built-in tabular app's zoo models and its sizes."""

    app: str | None = Field(
        default=None,
        max_length=300,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description=(
            "an installed app, 'package.module:attribute' (docs/apps.md); default: the built-in"
            " tabular app with the zoo model below"
        ),
    )
    app_version: str | None = Field(
        default=None, max_length=64, description="the app version every device must hold (with app)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="the app's own settings, as [model.options] (with app)"
    )
    zoo: Literal["mlp", "logreg", "gbdt"] = Field(
        default="mlp",
        description="the model family: mlp or logreg from shared/zoo.py, or gbdt, trees grown as [gbdt] says",
    )
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [64, 32], description="hidden layer widths (mlp)"
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    initial: Literal["random", "pretrained"] = Field(
        default="random",
        description=(
            "where version 0 comes from: random (seeded) weights, or `aicfl cluster pretrain`"
            " (the first training round waits for it)"
        ),
    )


class CohortSpec(StrictModel):
    """How many devices a round takes and how long each stage may last."""

    target: int = Field(default=10, ge=1, le=100_000, description="devices selected per round")
    minimum: int = Field(
        default=2, ge=1, description="fewest devices that must finish every stage, or the round is abandoned"
    )
    stage_timeout: Duration = Field(
        default=120.0, description="deadline of each stage; later devices count as dropped"
    )
    selection_timeout: Duration = Field(
        default=10.0,
        description="how long to wait for the target once the minimum is checked in",
    )

    @field_validator("stage_timeout", "selection_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _minimum_le_target(self) -> CohortSpec:
        if self.minimum > self.target:
            raise ValueError(f"minimum ({self.minimum}) must not exceed target ({self.target})")
        return self


class TrainingSpec(StrictModel):
    """Local training on each device."""

    epochs: int = Field(default=1, ge=1, le=1000, description="local epochs per round")
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    learning_rate: float = Field(default=0.01, gt=0, le=10, description="local learning rate")
    optimizer: Literal["sgd", "adam"] = Field(default="sgd", description="local optimiser")
    holdout: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="share of local rows kept for federated evaluation"
    )
    threads: int = Field(default=1, ge=1, le=256, description="CPU threads a device may use")


class StrategySpec(StrictModel):
    """The server-side aggregation strategy (Flower's implementation)."""

    name: StrategyName = Field(
        default="fedavg",
        description=(
            "fedavg, fedavgm, fedprox, fedadam or fedyogi; plaintext jobs only (secure = false): the"
            " Byzantine-robust fedmedian, fedtrimmedavg, krum or bulyan (docs/robustness.md)"
        ),
    )
    server_learning_rate: float = Field(default=1.0, gt=0, description="fedavgm")
    server_momentum: float = Field(default=0.9, ge=0, lt=1, description="fedavgm")
    proximal_mu: float = Field(
        default=0.01, ge=0, description="fedprox: weight of the proximal term on devices"
    )
    eta: float = Field(default=0.01, gt=0, description="fedadam/fedyogi server learning rate")
    eta_l: float = Field(default=0.0316, gt=0, description="fedadam/fedyogi: client learning rate (recorded)")
    beta_1: float = Field(default=0.9, ge=0, lt=1, description="fedadam/fedyogi: first-moment decay")
    beta_2: float = Field(default=0.99, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay")
    tau: float = Field(default=1e-3, gt=0, description="fedadam/fedyogi: adaptivity")
    trim_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=0.5,
        description="fedtrimmedavg: share of updates cut at each end per coordinate",
    )
    byzantine: int = Field(
        default=1, ge=0, description="krum/bulyan: malicious devices per round the rule must withstand (f)"
    )
    krum_keep: int = Field(
        default=0, ge=0, description="krum: average the best this many updates (multi-Krum); 0 keeps one"
    )


class SecAggSpec(StrictModel):
    """Secure aggregation (SecAgg+): how many neighbours, what threshold, how updates are quantised.

    Without ``k`` and ``t``, both are derived from the cohort size and the
    tolerated dropout and corruption fractions (``shared/secagg/params.py``).
    """

    dropout: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="chance that a device drops out of a round after sharing its keys; k is chosen so that "
        "a round at that rate fails to unmask with probability at most 1e-4",
    )
    corruption: float = Field(
        default=0.1, ge=0, lt=0.5, description="share of devices that may collude with the coordinator"
    )
    k: int | None = Field(
        default=None, ge=1, description="neighbours per device; default: derived from the cohort size"
    )
    t: int | None = Field(
        default=None, ge=1, description="shares needed to reconstruct a secret; default: derived"
    )
    clip: float = Field(
        default=0.5, gt=0, description="update values are clipped to [-clip, clip] before quantising"
    )
    bits: int = Field(default=16, ge=2, le=24, description="quantisation bits per value")
    weight_cap: int = Field(
        default=2**20, ge=1, description="the largest example count one device may weigh in with"
    )


class RobustnessSpec(StrictModel):
    """Bounds on how far one device can move the aggregate (docs/robustness.md)."""

    max_update_norm: float = Field(
        default=1e3,
        gt=0,
        description="plaintext rounds: the largest L2 norm of one device's update per example; larger is refused",
    )
    max_weight: int = Field(
        default=100_000,
        ge=1,
        description=(
            "the largest weight (example count) one device counts with; devices with more data count"
            " this many (under SecAgg+ it caps secagg.weight_cap)"
        ),
    )
    max_parameter: float = Field(
        default=1e4,
        gt=0,
        description="a round whose new model has a parameter larger than this in magnitude is rejected",
    )


class GbdtSpec(StrictModel):
    """Gradient-boosted trees (``[model] zoo = "gbdt"``): XGBoost's ``hist`` settings (docs/gbdt.md).

    The objective follows ``[data] task``: binary:logistic, multi:softprob or reg:squarederror;
    ``rounds`` counts boosting rounds (one tree each, or one per class).
    """

    max_depth: int = Field(default=6, ge=1, le=12, description="depth of each tree (XGBoost's max_depth)")
    eta: float = Field(
        default=0.3, gt=0, le=1, description="learning rate: each leaf's weight is scaled by it"
    )
    bins: int = Field(
        default=256, ge=2, le=1024, description="at most this many bins per feature (XGBoost's max_bin)"
    )
    min_child_weight: float = Field(
        default=1.0, ge=0, description="the least hessian a child may hold (XGBoost's min_child_weight)"
    )
    reg_lambda: float = Field(default=1.0, ge=0, description="L2 penalty on leaf weights (XGBoost's lambda)")
    gamma: float = Field(
        default=0.0, ge=0, description="the least loss reduction a split must bring (XGBoost's gamma)"
    )


class EvaluationSpec(StrictModel):
    """Evaluation each round: central on reference data, federated on holdouts."""

    reference: str | None = Field(default=None, description="CSV or Parquet path read by `aicfl jobs submit`")
    federated: bool = Field(default=True, description="devices evaluate each model on their holdout rows")


class AuditSpec(StrictModel):
    """The SHAP audit of every model version (``aicfl audit worker``)."""

    enabled: bool = Field(default=True, description="audit every new model version")
    rows: int = Field(default=1000, ge=10, le=100_000, description="reference rows explained per version")
    background: int = Field(
        default=100,
        ge=10,
        le=10_000,
        description="background rows drawn reproducibly from the reference data",
    )
    validate_rows: int = Field(
        default=20, ge=0, le=1000, description="rows checked against an exact explainer (0: skip the check)"
    )
    top: int = Field(default=5, ge=1, le=100, description="features listed as the top ones")
    min_rank_correlation: float = Field(
        default=0.7,
        ge=-1,
        le=1,
        description="drift when the Spearman correlation of importances with the previous version is lower",
    )
    max_share_shift: float = Field(
        default=0.15,
        gt=0,
        le=1,
        description="drift when a feature's share of total importance moves more than this",
    )
    gate: bool = Field(
        default=False,
        description="a version whose verdict is drift is not released; devices keep the last released one",
    )
    gate_timeout: Duration = Field(
        default=600.0, description="with the gate: how long the next round waits for a version's audit"
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="tries before an audit is recorded as failed"
    )

    @field_validator("gate_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)
