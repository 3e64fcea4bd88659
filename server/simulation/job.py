"""The driver of a whole simulated job: the real coordinator engine, the devices' real code, no HTTP.

The coordinator is ``coordinator.engine.Federation`` on SQLite in a temporary folder, as
``aicfl server start`` runs it, with a virtual clock. The driver plays the network: for each
stage of the running round it checks in every device of the cohort (``CheckIns.checkin``, the
route's own call), hands the tasks to the devices (``executors``), and posts each answer to the
engine method its route calls (``server/routers/device_api.py``). A device drawn to drop out
(``dropouts``) simply does not answer; once every other answer is in, the clock jumps past the
stage's deadline and the driver's tick (``RoundDriver.tick``) counts it dropped. Rounds open,
advance, finish and are abandoned by the engine's own rules; the job ends as the engine says.

For every secure training round of a FedAvg job the driver also checks the SecAgg+ sum: the new
version minus the old must equal the example-weighted mean of the clipped plaintext updates of
the devices whose masked inputs the coordinator summed, within one quantisation step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select

from coordinator import registry
from coordinator.engine import Federation
from coordinator.errors import CoordinatorError
from coordinator.models import Job, Participant, Round, RoundMessage
from coordinator.rounds import ACTIVE, stage_index, stages_of
from server.simulate import SimulationError, VirtualClock
from server.simulation.devices import Outcome
from server.simulation.dropouts import draw_dropouts, silent
from server.simulation.executors import Executor
from shared.jobspec import JobSpec
from shared.privacy.skellam import SkellamParams, decode_total
from shared.secagg.quantize import quantisation_bound
from shared.wire import CheckinRequest, ConfigureMessage, Task

log = logging.getLogger("aicfl.simulate")
CHECKIN_REQUEST = CheckinRequest(agent_version="simulated")
#: Ticks in a row without a running round before the driver gives up on a job that does not end.
STALL_LIMIT = 5
#: Devices per batch of work handed to the executor: the driver posts answers between batches.
CHUNK = 50
#: Strategies whose new version is the old plus the weighted mean update (the SecAgg+ check holds).
MEAN_STRATEGIES = ("fedavg", "fedprox")


@dataclass
class RoundCheck:
    """The SecAgg+ check of one training round."""

    round: int
    max_abs_error: float
    bound: float
    summed: int

    @property
    def exact(self) -> bool:
        return self.max_abs_error <= self.bound


@dataclass
class RunStats:
    """What the driver counted: messages posted, refused, withdrawals, and where its time went."""

    posted: int = 0
    refused: int = 0
    withdrawn: int = 0
    silent: int = 0
    deadlines: int = 0
    device_seconds: float = 0.0
    coordinator_seconds: float = 0.0
    checks: list[RoundCheck] = field(default_factory=list)


@dataclass
class _Current:
    round_id: int
    number: int
    kind: str
    secure: bool
    cohort: list[str]
    drops: dict[str, int]
    plain: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)


class JobDriver:
    """Plays one job to its end against ``fed``; see the module's docstring."""

    def __init__(
        self,
        fed: Federation,
        clock: VirtualClock,
        job_id: int,
        spec: JobSpec,
        executor: Executor,
        dropout: float,
        rng: np.random.Generator,
    ):
        self.fed, self.clock, self.job_id, self.spec = fed, clock, job_id, spec
        self.executor, self.dropout, self.rng = executor, dropout, rng
        self.stats = RunStats()
        self.current: _Current | None = None
        self.models: dict[tuple[int, int], bytes] = {}

    def _coord(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stats.coordinator_seconds += time.perf_counter() - t0

    def run(self) -> str:
        """Drive the job until the engine ends it; returns its status."""
        stalls = 0
        while True:
            self._coord(self.fed.tick)
            r = self._running()
            if r is None:
                self._close_round()
                with self.fed.read() as s:
                    job = s.get(Job, self.job_id)
                    assert job is not None
                    status = job.status
                if status != "running":
                    return status
                stalls += 1
                if stalls > STALL_LIMIT:
                    raise SimulationError(
                        f"job {self.job_id} opens no round: fewer than cohort.minimum"
                        f" ({self.spec.cohort.minimum}) devices are eligible"
                    )
                self.clock.advance(self.spec.cohort.selection_timeout + 1)
                continue
            stalls = 0
            self._stage(r)

    def _running(self) -> Round | None:
        with self.fed.read() as s:
            r = s.scalar(select(Round).where(Round.job_id == self.job_id, Round.status == "running"))
            if r is not None:
                s.expunge(r)
            return r

    def _stage(self, r: Round) -> None:
        if self.current is None or self.current.round_id != r.id:
            self._close_round()
            with self.fed.read() as s:
                cohort = list(s.scalars(select(Participant.device_id).where(Participant.round_id == r.id)))
            stages = stages_of(r.kind, r.secure)
            drops = draw_dropouts(cohort, stages, self.dropout, self.rng)
            self.current = _Current(r.id, r.number, r.kind, r.secure, cohort, drops)
        cur = self.current
        here = stage_index(r.kind, r.stage, r.secure)
        with self.fed.read() as s:
            active = list(
                s.scalars(
                    select(Participant.device_id).where(
                        Participant.round_id == r.id, Participant.status == ACTIVE
                    )
                )
            )
        chunk: list[tuple[str, Task]] = []
        for device in active:
            if silent(cur.drops, device, here):
                self.stats.silent += 1
                continue
            task = self._coord(self.fed.checkins.checkin, device, CHECKIN_REQUEST).task
            if task is not None and task.round_id == r.id and task.stage == r.stage:
                chunk.append((device, task))
            if len(chunk) >= CHUNK:
                self._submit(chunk)
                self._post_ready(wait=False)
                chunk = []
        if chunk:
            self._submit(chunk)
        self._post_ready(wait=True)
        self._wait_out(r)

    def _submit(self, items: list[tuple[str, Task]]) -> None:
        t0 = time.perf_counter()
        self.executor.submit(items, self._blobs(items))
        self.stats.device_seconds += time.perf_counter() - t0

    def _post_ready(self, wait: bool) -> None:
        """Post the answers the devices have ready (with ``wait``, every answer still to come)."""
        batches = self.executor.ready(wait)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.stats.device_seconds += time.perf_counter() - t0
            if batch is None:
                return
            for outcome in batch:
                self._post(outcome)

    def _blobs(self, items: list[tuple[str, Task]]) -> Mapping[tuple[int, int], bytes]:
        """The model bytes these devices will ask for, as the coordinator serves them (fetched once)."""
        out: dict[tuple[int, int], bytes] = {}
        for device, task in items:
            if task.model is None:
                continue
            key = (task.job_id, task.model.version)
            if key not in self.models:
                # Only the newest versions are asked for: keep two.
                self.models = {k: v for k, v in self.models.items() if k[1] >= key[1] - 1}
                self.models[key] = self._coord(self.fed.checkins.model_blob, device, *key)
            out[key] = self.models[key]
        return out

    def _post(self, o: Outcome) -> None:
        """Post one answer to the engine method its route calls; a refusal is the agent's 4xx."""
        dev = self.fed.devices
        try:
            if o.kind == "withdraw":
                self.stats.withdrawn += 1
                self._coord(dev.withdraw, o.device_id, o.round_id, str(o.body))
                return
            if o.kind == "configure":
                assert isinstance(o.body, ConfigureMessage)
                self._coord(dev.configure, o.device_id, o.round_id, o.body)
            elif o.stage == "masked_input":
                self._coord(dev.masked_input, o.device_id, o.round_id, o.body)
                if o.plain is not None and self.current is not None:
                    self.current.plain[o.device_id] = o.plain
            elif o.stage == "input" and o.kind == "binary":
                self._coord(dev.update, o.device_id, o.round_id, o.body)
            elif o.stage == "input":
                self._coord(dev.input_json, o.device_id, o.round_id, o.body)
            else:
                self._coord(dev.secure_json, o.device_id, o.round_id, o.stage, o.body)
            self.stats.posted += 1
        except CoordinatorError as err:
            # Stale (the round moved on: an unmask answer after every secret had its shares) or
            # refused: the agent logs it and goes on.
            self.stats.refused += 1
            log.debug("%s %s refused: %s", o.device_id, o.stage, err)

    def _wait_out(self, r: Round) -> None:
        """If the round still waits in this stage (someone is silent), let its deadline pass."""
        with self.fed.read() as s:
            now = s.get(Round, r.id)
            assert now is not None
            waiting = now.status == "running" and now.stage == r.stage
            deadline = now.stage_deadline
        if waiting:
            self.stats.deadlines += 1
            self.clock.advance(max(0.0, deadline - self.clock()) + 1.0)

    def _close_round(self) -> None:
        """The SecAgg+ check of the round just ended, if it was a completed secure training round."""
        cur, self.current = self.current, None
        if (
            cur is None
            or cur.kind != "train"
            or not cur.secure
            or self.spec.strategy.name not in MEAN_STRATEGIES
        ):
            return
        with self.fed.read() as s:
            r = s.get(Round, cur.round_id)
            assert r is not None
            if r.status != "completed" or r.model_version_out is None or r.model_version_in is None:
                return
            summed = set(
                s.scalars(
                    select(Participant.device_id).where(
                        Participant.round_id == r.id,
                        Participant.status == ACTIVE,
                        Participant.stage_done.in_(("masked_input", "unmask")),
                    )
                )
            )
            v_in = self.fed.vector(self.job_id, registry.get_version(s, self.job_id, r.model_version_in))[1]
            v_out = self.fed.vector(self.job_id, registry.get_version(s, self.job_id, r.model_version_out))[1]
        if self.spec.privacy is not None and self.spec.privacy.level == "device":
            with self.fed.read() as s:
                r = s.get(Round, cur.round_id)
                assert r is not None
                sent = set(
                    s.scalars(
                        select(RoundMessage.device_id).where(
                            RoundMessage.round_id == r.id, RoundMessage.stage == "masked_input"
                        )
                    )
                )
                params = SkellamParams(**(r.secagg or {})["privacy"])
            self._check_noised(cur, sent, params, v_in, v_out)
            return
        missing = summed - set(cur.plain)
        if missing or not summed:
            raise SimulationError(f"round {cur.number}: no plaintext update kept for {sorted(missing)[:3]}")
        weights = np.array([cur.plain[d][0] for d in sorted(summed)], dtype=np.float64)
        total = np.zeros(v_in.size, dtype=np.float64)
        for w, d in zip(weights, sorted(summed), strict=True):
            total += w * cur.plain[d][1].astype(np.float64)
        plain = total / weights.sum()
        err = float(np.max(np.abs((v_out.astype(np.float64) - v_in.astype(np.float64)) - plain)))
        bound = quantisation_bound(self.spec.secagg.clip, self.spec.secagg.bits) + 1e-6
        self.stats.checks.append(RoundCheck(cur.number, err, bound, len(summed)))

    def _check_noised(
        self, cur: _Current, sent: set[str], params: SkellamParams, v_in: np.ndarray, v_out: np.ndarray
    ) -> None:
        """A device-level DP round: the new version minus the old must be exactly the decoded sum of the
        noised vectors of every device whose masked input was summed (dropped later or not), over their
        count; the noise is in the sum, so the check is exact, not within a quantisation step."""
        missing = sent - set(cur.plain)
        if missing or not sent:
            raise SimulationError(f"round {cur.number}: no noised vector kept for {sorted(missing)[:3]}")
        total = np.zeros(params.coordinates, dtype=np.uint64)
        for d in sorted(sent):
            total += cur.plain[d][1]  # modulo 2**64, as the masked sum
        noised = decode_total(total, params)
        expected = v_in + (noised.total / noised.contributors).astype(np.float32)
        err = float(np.max(np.abs(v_out.astype(np.float64) - expected.astype(np.float64))))
        self.stats.checks.append(RoundCheck(cur.number, err, 0.0, len(sent)))

    def close(self) -> None:
        with contextlib.suppress(SimulationError):
            self._close_round()
