"""The whole job spec (:class:`JobSpec`): its sections and the checks that span several of them
(a gbdt job's, the robust strategies', differential privacy's)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from shared.jobspec.sections import (
    ROBUST_STRATEGIES,
    AuditSpec,
    CohortSpec,
    DataSchema,
    EvaluationSpec,
    GbdtSpec,
    ModelSpec,
    RobustnessSpec,
    SecAggSpec,
    StrategySpec,
    StrictModel,
    TrainingSpec,
)
from shared.privacy.settings import PrivacySettings, PrivacySettingsError, validate_privacy

MISSING_DATA = "data: required field is missing (the built-in tabular app reads it; an app names [model] app)"


class JobSpec(StrictModel):
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
            raise ValueError(MISSING_DATA)
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
