"""The job specification: the one schema for what an operator submits.

A job spec is a TOML file. ``aicfl jobs submit`` parses and validates it here,
the coordinator validates it again on arrival, and the agent reads the
``data``, ``model`` and ``training`` parts from the task it is given. The
example in ``examples/churn.toml`` is documented from this module.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.privacy.settings import PrivacySettings, PrivacySettingsError, validate_privacy

Task = Literal["binary", "multiclass", "regression"]
StrategyName = Literal[
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "bulyan"
]
# Byzantine-robust rules: each needs the single updates, so plaintext rounds only (docs/robustness.md).
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "bulyan")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class JobSpecError(ValueError):
    """A job spec that cannot be accepted; ``str()`` names each field and problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


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


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN or infinity in any float field is refused as "must be a finite number",
    # before a range check could call it out of range (NaN compares false with every bound).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Feature(_Strict):
    """One input column of the tabular schema."""

    name: str = Field(min_length=1, description="the column name in every device's data file")
    type: Literal["numeric", "categorical"] = Field(description="numeric: standardised; categorical: one-hot")


class DataSchema(_Strict):
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


class ModelSpec(_Strict):
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


class CohortSpec(_Strict):
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


class TrainingSpec(_Strict):
    """Local training on each device."""

    epochs: int = Field(default=1, ge=1, le=1000, description="local epochs per round")
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    learning_rate: float = Field(default=0.01, gt=0, le=10, description="local learning rate")
    optimizer: Literal["sgd", "adam"] = Field(default="sgd", description="local optimiser")
    holdout: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="share of local rows kept for federated evaluation"
    )
    threads: int = Field(default=1, ge=1, le=256, description="CPU threads a device may use")


class StrategySpec(_Strict):
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


class SecAggSpec(_Strict):
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


class RobustnessSpec(_Strict):
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


class GbdtSpec(_Strict):
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


class EvaluationSpec(_Strict):
    """Evaluation each round: central on reference data, federated on holdouts."""

    reference: str | None = Field(default=None, description="CSV or Parquet path read by `aicfl jobs submit`")
    federated: bool = Field(default=True, description="devices evaluate each model on their holdout rows")


class AuditSpec(_Strict):
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


class JobSpec(_Strict):
    """A whole federated job."""

    name: str = Field(min_length=1, max_length=200, description="a name for people")
    rounds: int = Field(ge=1, le=100_000, description="training rounds to complete")
    seed: int = Field(default=0, ge=0, description="seeds the initial model, cohort draws and local shuffles")
    data: DataSchema | None = Field(
        default=None, description="the tabular schema: required by the built-in app, unused by others"
    )
    model: ModelSpec = Field(default_factory=ModelSpec)
    cohort: CohortSpec = Field(default_factory=CohortSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    secure: bool = Field(
        default=True, description="secure aggregation in every round; false is for experiments only (warned)"
    )
    secagg: SecAggSpec = Field(default_factory=SecAggSpec)
    robustness: RobustnessSpec = Field(default_factory=RobustnessSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    gbdt: GbdtSpec = Field(default_factory=GbdtSpec)
    privacy: PrivacySettings | None = Field(
        default=None,
        description="differential privacy, as the [privacy] table below says (docs/privacy.md); absent: none",
    )

    @field_validator("privacy", mode="before")
    @classmethod
    def _privacy_settings(cls, v: Any) -> Any:
        # One validator for the [privacy] table, shared with every level's code (shared/privacy/settings.py).
        if v is None or isinstance(v, PrivacySettings):
            return v
        try:
            return validate_privacy(v)
        except PrivacySettingsError as err:
            raise ValueError("\n".join(err.problems)) from None

    @model_validator(mode="after")
    def _data_for_builtin(self) -> JobSpec:
        if self.model.app is None and self.data is None:
            raise ValueError(_MISSING_DATA)
        if self.model.app is None and (self.model.app_version is not None or self.model.options):
            raise ValueError("model: app_version and options apply to an app named in [model] app")
        self._robust_strategy_fits()
        self._trees_fit()
        self._privacy_fits()
        return self

    def _privacy_fits(self) -> None:
        """[privacy]: the level the engine runs with this job's aggregation, and nothing it cannot honour.

        The noise multiplier (given or calibrated) and the wrap-around bound are checked when the job is
        submitted (``coordinator/privacy.py``): they need the accountant, which a device does not install.
        ``level = "example"`` runs DP-SGD in the built-in tabular app's own training loop, so only there.
        """
        p = self.privacy
        if p is None:
            return
        if self.model.zoo == "gbdt":
            raise ValueError(
                "privacy: differential privacy is not supported for zoo = 'gbdt' jobs (the trees' histograms"
                " are neither clipped nor noised): remove [privacy] or train an mlp or logreg"
            )
        if p.level == "example" and self.model.app is not None:
            raise ValueError(
                f"privacy: level = 'example' runs DP-SGD in the built-in tabular app's training loop; app"
                f" {self.model.app!r} trains with its own loop, which cannot: use level = 'device' (secure ="
                " true) or 'central' (secure = false)"
            )
        if p.level == "example" and self.strategy.name == "fedprox":
            raise ValueError(
                "privacy: level = 'example' does not run FedProx (DP-SGD steps on the clipped per-example"
                " gradients only, so the proximal term would vanish silently): choose fedavg, fedavgm, fedadam"
                " or fedyogi"
            )
        if p.level == "device" and not self.secure:
            raise ValueError(
                "privacy: level = 'device' adds each device's noise under secure aggregation: it needs"
                " secure = true (use level = 'central' for a job with secure = false)"
            )
        if p.level == "central" and self.secure:
            raise ValueError(
                "privacy: level = 'central' has the coordinator clip and noise the plaintext updates, which"
                " secure aggregation hides from it: use level = 'device' with secure = true, or secure = false"
            )
        if p.sampling != "none":
            raise ValueError(
                f"privacy: sampling = '{p.sampling}' claims amplification, but a round's cohort is whichever"
                " eligible devices check in (not a secret random sample): use sampling = 'none'"
            )
        if self.strategy.name in ROBUST_STRATEGIES:
            raise ValueError(
                f"privacy: {self.strategy.name} picks among single updates; differential privacy averages"
                " clipped updates with noise: choose fedavg, fedavgm, fedprox, fedadam or fedyogi"
            )
        if self.evaluation.federated:
            raise ValueError(
                "evaluation: federated = true sends each device's holdout metrics in the clear, outside the"
                " privacy budget: set [evaluation] federated = false with [privacy]"
            )

    def _trees_fit(self) -> None:
        """A gbdt job: the built-in app's trees, with nothing set that only applies to a network."""
        if self.model.zoo != "gbdt":
            if self.gbdt != GbdtSpec():
                raise ValueError("gbdt: the [gbdt] table applies to [model] zoo = 'gbdt'")
            return
        if self.model.app is not None:
            raise ValueError("model: zoo = 'gbdt' is the built-in tabular app's; an app names its own model")
        if self.model.initial != "random":
            raise ValueError(
                "model: zoo = 'gbdt' grows its trees from the devices' histograms; initial = 'pretrained'"
                " does not apply"
            )
        if self.strategy != StrategySpec():
            raise ValueError(
                "strategy: a zoo = 'gbdt' job sums histograms, it averages no updates: leave [strategy] out"
            )
        if self.audit.enabled and self.audit.gate:
            # Each boosting round grows on the version before it: a withheld ensemble cannot be skipped.
            raise ValueError(
                "audit: gate = true cannot hold back a zoo = 'gbdt' version (the next boosting round"
                " grows on it): leave gate off; its audits still report drift"
            )

    def _robust_strategy_fits(self) -> None:
        name, f, n = self.strategy.name, self.strategy.byzantine, self.cohort.minimum
        if name not in ROBUST_STRATEGIES:
            return
        if self.secure:
            raise ValueError(
                f"strategy: {name} needs every device's own update, which secure aggregation hides from the"
                " coordinator: use it with secure = false, or choose fedavg, fedavgm, fedprox, fedadam or fedyogi"
            )
        # Blanchard et al. (NeurIPS 2017): Krum needs n > 2f + 2; El Mhamdi et al. (ICML 2018): Bulyan n >= 4f + 3.
        if name == "krum" and n <= 2 * f + 2:
            raise ValueError(
                f"strategy: krum with byzantine = {f} needs more than {2 * f + 2} devices per round;"
                f" raise cohort.minimum (now {n}) to at least {2 * f + 3} or lower strategy.byzantine"
            )
        if name == "bulyan" and n < 4 * f + 3:
            raise ValueError(
                f"strategy: bulyan with byzantine = {f} needs at least {4 * f + 3} devices per round;"
                f" raise cohort.minimum (now {n}) or lower strategy.byzantine"
            )
        if name == "krum" and self.strategy.krum_keep > n - f:
            raise ValueError(
                f"strategy: krum_keep ({self.strategy.krum_keep}) must not exceed cohort.minimum - byzantine ({n - f})"
            )

    @property
    def app_ref(self) -> str:
        """The app this job trains: ``[model] app``, or the built-in tabular app."""
        from shared.apps import BUILTIN

        return self.model.app or BUILTIN

    @property
    def tabular(self) -> DataSchema:
        """The tabular schema of a built-in-app job (``ValueError`` for an app job without one)."""
        if self.data is None:
            raise ValueError("this job has no [data] schema: its app reads its own data")
        return self.data


_MISSING_DATA = (
    "data: required field is missing (the built-in tabular app reads it; an app names [model] app)"
)


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        lines = msg.splitlines()
        if len(lines) > 0 and all(line.startswith(f"{loc}.") for line in lines):
            problems += lines  # a section validated on its own names its own fields (validate_privacy)
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "finite_number":
            msg = f"must be a finite number (got {e.get('input')!r})"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        problems.append(f"{loc}: {msg}")
    return problems


def validate_spec(data: Any) -> JobSpec:
    """Validate a parsed spec (a mapping); raise :class:`JobSpecError` naming each bad field."""
    if not isinstance(data, dict):
        raise JobSpecError(["(spec): expected a table of fields"])
    model = data.get("model")
    names_app = isinstance(model, dict) and model.get("app") is not None
    # The built-in app reads the [data] schema; the check sits beside the field errors, which
    # pydantic reports before any model validator runs.
    missing = [] if names_app or "data" in data else [_MISSING_DATA]
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        problems = [p for p in _format_errors(err) if not p.endswith(_MISSING_DATA.split(": ", 1)[1])]
        raise JobSpecError(missing + problems) from None
    return spec


def parse_spec_text(text: str, source: str = "job spec") -> JobSpec:
    """Parse TOML text and validate it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobSpecError([f"{source}: not valid TOML: {err}"]) from None
    return validate_spec(data)


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise JobSpecError([f"{p}: cannot read: {err.strerror}"]) from None
    return parse_spec_text(text, source=str(p))


_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("(top level)", JobSpec),
    ("[data]", DataSchema),
    ("[[data.features]]", Feature),
    ("[model]", ModelSpec),
    ("[cohort]", CohortSpec),
    ("[training]", TrainingSpec),
    ("[strategy]", StrategySpec),
    ("[evaluation]", EvaluationSpec),
    ("[secagg]", SecAggSpec),
    ("[robustness]", RobustnessSpec),
    ("[audit]", AuditSpec),
    ("[gbdt]", GbdtSpec),
]


def _type_text(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for cls in (
        DataSchema,
        ModelSpec,
        CohortSpec,
        TrainingSpec,
        StrategySpec,
        EvaluationSpec,
        SecAggSpec,
        RobustnessSpec,
        AuditSpec,
        GbdtSpec,
        Feature,
        PrivacySettings,
    ):
        text = text.replace(f"{cls.__module__}.{cls.__name__}", cls.__name__)
    return text.replace("<class '", "").replace("'>", "")


def _constraint(meta: Any) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    for attr, op in ops.items():
        if getattr(meta, attr, None) is not None:
            return f"{op} {getattr(meta, attr)}"
    return str(meta)


def reference_markdown() -> str:
    """The job spec reference, generated from the models above (docs/jobspec.md)."""
    lines = [
        "# Job spec reference",
        "",
        "Generated from `shared/jobspec.py` by `aicfl jobs schema`; do not edit by hand.",
        'Durations take seconds or a string such as `"90s"`, `"5m"`, `"1h"`.',
        "An example: `examples/churn.toml`.",
        "",
    ]
    for title, model in _SECTIONS:
        lines += [
            f"## {title}",
            "",
            (model.__doc__ or "").strip().splitlines()[0],
            "",
            "| field | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, f in model.model_fields.items():
            if f.is_required():
                default = "required"
            else:
                value = f.get_default(call_default_factory=True)
                default = "" if isinstance(value, BaseModel) else f"`{value!r}`"
            constraints = ", ".join(_constraint(m) for m in f.metadata)
            meaning = " ".join(
                x for x in (f.description or "", f"({constraints})" if constraints else "") if x
            )
            type_text = _type_text(f.annotation).replace("|", "\\|")
            lines.append(f"| `{name}` | `{type_text}` | {default} | {meaning} |")
        lines.append("")
    lines += _privacy_reference()
    return "\n".join(lines)


def _privacy_reference() -> list[str]:
    """The [privacy] table's rows, from ``PrivacySettings`` (a dataclass shared with the privacy code)."""
    from dataclasses import MISSING, fields
    from typing import get_type_hints

    hints = get_type_hints(PrivacySettings)
    lines = [
        "## [privacy]",
        "",
        (PrivacySettings.__doc__ or "").strip().splitlines()[0],
        "Checked by `shared/privacy/settings.py` (docs/privacy.md).",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in fields(PrivacySettings):
        default = "required" if f.default is MISSING else f"`{f.default!r}`"
        type_text = _type_text(hints[f.name]).replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{type_text}` | {default} | {f.metadata.get('doc', '')} |")
    lines.append("")
    return lines
