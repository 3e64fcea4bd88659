"""What a device does for each stage of a round: check, compute, answer, through the job's app.

The device's data never leaves it: a statistics round sends the app's summary (sums and counts),
a training round sends the difference between the locally trained model and the global one, an
evaluation round sends holdout metrics. The app (``shared.apps``) is installed on the device by its
owner; an agent that lacks it, or holds another version, declines the round and says so. Whatever
the app's code does wrong (raises, returns NaN, returns parameters of another size) becomes one
reason and this device sits the round out; the agent keeps running.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from client_agent.transport import SignedClient
from shared import codec
from shared.apps import (
    DP_METRICS,
    App,
    AppError,
    DataError,
    DeviceContext,
    DpSgdConfig,
    JobContext,
    LocalData,
    Metrics,
    TrainConfig,
    checked_metrics,
    load_app,
)
from shared.gbdt.rounds import TREE_KINDS, binds_trees
from shared.jobspec import JobSpec
from shared.privacy.skellam import NoiseShare, SkellamParams, noise_share, noised_input
from shared.robustness import capped_weight
from shared.secagg.params import SecAggParams
from shared.secagg.protocol import SecAggClient, weighted_input
from shared.signing import SignatureError, identity_verifier, load_public_key, verify_model
from shared.wire import ConfigureMessage, EvaluateMessage, StatsMessage, Task, masked_input_header

log = logging.getLogger("aicfl.agent")
T = TypeVar("T")


def _csprng() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG: rounding and noise nobody can predict."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))


class _NoiseDraw:
    """A device-level DP round's Skellam share, drawn in a thread while the device waits between stages.

    The share depends only on the round's parameters (``shared.privacy.skellam.noise_share``), so it
    need not wait for the update: drawn after share_keys, it is off the round's critical path.
    numpy's Poisson draw releases the GIL, so the thread does not hold up the agent's requests.
    """

    def __init__(self, params: SkellamParams):
        self.params = params
        self._share: NoiseShare | None = None
        self._thread = threading.Thread(target=self._draw, name="aicfl-noise-share", daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        try:
            self._share = noise_share(self.params, _csprng())
        except Exception:  # never a crash in a thread: masked_input draws the share itself instead
            log.exception("drawing the noise share ahead failed; it is drawn at masked input instead")

    def take(self) -> NoiseShare | None:
        """The share, once drawn (waiting for the draw if need be); None if the draw failed."""
        self._thread.join()
        share, self._share = self._share, None  # one vector only: never handed out twice
        return share


class Declined(Exception):
    """This device cannot take part in the round; the message is sent as the reason."""


@dataclass
class _Model:
    job_id: int
    version: int
    header: dict[str, Any]
    vector: np.ndarray


class Worker:
    """Holds the device's app, data and the verified model between a round's stages."""

    def __init__(
        self,
        client: SignedClient,
        data_path: str,
        coordinator_public_key: str,
        device_id: str,
        threads: int = 1,
        node_config: dict[str, bool | int | float | str] | None = None,
    ):
        self.client = client
        self.node_config = dict(node_config or {})
        self.data_path = data_path
        self.coordinator_key = load_public_key(coordinator_public_key)
        self.device_id = device_id
        self.threads = threads
        self._apps: dict[tuple[str, str | None], App] = {}
        self.used_apps: set[str] = set()  # app references that loaded here (the agent remembers them)
        self._data: tuple[tuple[Any, ...], LocalData] | None = None
        # The key of the data the app's check_data last passed: the same rows under the same job are
        # not checked again every round (the whole table, on a device's battery).
        self._checked: tuple[Any, ...] | None = None
        self._model: _Model | None = None
        # SecAgg+ secrets live in memory only: a device that restarts mid-round counts as dropped.
        self._secagg: dict[int, SecAggClient] = {}
        # A device-level DP round's noise share, drawn ahead at share_keys; kept and dropped with _secagg.
        self._noise: dict[int, _NoiseDraw] = {}
        # A gbdt job's bin codes and gradients under one version: (job, version, data), codes, (g, h).
        self._trees: tuple[tuple[int, int, int], np.ndarray, tuple[np.ndarray, np.ndarray]] | None = None
        # Example-level DP: the round and the DP-SGD report (z, q, steps) of the last training, for the update.
        self._dp_report: tuple[int, dict[str, float | int]] | None = None

    # -- the app and its data ------------------------------------------------

    def _app(self, spec: JobSpec) -> App:
        key = (spec.app_ref, spec.model.app_version)
        if key not in self._apps:
            try:
                self._apps[key] = load_app(*key)
            except AppError as err:
                raise Declined(str(err)) from None
            self.used_apps.add(spec.app_ref)
        return self._apps[key]

    def _data_stamp(self) -> float:
        """When the data last changed: a file's mtime, or the newest of a folder's entries."""
        try:
            st = os.stat(self.data_path)
        except OSError:
            return -1.0
        if not os.path.isdir(self.data_path):
            return st.st_mtime
        with os.scandir(self.data_path) as entries:
            return max([st.st_mtime, *(e.stat().st_mtime for e in entries)])

    def _local(self, app: App, job: JobContext, task: Task) -> LocalData:
        """The app's view of the device's data for this job, reloaded when the data changes."""
        setup = json.dumps(job.setup, sort_keys=True) if job.setup is not None else None
        key = (task.job_id, job.spec.app_ref, setup, self._data_stamp())
        if self._data is None or self._data[0] != key:
            self._data = None
            device = DeviceContext(job, self.data_path, self.device_id, self.threads, self.node_config)
            try:
                data = app.load_data(device)
            except (DataError, OSError) as err:
                raise DataError(str(err)) from None
            except Exception as err:  # the app's own code: any failure is one reason, never a crash
                raise Declined(f"app could not load the data: {type(err).__name__}: {err}") from None
            if not isinstance(data, LocalData):
                raise Declined(f"app load_data returned {type(data).__name__}, not a LocalData")
            self._data = (key, data)
        return self._data[1]

    def _context(self, task: Task, model: _Model | None) -> tuple[JobSpec, App, JobContext]:
        spec = JobSpec.model_validate(task.spec)
        app = self._app(spec)
        # The setup comes from the signed model, not from the unsigned task; a gbdt job's binning round
        # comes before its first version, and takes it from the task (docs/gbdt.md).
        setup = model.header.get("preprocess") if model is not None else None
        if model is None and task.kind == "bins":
            setup = task.preprocess
        return spec, app, JobContext(spec, setup)

    @staticmethod
    def _call(what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run the app's code; whatever it raises becomes the reason this device sits the round out."""
        try:
            return fn(*args)
        except Declined:
            raise
        except Exception as err:
            raise Declined(f"app {what} failed: {type(err).__name__}: {err}") from None

    def _net(self, app: App, job: JobContext, model: _Model) -> Any:
        net = self._call("build_model", app.build_model, job)
        try:
            app.set_parameters(net, model.vector)
        except Exception as err:
            raise Declined(f"the app's model does not take the job's parameters: {err}") from None
        return net

    def _parameters(self, app: App, net: Any, size: int) -> np.ndarray:
        vec = self._call("get_parameters", app.get_parameters, net)
        arr = np.asarray(vec)
        if arr.dtype != np.float32 or arr.ndim != 1 or arr.size != size:
            raise Declined(
                f"app get_parameters returned {arr.dtype} of shape {arr.shape}; the job's model is"
                f" float32 of shape ({size},)"
            )
        if not np.isfinite(arr).all():
            raise Declined("app training produced non-finite parameters")
        return arr

    # -- the model --------------------------------------------------------

    def _verified_model(self, task: Task) -> _Model:
        ref = task.model
        if ref is None:
            raise Declined("the task names no model")
        if self._model and (self._model.job_id, self._model.version) == (task.job_id, ref.version):
            return self._model
        blob = self.client.request("GET", f"/v1/device/jobs/{task.job_id}/models/{ref.version}").content
        try:
            verify_model(self.coordinator_key, task.job_id, ref.version, blob, ref.sha256, ref.signature)
            header, vector = codec.decode(blob, dtype=codec.model_dtype(blob))
        except (SignatureError, codec.CodecError) as err:
            raise Declined(f"model refused: {err}") from None
        if header.get("job_id") != task.job_id or header.get("version") != ref.version:
            raise Declined("model refused: its header names another job or version")
        self._model = _Model(task.job_id, ref.version, header, np.array(vector))
        return self._model

    # -- stages -----------------------------------------------------------

    def configure(self, task: Task) -> ConfigureMessage:
        """Check the app, the data and the model's signature; take part or decline with the reason."""
        vocab = None
        try:
            model = self._verified_model(task) if task.kind not in ("stats", "bins") else None
            spec, app, job = self._context(task, model)
            data = self._local(app, job, task)
            self._call_check(app, data, job)
            if task.kind == "stats" and app.statistics is None:
                raise Declined(f"app {spec.app_ref} gathers no statistics")
            if task.kind == "stats" and spec.secure:
                # The value sets (not their counts) fix the layout of the secure statistics vector.
                assert app.statistics is not None
                local = self._call("statistics", app.statistics.local, data, job)
                vocab = self._call("statistics", app.statistics.vocabulary, local, job)
        except DataError as err:
            return ConfigureMessage(accepted=False, reason=f"data does not match the job's schema: {err}")
        except Declined as err:
            return ConfigureMessage(accepted=False, reason=str(err)[:2000])
        # Under differential privacy a training round carries no count of this device's rows in the clear.
        rows = 0 if spec.privacy is not None and task.kind == "train" else data.train_examples
        return ConfigureMessage(accepted=True, rows=rows, vocabulary=vocab)

    def _call_check(self, app: App, data: LocalData, job: JobContext) -> None:
        key = self._data[0] if self._data is not None and self._data[1] is data else None
        if key is not None and key == self._checked:
            return
        self._checked = None
        try:
            app.check_data(data, job)
        except (DataError, ValueError) as err:
            raise DataError(str(err)) from None
        except Exception as err:
            raise Declined(f"app check_data failed: {type(err).__name__}: {err}") from None
        self._checked = key

    def _stats_local(self, task: Task) -> tuple[App, JobContext, dict[str, Any]]:
        spec, app, job = self._context(task, None)
        if app.statistics is None:
            raise Declined(f"app {spec.app_ref} gathers no statistics")
        try:
            data = self._local(app, job, task)
        except DataError as err:
            raise Declined(f"data does not match the job's schema: {err}") from None
        return app, job, self._call("statistics", app.statistics.local, data, job)

    def statistics(self, task: Task) -> StatsMessage:
        _, _, local = self._stats_local(task)
        return StatsMessage(statistics=local)

    def _prepared(self, task: Task) -> tuple[JobSpec, App, JobContext, _Model, LocalData]:
        model = self._verified_model(task)
        spec, app, job = self._context(task, model)
        try:
            data = self._local(app, job, task)
        except DataError as err:
            raise Declined(f"data does not match the job's schema: {err}") from None
        return spec, app, job, model, data

    def _holdout_metrics(
        self, app: App, job: JobContext, model: _Model, data: LocalData
    ) -> tuple[Metrics, int]:
        """The global model's metrics on the holdout, and how many examples they cover (an app may
        report the count as an ``examples`` metric, as a Flower client's evaluate does)."""
        if data.holdout_examples <= 0:
            return {}, 0
        net = self._net(app, job, model)
        try:
            metrics = checked_metrics(self._call("evaluate", app.evaluate, net, data), "app evaluate")
        except ValueError as err:
            raise Declined(str(err)) from None
        examples = int(metrics.pop("examples", data.holdout_examples))
        return metrics, max(0, examples)

    def evaluate(self, task: Task) -> EvaluateMessage:
        _, app, job, model, data = self._prepared(task)
        metrics, examples = self._holdout_metrics(app, job, model, data)
        return EvaluateMessage(metrics=metrics, examples=examples)

    # -- secure aggregation (SecAgg+) ----------------------------------------

    def _secure_client(self, task: Task) -> SecAggClient:
        client = self._secagg.get(task.round_id)
        if client is None:
            raise Declined(f"no secure-aggregation state for round {task.round_id} (restarted mid-round)")
        return client

    def advertise(self, task: Task) -> dict[str, str]:
        """Stage 1: two fresh X25519 keys, signed with the identity key."""
        info = task.secagg or {}
        params = SecAggParams(**info["params"])
        context = base64.b64decode(info["context"])
        if task.boosting is not None and not binds_trees(context, task.boosting):
            raise Declined(
                "the round's secure-aggregation context does not name the trees this device was sent:"
                " devices may have been sent different trees (docs/gbdt.md)"
            )
        client = SecAggClient(self.device_id, context, params, self.client.key.sign)
        self._secagg = {task.round_id: client}  # one round at a time; older secrets are dropped
        self._noise = {}
        return client.advertise()

    def share_keys(self, task: Task) -> dict[str, Any]:
        """Stage 2: Shamir shares of this device's secrets, encrypted to each neighbour."""
        info = task.secagg or {}
        verify = identity_verifier(info.get("identity_keys", {}))
        out = {"ciphertexts": self._secure_client(task).share_keys(info.get("neighbours", {}), verify)}
        self._draw_noise_ahead(task)
        return out

    def _draw_noise_ahead(self, task: Task) -> None:
        """Under device-level DP, start drawing this round's Skellam share while the device waits for
        masked_input: the draw (most of the encoding's time at 1e6 values) leaves the critical path."""
        info = task.secagg or {}
        if task.kind != "train" or not info.get("privacy") or task.round_id not in self._secagg:
            return
        try:
            params = SkellamParams(**info["privacy"])
        except (TypeError, ValueError):
            return  # masked_input refuses them, with the reason
        self._noise = {task.round_id: _NoiseDraw(params)}

    def masked_input(self, task: Task) -> bytes:
        """Stage 3: train, quantise, weight by the example count, mask (a gbdt job: its tree vector)."""
        client = self._secure_client(task)
        if task.kind in TREE_KINDS:
            vec, _ = self._tree_input(task)
            masked = client.masked_input(vec, (task.secagg or {}).get("ciphertexts", {}), in_place=True)
            return codec.encode(masked_input_header(task.round_id), masked)
        spec, app, job, model, data = self._prepared(task)
        info = task.secagg or {}
        if spec.privacy is not None and spec.privacy.level == "example":
            # Example-level DP under SecAgg+: DP-SGD here, weight 1, no loss or metrics; only the cost.
            new, _, _ = self._train(spec, app, job, model, data, task)
            masked = client.masked_input(
                weighted_input(new - model.vector, 1, client.params, _csprng()),
                info.get("ciphertexts", {}),
                in_place=True,
            )
            return codec.encode({**masked_input_header(task.round_id), "dp": self._dp_wire(task)}, masked)
        if spec.privacy is not None:
            return self._noised_masked_input(task, client, spec, app, job, model, data, info)
        metrics, holdout = self._holdout_metrics(app, job, model, data)
        new, loss, examples = self._train(spec, app, job, model, data, task)
        delta = new - model.vector
        # The protocol's bound on this device's pull: values clipped to [-clip, clip] when quantised,
        # weight at most the round's weight_cap (robustness.max_weight lowers it; docs/robustness.md).
        n = capped_weight(examples, min(client.params.weight_cap, spec.robustness.max_weight))
        masked = client.masked_input(
            weighted_input(delta, n, client.params, _csprng()),
            info.get("ciphertexts", {}),
            in_place=True,  # x_u is not needed again: no second vector of the model's size
        )
        header = masked_input_header(
            task.round_id, train_loss=loss, metrics=metrics, holdout_examples=holdout
        )
        return codec.encode(header, masked)

    def _noised_masked_input(
        self,
        task: Task,
        client: SecAggClient,
        spec: JobSpec,
        app: App,
        job: JobContext,
        model: _Model,
        data: LocalData,
        info: dict[str, Any],
    ) -> bytes:
        """Stage 3 under device-level differential privacy (docs/privacy.md): the model delta clipped,
        scaled, rounded, this device's Skellam noise share added (``noised_input``), weight 1, then masked.
        Nothing data-dependent travels beside it: no loss, no metrics, no example count."""
        if spec.privacy is None or spec.privacy.level != "device":
            level = spec.privacy.level if spec.privacy is not None else "none"
            raise Declined(f"privacy level {level!r} does not run under secure aggregation")
        if not info.get("privacy"):
            raise Declined("the round names no privacy parameters: this device adds no noise without them")
        try:
            params = SkellamParams(**info["privacy"])
        except (TypeError, ValueError) as err:
            raise Declined(f"the round's privacy parameters are refused: {err}") from None
        new, _, _ = self._train(spec, app, job, model, data, task)
        delta = new - model.vector
        try:
            x = self._noised(delta, params)
        except ValueError as err:
            raise Declined(f"cannot noise the update: {err}") from None
        masked = client.masked_input(x, info.get("ciphertexts", {}), in_place=True)
        return codec.encode(masked_input_header(task.round_id), masked)

    def _drawn_noise(self, params: SkellamParams) -> NoiseShare | None:
        """The share drawn ahead at share_keys for the round in progress and these parameters, taken once
        (``_noise`` holds one round, as ``_secagg`` does); None if there is none (the draw failed, or the
        parameters changed since share_keys): ``noised_input`` then draws it with the update."""
        pending = [d for r, d in self._noise.items() if r in self._secagg and d.params == params]
        self._noise = {}
        return pending[0].take() if pending else None

    def _noised(self, delta: np.ndarray, params: SkellamParams) -> np.ndarray:
        """x_u of a device-level round: ``noised_input`` with rounding from the CSPRNG, and the noise
        share drawn ahead (or, without one, drawn here from the CSPRNG)."""
        return noised_input(delta, params, _csprng(), noise=self._drawn_noise(params))

    def masked_statistics(self, task: Task) -> bytes:
        """Stage 3 of a secure statistics round: the app's summary as a masked integer vector."""
        client = self._secure_client(task)
        app, job, local = self._stats_local(task)
        assert app.statistics is not None
        info = task.secagg or {}
        x = self._call("statistics", app.statistics.encode, local, info.get("vocabulary", {}), job)
        masked = client.masked_input(x, info.get("ciphertexts", {}))
        return codec.encode(masked_input_header(task.round_id), masked)

    def unmask(self, task: Task) -> dict[str, Any]:
        """Stage 4: shares of the survivors' self-mask seeds and of the dropped devices' mask keys."""
        info = task.secagg or {}
        client = self._secure_client(task)
        me = {self.device_id}
        shares = client.unmask(set(info.get("survivors", [])) - me, set(info.get("dropped", [])) - me)
        self._secagg.pop(task.round_id, None)
        self._noise.pop(task.round_id, None)
        return {"shares": shares}

    # -- gradient-boosted trees (docs/gbdt.md) ---------------------------------

    def _tree_input(self, task: Task) -> tuple[np.ndarray, int]:
        """A gbdt job's vector for this round (uint64: cell counts, or the level's histogram), and the
        rows it covers. Bin codes and gradients are kept per version: every level of a boosting round
        starts from the same one."""
        from shared.gbdt import HistogramError
        from shared.gbdt.model import ModelFormatError, from_bytes, growth_from_json
        from shared.gbdt.rounds import bins_input, boost_setup, codes_of, device_gradients, level_input

        model = self._verified_model(task) if task.kind == "level" else None
        spec, app, job = self._context(task, model)
        if job.setup is None:
            raise Declined("the job's preprocessing is not fixed yet")
        try:
            data = self._local(app, job, task)
        except DataError as err:
            raise Declined(f"data does not match the job's schema: {err}") from None
        rows = self._call("tree_rows", app.tree_rows, data)
        if rows is None:
            raise Declined(f"app {spec.app_ref} grows no trees")
        x, y = rows
        try:
            setup = boost_setup(spec, job.setup)
            if model is None:
                return bins_input(setup, x, y), int(x.shape[0])
            boosted = from_bytes(model.vector)
            key = (task.job_id, model.version, id(data))
            if self._trees is None or self._trees[0] != key:
                self._trees = None
                codes = codes_of(boosted, x)
                self._trees = (key, codes, device_gradients(setup, boosted, codes, y))
            _, codes, grads = self._trees
            info = task.boosting or {}
            growth = growth_from_json(info.get("growth") or {})
            devices = int(info.get("devices", 1))
            return level_input(setup, boosted, growth, codes, y, devices, grads), int(x.shape[0])
        except (ValueError, ModelFormatError, HistogramError) as err:
            raise Declined(f"cannot compute the trees' histogram: {err}") from None

    def _train(
        self, spec: JobSpec, app: App, job: JobContext, model: _Model, data: LocalData, task: Task
    ) -> tuple[np.ndarray, float, int]:
        """Train from the global model: the new parameters, the training loss and the example count."""
        if data.train_examples <= 0:
            raise Declined("no training examples")
        net = self._net(app, job, model)
        config = TrainConfig(
            round=task.round,
            epochs=spec.training.epochs,
            batch_size=spec.training.batch_size,
            learning_rate=spec.training.learning_rate,
            optimizer=spec.training.optimizer,
            seed=task.seed,
            threads=min(self.threads, spec.training.threads),
            proximal_mu=spec.strategy.proximal_mu if spec.strategy.name == "fedprox" else 0.0,
            options=spec.model.options,
            dp=_dp_sgd(spec),
        )
        self._dp_report = None
        try:
            metrics = checked_metrics(self._call("train", app.train, net, data, config), "app train")
        except ValueError as err:
            raise Declined(str(err)) from None
        if "loss" not in metrics:
            raise Declined("app train returned no 'loss' metric")
        if config.dp is not None:
            if any(name not in metrics for name in DP_METRICS):
                raise Declined(
                    f"app {spec.app_ref} trained without DP-SGD: it reported no {', '.join(DP_METRICS)}"
                )
            report = {name.removeprefix("dp_"): metrics.pop(name) for name in DP_METRICS}
            report["steps"] = int(report["steps"])
            self._dp_report = (task.round_id, report)
        # An app may report how many examples it trained on (a Flower client's fit does).
        examples = int(metrics.pop("examples", data.train_examples))
        if examples < 1:
            raise Declined(f"app train reported {examples} examples")
        return self._parameters(app, net, model.vector.size), metrics["loss"], examples

    def _dp_wire(self, task: Task) -> dict[str, float | int]:
        """The DP-SGD report of this round's training (example level), as the coordinator accounts it."""
        if self._dp_report is None or self._dp_report[0] != task.round_id:
            raise Declined("example-level DP: this round's training made no DP-SGD report")
        return dict(self._dp_report[1])

    def train(self, task: Task) -> bytes:
        """Train from the global model; return the encoded update.

        The update is the example-weighted difference ``n * (local - global)``,
        so the coordinator's aggregate is a plain sum (as under secure
        aggregation, where only the sum is ever revealed) divided by the total
        of the example counts. ``n`` is capped at ``robustness.max_weight``: a
        device with more data counts that much (docs/robustness.md).
        """
        if task.kind in TREE_KINDS:
            vec, rows = self._tree_input(task)
            header = {"kind": "update", "round_id": task.round_id, "num_examples": max(rows, 1)}
            return codec.encode(header, vec)
        spec, app, job, model, data = self._prepared(task)
        if spec.privacy is not None:
            # Central differential privacy: the coordinator clips and noises (it is trusted); example level:
            # DP-SGD here, its cost (z, q, steps) beside the update. Either way the update counts with
            # weight 1 and nothing else data-dependent travels beside it (docs/privacy.md).
            new, _, _ = self._train(spec, app, job, model, data, task)
            header = {"kind": "update", "round_id": task.round_id, "num_examples": 1}
            if spec.privacy.level == "example":
                header["dp"] = self._dp_wire(task)
            return codec.encode(header, new - model.vector)
        metrics, holdout = self._holdout_metrics(app, job, model, data)
        new, loss, examples = self._train(spec, app, job, model, data, task)
        n = capped_weight(examples, spec.robustness.max_weight)
        delta = (new - model.vector) * np.float32(n)
        header = {
            "kind": "update",
            "round_id": task.round_id,
            "num_examples": n,
            "train_loss": loss,
            "metrics": metrics,
            "holdout_examples": holdout,
        }
        return codec.encode(header, delta)


def _dp_sgd(spec: JobSpec) -> DpSgdConfig | None:
    """The DP-SGD an example-level job trains with: the noise multiplier the coordinator wrote into the
    spec at submission (calibrated, or the job's own), the per-example clip and the public steps an epoch."""
    p = spec.privacy
    if p is None or p.level != "example":
        return None
    if p.noise_multiplier is None or p.steps_per_epoch is None:
        raise Declined("example-level DP: the job's spec names no noise multiplier or steps_per_epoch")
    return DpSgdConfig(p.noise_multiplier, p.clip, p.steps_per_epoch)
