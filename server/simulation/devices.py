"""The virtual devices: the agent's own ``Worker`` per device, with its data in memory and no HTTP.

A device here is a ``client_agent.worker.Worker``: the code that checks the model's signature,
loads and checks the data through the job's app, trains, evaluates, and speaks SecAgg+, exactly as
on an edge device. Only its surroundings are virtual:

- :class:`ModelShelf` answers the worker's one request, the model download, from the bytes the
  coordinator serves for that version (``CheckIns.model_blob``), fetched once per version by the
  driver instead of once per device; the worker still checks the SHA-256 and signature itself.
- :class:`FrameApp` is the built-in tabular app reading the device's rows from memory instead of
  its file (the rows were read through ``load_table`` once, so their types are the file's).
- :class:`DeviceShard` holds the workers of some devices and does one stage's work for each, as
  ``client_agent.loop.Agent._compose`` does, returning the message the agent would post. In one
  process one shard holds every device; on Ray each actor holds one shard (``server.simulation.ray``).

A device's plaintext update never reaches the coordinator; the shard also returns it (clipped,
with its weight) beside the masked message, so that the driver can check that the SecAgg+ sum
is exact, as ``server.simulate`` does with synthetic updates.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.apps import BUILTIN, App, DeviceContext, JobContext, LocalData
from shared.apps.tabular import TabularApp
from shared.jobspec import JobSpec
from shared.robustness import capped_weight
from shared.secagg.primitives import SecAggError
from shared.wire import Task


class ModelShelf:
    """Model bytes by ``(job, version)``, as the coordinator serves them; filled by the driver."""

    def __init__(self) -> None:
        self.blobs: dict[tuple[int, int], bytes] = {}

    def update(self, blobs: Mapping[tuple[int, int], bytes]) -> None:
        self.blobs.update(blobs)


@dataclass
class _Response:
    content: bytes


class LocalTransport:
    """What a ``Worker`` needs of its ``SignedClient``: the identity key and the model download."""

    def __init__(self, key: Ed25519PrivateKey, shelf: ModelShelf):
        self.key = key
        self.shelf = shelf

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> _Response:
        parts = path.strip("/").split("/")
        if (
            method != "GET"
            or len(parts) != 6
            or parts[:3] != ["v1", "device", "jobs"]
            or parts[4] != "models"
        ):
            raise device_code().declined(f"the simulation serves no {method} {path}")
        blob = self.shelf.blobs.get((int(parts[3]), int(parts[5])))
        if blob is None:
            raise device_code().declined(f"model {parts[3]}/{parts[5]} is not on the shelf")
        return _Response(blob)


class FrameApp(TabularApp):
    """The built-in tabular app over rows held in memory: ``data_path`` names the device's frame."""

    def __init__(self, frames: Mapping[str, pd.DataFrame]):
        self.frames = frames
        self._checked: set[tuple[int, str]] = set()

    def load_frame(self, device: DeviceContext) -> pd.DataFrame:
        # The rows from memory instead of load_table(data_path): read once, when the job was set up.
        return self.frames[device.data_path]

    def check_data(self, data: LocalData, job: JobContext) -> None:
        # A device's rows never change here: once they passed the job's schema check, they pass it
        # again (the agent checks every round because its file may change between rounds).
        key = (id(data.train.whole), job.spec.tabular.model_dump_json())
        if key not in self._checked:
            super().check_data(data, job)
            self._checked.add(key)


@dataclass(frozen=True)
class DeviceCode:
    """The agent's code the simulation runs: its worker (as ``SimWorker``) and its ``Declined``."""

    worker: type[Any]
    declined: type[Exception]


@functools.cache
def device_code() -> DeviceCode:
    """Import the agent's worker, and subclass it for the simulation.

    Imported here, not when this module loads: the server reaches the agent's code only in a
    simulation, as the CLI reaches the training cluster only in its commands (tests/unit/test_layout.py).
    """
    from client_agent.worker import Declined, Worker, _Model

    class SimWorker(Worker):
        """The agent's worker with the in-memory app, remembering the update it last trained."""

        def __init__(self, transport: LocalTransport, device_id: str, coordinator_key: str, app: App):
            super().__init__(transport, device_id, coordinator_key, device_id)  # type: ignore[arg-type]
            self.app = app
            self.trained: tuple[int, np.ndarray, int] | None = None  # round id, update, examples
            # Under device-level differential privacy: the noised vector it masked (before the masks).
            self.noised: np.ndarray | None = None

        def _app(self, spec: JobSpec) -> App:
            if spec.app_ref != BUILTIN:
                raise Declined(f"the simulation runs the built-in tabular app only, not {spec.app_ref}")
            self.used_apps.add(spec.app_ref)
            return self.app

        def _train(
            self, spec: JobSpec, app: App, job: JobContext, model: _Model, data: LocalData, task: Task
        ) -> tuple[np.ndarray, float, int]:
            new, loss, examples = super()._train(spec, app, job, model, data, task)
            self.trained = (task.round_id, new - model.vector, examples)
            self.noised = None
            return new, loss, examples

        def _noised(self, delta: np.ndarray, params: Any) -> np.ndarray:
            x = super()._noised(delta, params)
            self.noised = x.copy()  # masked in place next
            return x

    return DeviceCode(SimWorker, Declined)


@dataclass
class Outcome:
    """One device's answer to one stage: what the agent would post (or its reason to withdraw).

    ``kind``: ``configure`` (``body`` a ConfigureMessage), ``json`` (a dict for a SecAgg+ stage or
    a round's JSON input), ``binary`` (bytes: masked input or plain update) or ``withdraw`` (the
    reason). ``plain``: for a masked training input, the device's weight and clipped update.
    """

    device_id: str
    round_id: int
    stage: str
    kind: str
    body: Any
    plain: tuple[int, np.ndarray] | None = None


@dataclass(frozen=True)
class DeviceSeed:
    """What makes a device: its id, its Ed25519 private key (raw bytes) and its rows."""

    device_id: str
    key: bytes
    frame: pd.DataFrame


class DeviceShard:
    """The workers of some devices, and one stage's work for each of them."""

    def __init__(self, seeds: list[DeviceSeed], coordinator_key: str, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.code = device_code()
        self.shelf = ModelShelf()
        self.app = FrameApp({s.device_id: s.frame for s in seeds})
        self.workers = {
            s.device_id: self.code.worker(
                LocalTransport(Ed25519PrivateKey.from_private_bytes(s.key), self.shelf),
                s.device_id,
                coordinator_key,
                self.app,
            )
            for s in seeds
        }

    def work(
        self, items: list[tuple[str, Task]], blobs: Mapping[tuple[int, int], bytes] | None = None
    ) -> list[Outcome]:
        """Each device's answer to its task (the stage it is in), in order."""
        if blobs:
            self.shelf.update(blobs)
        return [self.answer(device_id, task) for device_id, task in items]

    def answer(self, device_id: str, task: Task) -> Outcome:
        """The message of ``task``'s stage, as ``Agent._compose`` makes it, or the reason to withdraw."""
        w = self.workers[device_id]
        rid, stage = task.round_id, task.stage
        try:
            if stage == "configure":
                return Outcome(device_id, rid, stage, "configure", w.configure(task))
            if stage == "advertise_keys":
                return Outcome(device_id, rid, stage, "json", w.advertise(task))
            if stage == "share_keys":
                return Outcome(device_id, rid, stage, "json", w.share_keys(task))
            if stage == "masked_input" and task.kind == "stats":
                return Outcome(device_id, rid, stage, "binary", w.masked_statistics(task))
            if stage == "masked_input":
                w.trained = None
                body = w.masked_input(task)
                return Outcome(device_id, rid, stage, "binary", body, self._plain(w, task))
            if stage == "unmask":
                return Outcome(device_id, rid, stage, "json", w.unmask(task))
            if task.kind == "stats":
                return Outcome(device_id, rid, stage, "json", w.statistics(task).model_dump())
            if task.kind == "evaluate":
                return Outcome(device_id, rid, stage, "json", w.evaluate(task).model_dump())
            return Outcome(device_id, rid, stage, "binary", w.train(task))
        except (self.code.declined, SecAggError) as err:
            # As the agent: the device sits the round out and says why.
            return Outcome(device_id, rid, stage, "withdraw", f"in stage {stage!r}: {err}")

    @staticmethod
    def _plain(w: Any, task: Task) -> tuple[int, np.ndarray] | None:
        """The weight and the clipped update that went into the masked input (as ``weighted_input``)."""
        if w.trained is None or w.trained[0] != task.round_id:
            return None
        if (task.secagg or {}).get("privacy"):
            # Device-level differential privacy: the noised_input vector itself (weight 1), whose sum the
            # coordinator must reconstruct exactly.
            return (1, w.noised) if w.noised is not None else None
        spec = JobSpec.model_validate(task.spec)
        params = (task.secagg or {})["params"]
        _, delta, examples = w.trained
        n = capped_weight(examples, min(int(params["weight_cap"]), spec.robustness.max_weight))
        if spec.privacy is not None:
            n = 1  # example-level differential privacy: every device weighs the same
        clip = float(params["clip"])
        return n, np.clip(delta, -clip, clip)


def new_device_key() -> tuple[Ed25519PrivateKey, bytes]:
    """A fresh identity key and its raw private bytes (a shard on another process rebuilds it)."""
    from cryptography.hazmat.primitives import serialization

    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return key, raw
