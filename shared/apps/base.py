"""The app interface: the user's model, data and training code, as the federation calls them.

An app is one Python object (``module:attribute``) installed beside ``aicfl[agent]`` on every
device, and beside the coordinator and the cluster where they need the model. Four verbs are
required: build the model, load the device's data, train, evaluate. The rest is optional and has
defaults: how parameters become the one flat float32 vector that travels (masked, under SecAgg+),
a data check, central evaluation on reference data, the reference examples a SHAP audit explains
(:class:`AuditInputs`), and a statistics round that fixes a setup (the built-in tabular app's
preprocessing) before the first model exists. ``docs/apps.md`` has a complete example.

The coordinator never ships code: an agent that lacks the app, or holds another version,
declines the round and says so.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from shared.jobspec import JobSpec

Metrics = dict[str, float]


class DataError(ValueError):
    """The device's data cannot be used for this job; the message says why (it becomes the reason)."""


@dataclass(frozen=True)
class JobContext:
    """What an app knows of the job: its spec, the app's options and the setup a statistics round fixed."""

    spec: JobSpec
    setup: Mapping[str, Any] | None = None

    @property
    def options(self) -> Mapping[str, Any]:
        """The job spec's ``[model.options]`` table: the app's own settings."""
        return self.spec.model.options

    @property
    def seed(self) -> int:
        return self.spec.seed


@dataclass(frozen=True)
class DeviceContext:
    """Where a device's data is and how it splits off the rows it keeps for evaluation."""

    job: JobContext
    data_path: str
    device_id: str
    threads: int = 1
    #: What the device's owner told its agent about it (``aicfl-agent --node-config``), as a Flower
    #: SuperNode's ``--node-config``: e.g. ``{"partition-id": 0, "num-partitions": 4}``.
    node_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)

    @property
    def holdout(self) -> float:
        """The share of local examples kept for federated evaluation (``[training] holdout``)."""
        return self.job.spec.training.holdout

    def holdout_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the training and holdout examples among ``n``: fixed per device and job, so that
        holdout examples are never trained on in any round."""
        if self.holdout <= 0 or n < 5:
            return np.arange(n), np.arange(0)
        digest = hashlib.sha256(f"{self.device_id}:{self.job.seed}".encode()).digest()
        order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n)
        n_hold = max(1, int(round(n * self.holdout)))
        return order[n_hold:], order[:n_hold]


@dataclass
class LocalData:
    """A device's data as its app loaded it: whatever objects the app trains and evaluates on."""

    train: Any
    holdout: Any
    train_examples: int
    holdout_examples: int


@dataclass(frozen=True)
class DpSgdConfig:
    """Example-level differential privacy for one round's training (docs/privacy.md): DP-SGD with noise
    multiplier ``noise_multiplier``, per-example clip ``clip`` and ``steps_per_epoch`` Poisson-sampled
    steps an epoch (``shared.privacy.example.train_local_dp``). An app that runs it returns the cost in
    its metrics as :data:`DP_METRICS` (``DpSgdReport.wire`` with a ``dp_`` prefix)."""

    noise_multiplier: float
    clip: float
    steps_per_epoch: int


#: The metrics an app's ``train`` returns after DP-SGD: what the device reports for accounting.
DP_METRICS = ("dp_noise_multiplier", "dp_sampling_rate", "dp_steps")


@dataclass(frozen=True)
class TrainConfig:
    """One round's local training settings (the job's ``[training]`` and ``[strategy]``)."""

    round: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    seed: int
    threads: int = 1
    proximal_mu: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Example-level differential privacy: train with DP-SGD and report :data:`DP_METRICS`; None: plain.
    dp: DpSgdConfig | None = None


@dataclass(frozen=True)
class AuditInputs:
    """Reference examples as the app's model takes them, for the SHAP audit of each version
    (:meth:`App.audit_inputs`).

    ``x``: a float array ``(examples, *input shape)``; ``model(torch.from_numpy(x[a:b]))`` gives the
    raw outputs explained, ``(rows, outputs)``. ``features``: one name per input value of an example,
    in C (row-major) order over the input shape, e.g. ``"px_3_4"`` for the pixel in row 3, column 4.
    ``image_shape``: ``(height, width)`` when the inputs are images whose last two axes are those
    (channels before them are summed in the plots): the audit then draws the mean attribution
    towards each class as heatmaps. ``outputs``: a name per model output (class labels; default
    ``"0"``, ``"1"``...). ``output``: what the outputs are, in words (the report's ``output``).
    """

    x: np.ndarray
    features: Sequence[str]
    image_shape: tuple[int, int] | None = None
    outputs: Sequence[str] | None = None
    output: str = "the model's raw outputs"


class App(ABC):
    """A federated app. Subclass it and create one instance; name it in the job spec as
    ``[model] app = "package.module:instance"`` with ``app_version``."""

    #: A name for people and the version the job spec's ``app_version`` must match.
    name: str = ""
    version: str = "0"
    #: Statistics a secure round gathers before the first model (see :class:`Statistics`); ``None``:
    #: version 0 is built as soon as the job is submitted.
    statistics: Statistics | None = None

    @abstractmethod
    def build_model(self, job: JobContext) -> Any:
        """A fresh model (a ``torch.nn.Module`` unless the app overrides the parameter methods).

        Called under a fixed seed for version 0; the same call on every device gives the same shapes.
        """

    @abstractmethod
    def load_data(self, device: DeviceContext) -> LocalData:
        """The device's local data (any files at ``device.data_path``). Raise :class:`DataError`
        when it cannot be used."""

    @abstractmethod
    def train(self, model: Any, data: LocalData, config: TrainConfig) -> Metrics:
        """Train ``model`` in place on ``data.train``; return metrics, at least ``loss``."""

    @abstractmethod
    def evaluate(self, model: Any, data: LocalData) -> Metrics:
        """Metrics of ``model`` on ``data.holdout`` (``loss`` and whatever else the app reports)."""

    # -- optional ------------------------------------------------------------

    def check_data(self, data: LocalData, job: JobContext) -> None:
        """Raise :class:`DataError` when the data does not fit the job (a schema check)."""
        return None

    def get_parameters(self, model: Any) -> np.ndarray:
        """The model's parameters as one float32 vector (default: a torch module's float tensors in
        ``state_dict`` order)."""
        from shared.zoo import flatten_parameters

        return flatten_parameters(model)

    def set_parameters(self, model: Any, vector: np.ndarray) -> None:
        """Load a vector made by :meth:`get_parameters` into ``model`` (in place)."""
        from shared.zoo import load_flat_parameters

        load_flat_parameters(model, vector)

    def tree_rows(self, data: LocalData) -> tuple[np.ndarray, np.ndarray] | None:
        """The training rows as a feature matrix and encoded target, for a job that grows trees
        (``[model] zoo = "gbdt"``, docs/gbdt.md); ``None`` (the default): this app grows none."""
        return None

    def describe(self, job: JobContext) -> dict[str, Any]:
        """A JSON description of the model this job trains, kept in every version's signed header."""
        return {"app": job.spec.app_ref, "app_version": self.version, "options": dict(job.options)}

    def load_reference(self, data: bytes, job: JobContext) -> Any:
        """Parse the job's reference data (``aicfl jobs reference``) for central evaluation.

        Raise :class:`DataError` when it is unusable; the default takes none.
        """
        raise DataError(f"app {self.name or type(self).__name__} takes no reference data")

    def evaluate_central(self, model: Any, reference: Any, job: JobContext) -> Metrics | None:
        """Metrics of ``model`` on the reference data :meth:`load_reference` parsed (default: none)."""
        return None

    def audit_inputs(self, reference: Any, job: JobContext) -> AuditInputs | None:
        """The reference data :meth:`load_reference` parsed, as model inputs for the SHAP audit of
        each version (``aicfl audit worker``, docs/audit.md): per-input attributions, importances,
        drift between versions. The model must then be a ``torch.nn.Module``.

        Default ``None``: the app's versions cannot be audited (each audit fails, saying so; turn
        ``[audit] enabled`` off for such a job).
        """
        return None


class Statistics(ABC):
    """A statistics round before the first model: each device's summary, summed under SecAgg+.

    The built-in tabular app uses it to fix its preprocessing (means, deviations, vocabularies)
    from every device's rows without revealing any one device's. The setup it produces is stored
    with the job, signed into every version's header and given to :meth:`App.build_model` and
    :meth:`App.load_data` as ``job.setup``.
    """

    @abstractmethod
    def local(self, data: LocalData, job: JobContext) -> dict[str, Any]:
        """This device's summary of ``data.train`` (sums and counts, never rows)."""

    def check(self, summary: Mapping[str, Any], job: JobContext) -> None:
        """Raise ``ValueError`` naming what is wrong with a device's plaintext summary (the coordinator
        checks every one before it merges them); default: any JSON object."""
        return None

    @abstractmethod
    def merge(self, summaries: Sequence[Mapping[str, Any]], job: JobContext) -> dict[str, Any]:
        """The cohort's summary from the devices' (plaintext rounds)."""

    @abstractmethod
    def setup(self, merged: Mapping[str, Any], job: JobContext) -> dict[str, Any]:
        """The JSON setup the merged summary fixes."""

    @abstractmethod
    def vocabulary(self, local: Mapping[str, Any], job: JobContext) -> dict[str, list[str]]:
        """The value sets (not counts) that fix the layout of the secure vector."""

    @abstractmethod
    def layout(self, vocabulary: Mapping[str, Sequence[str]], job: JobContext) -> Sequence[Any]:
        """One entry per integer of the secure vector, given the cohort's merged vocabulary."""

    @abstractmethod
    def encode(
        self, local: Mapping[str, Any], vocabulary: Mapping[str, Sequence[str]], job: JobContext
    ) -> np.ndarray:
        """The local summary as the integer vector SecAgg+ sums."""

    @abstractmethod
    def decode(
        self, total: np.ndarray, vocabulary: Mapping[str, Sequence[str]], job: JobContext
    ) -> dict[str, Any]:
        """The merged summary from the summed vector."""


def checked_metrics(metrics: Any, what: str) -> Metrics:
    """``metrics`` as a dict of finite floats, or ``ValueError`` naming the first bad entry."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{what} returned {type(metrics).__name__}, not a dict of metrics")
    out: Metrics = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ValueError(f"{what} returned a metric named {name!r}, not a string")
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"{what} returned metric {name!r} = {value!r}, not a number")
        if not math.isfinite(float(value)):
            raise ValueError(f"{what} returned metric {name!r} = {float(value)}, not a finite number")
        out[name] = float(value)
    return out
