"""Where the devices' work runs: in this process, in worker processes of this machine, or on Ray
actors, each of the last two holding a shard of devices.

Both take one stage's ``(device, task)`` pairs and return the devices' messages
(``devices.Outcome``); the driver alone speaks to the coordinator. On Ray (``--ray-address``: an
existing cluster's address, ``auto`` for the one this machine belongs to, ``local`` for a new one
on this machine), each actor builds its devices' workers once and keeps them, as Flower's
simulation keeps its ClientApps in actors; only tasks, model bytes and messages travel. With
``--processes N`` the same shards live in N worker processes of this machine (no Ray: nothing to
start but the processes), so the devices' work uses the cores the driver leaves.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as first_done
from typing import Any, Protocol

import numpy as np

from server.simulate import SimulationError
from server.simulation.devices import DeviceSeed, DeviceShard, Outcome
from shared.wire import Task


class Executor(Protocol):
    """Runs the devices' work of a stage: ``submit`` some devices' tasks (with the model bytes they
    need), then ``ready`` hands back their answers in batches as they finish; ``name`` says where."""

    name: str

    def submit(self, items: list[tuple[str, Task]], blobs: Mapping[tuple[int, int], bytes]) -> None: ...

    def ready(self, wait: bool) -> Iterator[list[Outcome]]: ...

    def close(self) -> None: ...


class InProcess:
    """Every device in one shard, in this process: ``submit`` does the work at once."""

    name = "in-process"

    def __init__(self, seeds: Sequence[DeviceSeed], coordinator_key: str):
        self.shard = DeviceShard(list(seeds), coordinator_key)
        self.done: list[list[Outcome]] = []

    def submit(self, items: list[tuple[str, Task]], blobs: Mapping[tuple[int, int], bytes]) -> None:
        self.done.append(self.shard.work(items, blobs))

    def ready(self, wait: bool) -> Iterator[list[Outcome]]:
        while self.done:
            yield self.done.pop(0)

    def close(self) -> None:
        return None


class Dealt:
    """Devices dealt over ``n`` shards (a process or an actor each): who is where, and which model
    bytes each shard already has, so that a stage's tasks go to their devices' shards with only the
    bytes a shard lacks."""

    def __init__(self, seeds: Sequence[DeviceSeed], n: int):
        self.chunks = [[seeds[i] for i in c] for c in np.array_split(np.arange(len(seeds)), n)]
        self.where = {seed.device_id: a for a, chunk in enumerate(self.chunks) for seed in chunk}
        self.shipped: list[set[tuple[int, int]]] = [set() for _ in self.chunks]

    def deal(
        self, items: list[tuple[str, Task]], blobs: Mapping[tuple[int, int], bytes]
    ) -> Iterator[tuple[int, list[tuple[str, Task]], dict[tuple[int, int], bytes]]]:
        """Per shard: its index, its devices' tasks, and the model bytes it has not had yet."""
        groups: dict[int, list[tuple[str, Task]]] = {}
        for item in items:
            groups.setdefault(self.where[item[0]], []).append(item)
        for a, group in groups.items():
            new = {k: v for k, v in blobs.items() if k not in self.shipped[a]}
            self.shipped[a].update(new)
            yield a, group, new


_SHARD: DeviceShard | None = None  # in a worker process of LocalProcesses: its devices


def _start_shard(seeds: list[DeviceSeed], coordinator_key: str) -> None:
    global _SHARD
    _SHARD = DeviceShard(seeds, coordinator_key)


def _shard_work(items: list[tuple[str, Task]], blobs: Mapping[tuple[int, int], bytes]) -> list[Outcome]:
    assert _SHARD is not None, "the worker process has no shard"
    return _SHARD.work(items, blobs)


class LocalProcesses:
    """The devices dealt over ``processes`` worker processes of this machine, a shard each.

    As on Ray, a device's worker lives in one process for the whole job (its SecAgg+ secrets stay
    there between stages), each process gets a model's bytes once, and the driver posts the answers
    that are ready while the processes work. Processes are spawned, not forked: the driver holds
    threads and an open database.
    """

    def __init__(self, seeds: Sequence[DeviceSeed], coordinator_key: str, processes: int):
        n = max(1, min(len(seeds), processes))
        spawn = multiprocessing.get_context("spawn")
        self.dealt = Dealt(seeds, n)
        self.pools = [
            ProcessPoolExecutor(
                1, mp_context=spawn, initializer=_start_shard, initargs=(chunk, coordinator_key)
            )
            for chunk in self.dealt.chunks
        ]
        self.pending: list[Future[list[Outcome]]] = []
        self.name = f"{n} local processes"

    def submit(self, items: list[tuple[str, Task]], blobs: Mapping[tuple[int, int], bytes]) -> None:
        for a, group, new in self.dealt.deal(items, blobs):
            self.pending.append(self.pools[a].submit(_shard_work, group, new))

    def ready(self, wait: bool) -> Iterator[list[Outcome]]:
        while self.pending:
            done, _ = first_done(self.pending, timeout=None if wait else 0, return_when=FIRST_COMPLETED)
            if not done:
                return
            # In the order they were handed out, as far as they are done: answers keep their order.
            first = next(f for f in self.pending if f in done)
            self.pending.remove(first)
            yield first.result()

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)


class RayShards:
    """The devices dealt over ``actors`` Ray actors (one CPU each; default: the cluster's CPUs).

    A device's worker lives in one actor for the whole job (it holds its SecAgg+ secrets between
    stages), so its tasks go there. The driver keeps submitting while the actors work and posts
    the answers that are ready in between: the coordinator's work overlaps the devices'.
    """

    def __init__(
        self, seeds: Sequence[DeviceSeed], coordinator_key: str, address: str, actors: int | None = None
    ):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        try:
            import ray
        except ImportError:
            raise SimulationError("--ray-address needs Ray: pip install 'ray[default]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address == "local":
                init["num_cpus"] = actors or os.cpu_count() or 1
            try:
                ray.init(address=address, **init)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise SimulationError(f"--ray-address {address}: {err}") from None
        n = max(1, min(len(seeds), actors or int(ray.available_resources().get("CPU", 1)) or 1))
        remote: Any = ray.remote(num_cpus=1)(DeviceShard)
        self.dealt = Dealt(seeds, n)
        self.actors: list[Any] = [remote.remote(chunk, coordinator_key) for chunk in self.dealt.chunks]
        self.pending: list[Any] = []
        self.name = f"ray ({n} actors)"

    def submit(self, items: list[tuple[str, Task]], blobs: Mapping[tuple[int, int], bytes]) -> None:
        for a, group, new in self.dealt.deal(items, blobs):
            self.pending.append(self.actors[a].work.remote(group, new))

    def ready(self, wait: bool) -> Iterator[list[Outcome]]:
        while self.pending:
            done, self.pending = self.ray.wait(self.pending, num_returns=1, timeout=None if wait else 0)
            if not done:
                return
            yield self.ray.get(done[0])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()
