"""What a device does for each stage of a round: check, compute, answer.

The device's rows never leave it: a statistics round sends sums and counts, a
training round sends the difference between its locally trained model and the
global one, an evaluation round sends holdout metrics.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from client_agent.transport import SignedClient
from shared import codec
from shared.jobspec import JobSpec
from shared.secagg import statistics as secagg_statistics
from shared.secagg.params import SecAggParams
from shared.secagg.protocol import SecAggClient, weighted_input
from shared.signing import SignatureError, identity_verifier, load_public_key, verify_model
from shared.tabular import DataSchemaError, Preprocessor, load_table, local_statistics, validate_table
from shared.training import evaluate, train_local
from shared.wire import ConfigureMessage, EvaluateMessage, StatsMessage, Task, masked_input_header
from shared.zoo import build_model, flatten_parameters, load_flat_parameters

log = logging.getLogger("aicfl.agent")


class Declined(Exception):
    """This device cannot take part in the round; the message is sent as the reason."""


@dataclass
class _Model:
    job_id: int
    version: int
    header: dict[str, Any]
    vector: np.ndarray


class Worker:
    """Holds the device's data and the verified model between a round's stages."""

    def __init__(
        self,
        client: SignedClient,
        data_path: str,
        coordinator_public_key: str,
        device_id: str,
        threads: int = 1,
    ):
        self.client = client
        self.data_path = data_path
        self.coordinator_key = load_public_key(coordinator_public_key)
        self.device_id = device_id
        self.threads = threads
        self._table: tuple[float, pd.DataFrame] | None = None
        self._model: _Model | None = None
        # SecAgg+ secrets live in memory only: a device that restarts mid-round counts as dropped.
        self._secagg: dict[int, SecAggClient] = {}

    # -- data -------------------------------------------------------------

    def _frame(self) -> pd.DataFrame:
        mtime = os.stat(self.data_path).st_mtime if os.path.exists(self.data_path) else -1.0
        if self._table is None or self._table[0] != mtime:
            self._table = (mtime, load_table(self.data_path))
        return self._table[1]

    def _split(self, spec: JobSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Training and holdout rows; the split is fixed per device and job, so holdouts stay unseen."""
        df = self._frame()
        validate_table(df, spec.data)
        if spec.training.holdout <= 0 or len(df) < 5:
            return df, df.iloc[0:0]
        digest = hashlib.sha256(f"{self.device_id}:{spec.seed}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        order = rng.permutation(len(df))
        n_hold = max(1, int(round(len(df) * spec.training.holdout)))
        return df.iloc[order[n_hold:]], df.iloc[order[:n_hold]]

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
            header, vector = codec.decode(blob)
        except (SignatureError, codec.CodecError) as err:
            raise Declined(f"model refused: {err}") from None
        if header.get("job_id") != task.job_id or header.get("version") != ref.version:
            raise Declined("model refused: its header names another job or version")
        self._model = _Model(task.job_id, ref.version, header, np.array(vector))
        return self._model

    # -- stages -----------------------------------------------------------

    def configure(self, task: Task) -> ConfigureMessage:
        """Check the data against the job's schema and the model's signature; take part or decline."""
        try:
            spec = JobSpec.model_validate(task.spec)
            train, _ = self._split(spec)
            if task.kind != "stats":
                self._verified_model(task)
        except DataSchemaError as err:
            return ConfigureMessage(accepted=False, reason=f"data does not match the job's schema: {err}")
        except Declined as err:
            return ConfigureMessage(accepted=False, reason=str(err))
        vocab = None
        if task.kind == "stats" and spec.secure:
            # The value sets (not their counts) fix the layout of the secure statistics vector.
            vocab = secagg_statistics.vocabulary(local_statistics(train, spec.data), spec.data)
        return ConfigureMessage(accepted=True, rows=len(train), vocabulary=vocab)

    def statistics(self, task: Task) -> StatsMessage:
        spec = JobSpec.model_validate(task.spec)
        train, _ = self._split(spec)
        return StatsMessage(statistics=local_statistics(train, spec.data))

    def _prepared(self, task: Task) -> tuple[JobSpec, Preprocessor, _Model, pd.DataFrame, pd.DataFrame]:
        spec = JobSpec.model_validate(task.spec)
        model = self._verified_model(task)
        # Preprocessing comes from the signed model, not from the unsigned task.
        pre = Preprocessor.from_dict(model.header["preprocess"])
        train, holdout = self._split(spec)
        return spec, pre, model, train, holdout

    def _holdout_metrics(
        self, spec: JobSpec, pre: Preprocessor, model: _Model, holdout: pd.DataFrame
    ) -> dict[str, float]:
        if holdout.empty:
            return {}
        net = build_model(model.header["arch"])
        load_flat_parameters(net, model.vector)
        x, y = pre.transform(holdout)
        metrics = evaluate(
            net, x, y, task=spec.data.task, target_mean=pre.target_mean, target_std=pre.target_std
        )
        return {k: float(v) for k, v in metrics.items() if k != "examples"}

    def evaluate(self, task: Task) -> EvaluateMessage:
        spec, pre, model, _, holdout = self._prepared(task)
        return EvaluateMessage(
            metrics=self._holdout_metrics(spec, pre, model, holdout), examples=len(holdout)
        )

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
        client = SecAggClient(self.device_id, base64.b64decode(info["context"]), params, self.client.key.sign)
        self._secagg = {task.round_id: client}  # one round at a time; older secrets are dropped
        return client.advertise()

    def share_keys(self, task: Task) -> dict[str, Any]:
        """Stage 2: Shamir shares of this device's secrets, encrypted to each neighbour."""
        info = task.secagg or {}
        verify = identity_verifier(info.get("identity_keys", {}))
        return {"ciphertexts": self._secure_client(task).share_keys(info.get("neighbours", {}), verify)}

    def masked_input(self, task: Task) -> bytes:
        """Stage 3: train, quantise, weight by the example count, mask."""
        client = self._secure_client(task)
        spec, pre, model, train, holdout = self._prepared(task)
        metrics = self._holdout_metrics(spec, pre, model, holdout)
        new, loss = self._train(spec, pre, model, train, task.seed)
        delta = new - model.vector
        n = min(len(train), client.params.weight_cap)
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(16), "little")))
        masked = client.masked_input(
            weighted_input(delta, n, client.params, rng),
            (task.secagg or {}).get("ciphertexts", {}),
            in_place=True,  # x_u is not needed again: no second vector of the model's size
        )
        header = masked_input_header(
            task.round_id, train_loss=loss, metrics=metrics, holdout_examples=int(len(holdout))
        )
        return codec.encode(header, masked)

    def masked_statistics(self, task: Task) -> bytes:
        """Stage 3 of a secure statistics round: the local statistics as a masked integer vector."""
        client = self._secure_client(task)
        spec = JobSpec.model_validate(task.spec)
        train, _ = self._split(spec)
        info = task.secagg or {}
        x = secagg_statistics.encode(
            local_statistics(train, spec.data), spec.data, info.get("vocabulary", {})
        )
        masked = client.masked_input(x, info.get("ciphertexts", {}))
        return codec.encode(masked_input_header(task.round_id), masked)

    def unmask(self, task: Task) -> dict[str, Any]:
        """Stage 4: shares of the survivors' self-mask seeds and of the dropped devices' mask keys."""
        info = task.secagg or {}
        client = self._secure_client(task)
        me = {self.device_id}
        shares = client.unmask(set(info.get("survivors", [])) - me, set(info.get("dropped", [])) - me)
        self._secagg.pop(task.round_id, None)
        return {"shares": shares}

    def _train(
        self, spec: JobSpec, pre: Preprocessor, model: _Model, train: pd.DataFrame, seed: int
    ) -> tuple[np.ndarray, float]:
        net = build_model(model.header["arch"])
        load_flat_parameters(net, model.vector)
        x, y = pre.transform(train)
        mu = spec.strategy.proximal_mu if spec.strategy.name == "fedprox" else 0.0
        result = train_local(
            net,
            x,
            y,
            task=spec.data.task,
            epochs=spec.training.epochs,
            batch_size=spec.training.batch_size,
            learning_rate=spec.training.learning_rate,
            optimizer=spec.training.optimizer,
            seed=seed,
            proximal_mu=mu,
            threads=min(self.threads, spec.training.threads),
        )
        return flatten_parameters(net), float(result["loss"])

    def train(self, task: Task) -> bytes:
        """Train from the global model; return the encoded update.

        The update is the example-weighted difference ``n * (local - global)``,
        so the coordinator's aggregate is a plain sum (as under secure
        aggregation, where only the sum is ever revealed) divided by the total
        of the example counts.
        """
        spec, pre, model, train, holdout = self._prepared(task)
        metrics = self._holdout_metrics(spec, pre, model, holdout)
        new, loss = self._train(spec, pre, model, train, task.seed)
        delta = (new - model.vector) * np.float32(len(train))
        header = {
            "kind": "update",
            "round_id": task.round_id,
            "num_examples": int(len(train)),
            "train_loss": loss,
            "metrics": metrics,
            "holdout_examples": int(len(holdout)),
        }
        return codec.encode(header, delta)
