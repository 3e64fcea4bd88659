"""SecAgg+ rounds through the federation engine, devices driven in-process (no HTTP).

The devices here run the same protocol code as the agent (``shared.secagg``)
against ``coordinator.engine.Federation``, the way ``server/simulate.py`` does,
with a virtual clock to let stage deadlines pass. Every update is known, so
each completed round is checked against the plain example-weighted mean of
the updates that reached the sum: exact up to one quantisation step. What is
proved here: dropouts at every stage (exact, or abandoned for want of the
threshold or the minimum, never a wrong model), abandonment below the
threshold, exclusion of every kind of bad message, that the coordinator
never stores a device's plaintext update, and that a restarted coordinator
finishes a round from what it stored (or abandons it cleanly).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, inspect, select, text

from coordinator import auth, registry
from coordinator.blobs import LocalBlobStore
from coordinator.engine import EngineSettings, Federation
from coordinator.errors import Conflict, CoordinatorError, Invalid
from coordinator.models import Event, Job, ModelVersion, Participant, Round, RoundMessage
from coordinator.store import make_engine, migrate, session_factory
from server.simulate import VirtualClock, simulate
from shared import codec
from shared.jobspec import JobSpec
from shared.secagg.params import SecAggParams
from shared.secagg.primitives import SecAggError
from shared.secagg.protocol import SecAggClient, advertise_message, weighted_input
from shared.secagg.quantize import quantisation_bound
from shared.signing import b64e, load_public_key, public_key_bytes
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from shared.wire import CheckinRequest, ConfigureMessage, Task
from shared.zoo import architecture, build_model, flatten_parameters

SCHEMA = {
    "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "numeric"}],
    "target": "y",
    "task": "binary",
    "positive": "1",
}
STAGES = ("configure", "advertise_keys", "share_keys", "masked_input", "unmask")
STAGE_TIMEOUT = 60.0
CLIP = 0.5
BITS = 16
BOUND = quantisation_bound(CLIP, BITS) + 1e-6  # plus float32 rounding of the stored model
# Why a round may be abandoned when devices drop: a reconstruction lacks t shares, or too few devices remain.
ABANDON_REASON = re.compile(r"\bt=\d+|threshold|minimum")


# -- a federation with devices driven in-process -------------------------------------------------


@dataclass
class Dev:
    key: Ed25519PrivateKey
    id: str
    client: SecAggClient | None = None
    update: np.ndarray | None = None  # float32, as trained
    examples: int = 0
    x: np.ndarray | None = None  # weighted_input: the quantised, weighted update (uint64), before masking
    sat_out: str | None = None  # the SecAggError for which the device sat the round out (as the agent does)


class Rig:
    """A job on a fresh database with its version 0, and its first training round open."""

    def __init__(
        self,
        url: str,
        folder: Path,
        n: int,
        *,
        secure: bool = True,
        k: int | None = None,
        t: int | None = None,
        hidden: tuple[int, ...] = (4,),
        minimum: int = 2,
        seed: int = 0,
        robustness: dict[str, Any] | None = None,
    ):
        self.engine = make_engine(url)
        migrate(self.engine)
        self.clock = VirtualClock()
        self.blob_dir = folder / "blobs"
        self.fed = Federation(
            session_factory(self.engine),
            LocalBlobStore(self.blob_dir),
            Ed25519PrivateKey.generate(),
            EngineSettings(eligibility_window=3600),
            clock=self.clock,
        )
        self.rng = np.random.default_rng(seed)
        with self.fed.write() as s:
            tokens = auth.create_enrollment_tokens(s, n, 3600, "test")
        self.devs: list[Dev] = []
        for tok in tokens:
            key = Ed25519PrivateKey.generate()
            with self.fed.write() as s:
                self.devs.append(
                    Dev(key, auth.enroll_device(s, tok, b64e(public_key_bytes(key)), "t", "t").id)
                )
        self.by_id = {d.id: d for d in self.devs}
        spec = {
            "name": "secure-engine",
            "rounds": 1,
            "seed": 1,
            "data": SCHEMA,
            "model": {"zoo": "mlp", "hidden": list(hidden)},
            "cohort": {
                "target": n,
                "minimum": minimum,
                "stage_timeout": STAGE_TIMEOUT,
                "selection_timeout": 1,
            },
            "evaluation": {"federated": False},
            "secure": secure,
            "secagg": {"clip": CLIP, "bits": BITS, "k": k, "t": t},
            "robustness": robustness or {},
        }
        self.job_id = self.fed.jobs.submit(spec, "test").id
        self._seed_version_zero()
        self.fed.tick()  # opens the training round
        with self.fed.read() as s:
            r = s.scalars(select(Round).where(Round.job_id == self.job_id, Round.kind == "train")).one()
            self.round_id = r.id
            assert r.secure is secure
        self.v0 = self.version(0)
        self.n_params = self.v0.size
        self.in_sum: list[str] = []  # devices whose masked input (or plain update) was accepted
        self.replies: dict[tuple[str, str], Exception | None] = {}  # (device, stage) -> what a replay got

    def close(self) -> None:
        self.engine.dispose()

    def _seed_version_zero(self) -> None:
        """What the statistics round leaves (preprocessing and version 0); that round has its own tests."""
        frame = pd.DataFrame(
            {
                "a": self.rng.normal(size=32),
                "b": self.rng.normal(size=32),
                "y": self.rng.integers(0, 2, 32).astype(str),
            }
        )
        with self.fed.write() as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            spec = JobSpec.model_validate(job.spec)
            merged = merge_statistics([local_statistics(frame, spec.data)])
            pre = Preprocessor.from_statistics(merged, spec.data)
            job.preprocess = pre.to_dict()
            arch = architecture(spec.model, pre.input_dim, pre.output_dim)
            registry.register_version(
                s,
                self.fed.blobs,
                self.fed.key,
                job_id=job.id,
                version=0,
                vector=flatten_parameters(build_model(arch, seed=spec.seed)),
                arch=arch,
                preprocess=job.preprocess,
                parent=None,
                round_number=None,
                provenance={"source": "initialised", "seed": spec.seed},
            )
            job.current_version = 0
        for d in self.devs:
            assert self.task(d) is None  # checked in: eligible for the first round

    # -- reading state --------------------------------------------------------------------------

    def task(self, d: Dev) -> Task | None:
        return self.fed.checkins.checkin(d.id, CheckinRequest()).task

    def state(self) -> tuple[str, str]:
        with self.fed.read() as s:
            r = s.get(Round, self.round_id)
            assert r is not None
            return r.status, r.stage

    def round_row(self) -> dict[str, Any]:
        with self.fed.read() as s:
            r = s.get(Round, self.round_id)
            assert r is not None
            return {
                "status": r.status,
                "reason": r.reason,
                "stage": r.stage,
                "metrics": dict(r.metrics or {}),
            }

    def participant(self, device: str) -> tuple[str, str | None]:
        with self.fed.read() as s:
            p = s.scalars(
                select(Participant).where(
                    Participant.round_id == self.round_id, Participant.device_id == device
                )
            ).one()
            return p.status, p.reason

    def messages(self, device: str, stage: str) -> int:
        with self.fed.read() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(RoundMessage)
                    .where(
                        RoundMessage.round_id == self.round_id,
                        RoundMessage.device_id == device,
                        RoundMessage.stage == stage,
                    )
                )
                or 0
            )

    @property
    def one_process(self) -> bool:
        """SQLite: one coordinator process keeps the running sum and stores it once, at the end of the
        masked-input stage. PostgreSQL (replicas may share a round): every masked vector is stored."""
        return self.engine.dialect.name == "sqlite"

    def masked_blobs(self) -> list[str]:
        """What the blob store holds of the round's masked inputs: each vector, or their stored sum."""
        with self.fed.read() as s:
            r = s.get(Round, self.round_id)
            assert r is not None
            stored_sum = (r.secagg or {}).get("masked_sum")
            return (
                [stored_sum["blob"]]
                if stored_sum
                else [
                    sha
                    for sha in s.scalars(
                        select(RoundMessage.blob_sha256).where(
                            RoundMessage.round_id == self.round_id, RoundMessage.stage == "masked_input"
                        )
                    )
                    if sha
                ]
            )

    def stored_contributors(self) -> list[str]:
        """Whose masked inputs the stored vectors or the stored sum hold."""
        with self.fed.read() as s:
            r = s.get(Round, self.round_id)
            assert r is not None
            stored_sum = (r.secagg or {}).get("masked_sum")
            if stored_sum:
                return sorted(stored_sum["contributors"])
            return sorted(
                s.scalars(
                    select(RoundMessage.device_id).where(
                        RoundMessage.round_id == self.round_id,
                        RoundMessage.stage == "masked_input",
                        RoundMessage.blob_sha256.is_not(None),
                    )
                )
            )

    def version_count(self) -> int:
        with self.fed.read() as s:
            return int(
                s.scalar(
                    select(func.count()).select_from(ModelVersion).where(ModelVersion.job_id == self.job_id)
                )
                or 0
            )

    def version(self, number: int) -> np.ndarray:
        with self.fed.read() as s:
            row = registry.get_version(s, self.job_id, number)
            return registry.load_vector(self.fed.blobs, row)[1]

    # -- driving the devices --------------------------------------------------------------------

    def expire(self, stage: str) -> None:
        """If the round still waits in ``stage`` (someone did not answer), let its deadline pass."""
        status, current = self.state()
        if status == "running" and current == stage:
            self.clock.advance(STAGE_TIMEOUT + 1)
            self.fed.tick()

    def honest(self, stage: str, d: Dev, tk: Task) -> Any:
        """What an honest device sends in ``stage`` (SecAggError when it must refuse, as the agent does)."""
        info = tk.secagg or {}
        if stage == "configure":
            return ConfigureMessage(accepted=True, rows=64)
        if stage == "advertise_keys":
            d.client = SecAggClient(
                d.id, base64.b64decode(info["context"]), SecAggParams(**info["params"]), d.key.sign
            )
            return d.client.advertise()
        assert d.client is not None
        if stage == "share_keys":
            ids = info["identity_keys"]

            def verify(who: str, message: bytes, signature: bytes) -> bool:
                try:
                    load_public_key(ids[who]).verify(signature, message)
                except Exception:  # noqa: BLE001 - any failure is a refused signature
                    return False
                return True

            return {"ciphertexts": d.client.share_keys(info["neighbours"], verify)}
        if stage == "masked_input":
            d.update = self.rng.normal(0, CLIP / 2, self.n_params).astype(np.float32)  # some values clip
            d.examples = int(self.rng.integers(16, 256))
            qrng = np.random.default_rng(int(self.rng.integers(2**62)))
            d.x = weighted_input(d.update, d.examples, d.client.params, qrng)
            y = d.client.masked_input(d.x, info["ciphertexts"])
            return codec.encode(masked_header(tk.round_id), y)
        me = {d.id}
        return {"shares": d.client.unmask(set(info["survivors"]) - me, set(info["dropped"]) - me)}

    def send(self, stage: str, d: Dev, message: Any) -> None:
        if stage == "configure":
            self.fed.devices.configure(d.id, self.round_id, message)
        elif stage == "masked_input":
            self.fed.devices.masked_input(d.id, self.round_id, message)
        else:
            self.fed.devices.secure_json(d.id, self.round_id, stage, message)

    def stage(
        self,
        name: str,
        *,
        skip: set[str] | frozenset[str] = frozenset(),
        tamper: Mapping[str, Callable[[Dev, Task, Any], Any]] | None = None,
        replay: set[str] | frozenset[str] = frozenset(),
        expire: bool = True,
    ) -> dict[str, CoordinatorError]:
        """Every device with a task in stage ``name`` sends its message; returns the coordinator's refusals.

        ``skip``: devices that send nothing (dropped); ``tamper``: per device, turns the honest message into
        the one sent; ``replay``: devices that send the same message a second time.
        """
        refused: dict[str, CoordinatorError] = {}
        for d in self.devs:
            if d.id in skip or d.sat_out:
                continue
            tk = self.task(d)
            if tk is None or tk.stage != name or tk.round_id != self.round_id:
                continue
            try:
                message = self.honest(name, d, tk)
            except SecAggError as err:
                d.sat_out = str(err)
                continue
            if tamper and d.id in tamper:
                message = tamper[d.id](d, tk, message)
            try:
                self.send(name, d, message)
            except (Invalid, Conflict) as err:
                refused[d.id] = err
                continue
            if name == "masked_input":
                self.in_sum.append(d.id)
            if d.id in replay:
                try:
                    self.send(name, d, message)
                except CoordinatorError as err:
                    self.replies[(d.id, name)] = err
                else:
                    self.replies[(d.id, name)] = None
        if expire:
            self.expire(name)
        return refused

    def run(self, last: Mapping[str, str] | None = None) -> None:
        """All stages; ``last`` maps a device to the last stage it answers (it drops after that one)."""
        last = last or {}
        for name in STAGES:
            skip = {d for d, stop in last.items() if STAGES.index(name) > STAGES.index(stop)}
            self.stage(name, skip=skip)

    # -- checking the result --------------------------------------------------------------------

    def max_error(self) -> float:
        devs = [self.by_id[i] for i in self.in_sum]
        weights = np.array([d.examples for d in devs], dtype=np.float64)
        updates = np.stack([np.clip(d.update, -CLIP, CLIP).astype(np.float64) for d in devs])  # type: ignore[arg-type]
        plain = (weights[:, None] * updates).sum(axis=0) / weights.sum()
        delta = self.version(1).astype(np.float64) - self.v0.astype(np.float64)
        return float(np.max(np.abs(delta - plain)))

    def assert_exact(self) -> None:
        row = self.round_row()
        assert row["status"] == "completed", row["reason"]
        assert self.version_count() == 2
        assert row["metrics"]["examples"] == sum(self.by_id[i].examples for i in self.in_sum)
        err = self.max_error()
        assert err <= BOUND, f"aggregate off by {err}, more than one quantisation step ({BOUND})"

    def assert_abandoned(self, pattern: str | re.Pattern[str]) -> str:
        row = self.round_row()
        assert row["status"] == "abandoned", row
        assert row["reason"] and re.search(pattern, row["reason"]), row["reason"]
        assert self.version_count() == 1  # no new ModelVersion row
        with self.fed.read() as s:
            job = s.get(Job, self.job_id)
            assert job is not None and job.current_version == 0 and job.rounds_completed == 0
        return str(row["reason"])


def masked_header(round_id: int) -> dict[str, Any]:
    return {
        "kind": "masked_input",
        "round_id": round_id,
        "train_loss": 0.0,
        "metrics": {},
        "holdout_examples": 0,
    }


@pytest.fixture
def rig(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """Builds rigs on the test's database (SQLite and PostgreSQL); disposes of their engines."""
    made: list[Rig] = []

    def make(n: int, **kw: Any) -> Rig:
        made.append(Rig(database_url, tmp_path / f"rig{len(made)}", n, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def excluded_for(r: Rig, device: str, pattern: str) -> None:
    status, reason = r.participant(device)
    assert status == "excluded", (status, reason)
    assert reason and re.search(pattern, reason), reason


# -- 1. dropouts after each stage ----------------------------------------------------------------


@pytest.mark.parametrize("drop_after", ["advertise_keys", "share_keys", "masked_input"])
@pytest.mark.parametrize(("devices", "dropped"), [(5, 1), (8, 1), (8, 2), (13, 2)])
def test_simulated_round_is_exact_with_dropouts_after_each_stage(
    devices: int, dropped: int, drop_after: str
) -> None:
    out = simulate(
        devices=devices, params=200, dropout=dropped / devices, drop_after=drop_after, seed=devices
    )
    assert out["dropped"] == dropped
    assert out["status"] == "completed", out.get("reason")
    assert out["exact"] is True
    assert out["max_abs_error"] <= out["quantisation_bound"]
    # A device dropped after its masked input is in the sum (its masks are removed with its neighbours' shares).
    assert out["participants"] == (devices if drop_after == "masked_input" else devices - dropped)


@pytest.mark.parametrize("drop_after", ["advertise_keys", "share_keys", "masked_input"])
def test_simulate_reports_abandoned_round_when_dropouts_leave_fewer_than_t_shares(drop_after: str) -> None:
    # 5 devices: k = 4 (complete graph), t = 3; with 2 gone, every survivor keeps only 2 neighbours.
    out = simulate(devices=5, params=200, dropout=0.4, drop_after=drop_after)
    assert out["status"] == "abandoned"
    assert out["exact"] is False
    assert ABANDON_REASON.search(out["reason"] or ""), out["reason"]


@settings(
    max_examples=14,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data(), n=st.integers(4, 12), drop_after=st.sampled_from(STAGES[:-1]))
def test_dropout_patterns_give_exact_sum_or_abandonment_never_a_wrong_model(
    data: st.DataObject, n: int, drop_after: str
) -> None:
    dropped = data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1), label="dropped")
    with tempfile.TemporaryDirectory(prefix="aicfl-secure-") as tmp:
        r = Rig(f"sqlite:///{Path(tmp) / 'c.db'}", Path(tmp), n, seed=n)
        try:
            r.run({r.devs[i].id: drop_after for i in dropped})
            row = r.round_row()
            if row["status"] == "completed":
                r.assert_exact()
            else:
                r.assert_abandoned(ABANDON_REASON)
        finally:
            r.close()


# -- 2. dropout during the unmask stage ----------------------------------------------------------


def test_device_silent_in_unmask_stage_round_completes_exactly_without_waiting(
    rig: Callable[..., Rig],
) -> None:
    r = rig(8)  # k = 7, t = 4
    silent = r.devs[3].id
    for name in STAGES[:-1]:
        r.stage(name)
    r.stage("unmask", skip={silent}, expire=False)
    # Every secret already has t shares, so the coordinator need not wait for the silent device.
    assert r.state()[0] == "completed"
    # Its masked input is in the sum: its self mask goes with its neighbours' shares.
    assert silent in r.in_sum
    r.assert_exact()
    assert r.round_row()["metrics"]["secure"] is True


def test_unmask_stage_waits_while_some_secret_lacks_t_shares(rig: Callable[..., Rig]) -> None:
    r = rig(8)  # k = 7, t = 4
    for name in STAGES[:-1]:
        r.stage(name)
    answering = {d.id for d in r.devs[:3]}  # 3 answers: every secret has at most 3 < t shares
    r.stage("unmask", skip={d.id for d in r.devs} - answering, expire=False)
    assert r.state() == ("running", "unmask")
    r.clock.advance(STAGE_TIMEOUT + 1)
    r.fed.tick()
    assert r.state()[0] == "abandoned"


def test_unmask_dropouts_with_a_device_dropped_after_sharing_still_exact(rig: Callable[..., Rig]) -> None:
    r = rig(8)  # k = 7, t = 4: each survivor keeps 7 - 1 - 2 = 4 answering neighbours
    gone, quiet = r.devs[0].id, {r.devs[1].id, r.devs[2].id}
    r.run({gone: "share_keys", **{q: "masked_input" for q in quiet}})
    assert gone not in r.in_sum and quiet <= set(r.in_sum)
    r.assert_exact()


# -- 3. below the threshold ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["two_drop_after_share_keys", "one_drops_two_silent_in_unmask"])
def test_below_threshold_round_abandoned_model_unchanged_masked_blobs_deleted(
    rig: Callable[..., Rig], where: str
) -> None:
    r = rig(5)  # k = 4, t = 3
    ids = [d.id for d in r.devs]
    if where == "two_drop_after_share_keys":
        last = {ids[0]: "share_keys", ids[1]: "share_keys"}
    else:
        last = {ids[0]: "share_keys", ids[1]: "masked_input", ids[2]: "masked_input"}
    for name in STAGES[:-1]:
        r.stage(name, skip={d for d, stop in last.items() if STAGES.index(name) > STAGES.index(stop)})
    blobs = r.masked_blobs()
    assert len(blobs) == (1 if r.one_process else len(r.in_sum)) and len(r.in_sum) >= 2
    assert all(r.fed.blobs.exists(b) for b in blobs) and r.stored_contributors() == sorted(r.in_sum)
    r.stage("unmask", skip={d for d, stop in last.items() if stop != "unmask"})
    reason = r.assert_abandoned(r"t=3")
    assert "cannot be unmasked" in reason
    assert not any(r.fed.blobs.exists(b) for b in blobs), "masked vectors of an abandoned round must go"
    with r.fed.read() as s:
        events = [e.detail for e in s.scalars(select(Event).where(Event.action == "round.abandon"))]
    assert any(e.get("reason") == reason for e in events)


# -- 3b. a coordinator restarted mid-round -------------------------------------------------------


def test_restarted_coordinator_finishes_the_round_from_what_it_stored(rig: Callable[..., Rig]) -> None:
    """Restarted in the unmask stage (its running sum lost): the stored sum, or the stored vectors, finish
    the round exactly."""
    r = rig(6)
    for name in STAGES[:-1]:
        r.stage(name)
    assert r.stored_contributors() == sorted(r.in_sum) and len(r.in_sum) == 6
    r.fed.sums._acc.clear()  # the running sum is lost, as in a restart
    r.stage("unmask")
    r.assert_exact()
    assert r.round_row()["metrics"]["aggregation"]["from_store"] is True
    assert not any(r.fed.blobs.exists(b) for b in r.masked_blobs()), "stored masked data goes with the round"


def test_coordinator_restarted_during_masked_input_stage_abandons_cleanly_or_finishes(
    rig: Callable[..., Rig],
) -> None:
    """Restarted while masked inputs arrive: one process (SQLite) has lost the inputs it had added, which
    the devices do not send twice, so the round is abandoned at the end of the stage and the model stays;
    with every vector stored (PostgreSQL) the round completes exactly."""
    r = rig(6)
    for name in STAGES[:3]:
        r.stage(name)
    first, rest = set(d.id for d in r.devs[:2]), set(d.id for d in r.devs[2:])
    r.stage("masked_input", skip=rest, expire=False)
    r.fed.sums._acc.clear()  # the running sum of the first two is lost, as in a restart
    r.stage("masked_input", skip=first)
    if r.one_process:
        reason = r.assert_abandoned(r"restarted during the masked-input stage: 2 of the 6 masked inputs")
        assert reason and not r.masked_blobs()
        return
    r.stage("unmask")
    r.assert_exact()


# -- 4. tampering and malformed messages ---------------------------------------------------------


def _resign(key: Ed25519PrivateKey, context: bytes, device: str, c_pk: bytes, s_pk: bytes) -> dict[str, str]:
    return {
        "c_pk": b64e(c_pk),
        "s_pk": b64e(s_pk),
        "signature": b64e(key.sign(advertise_message(context, device, c_pk, s_pk))),
    }


def _context(tk: Task) -> bytes:
    return base64.b64decode((tk.secagg or {})["context"])


@pytest.mark.parametrize("how", ["another_key", "another_round_context"])
def test_advertise_with_bad_signature_excludes_sender_round_exact(rig: Callable[..., Rig], how: str) -> None:
    r = rig(6)  # k = 5, t = 3
    bad = r.devs[2]
    stranger = Ed25519PrivateKey.generate()

    def forge(d: Dev, tk: Task, msg: dict[str, str]) -> dict[str, str]:
        assert d.client is not None
        if how == "another_key":
            return _resign(stranger, _context(tk), d.id, d.client.c_pk, d.client.s_pk)
        return _resign(d.key, b"aicfl/v1/job/1/round/0/0000", d.id, d.client.c_pk, d.client.s_pk)

    r.stage("configure")
    refused = r.stage("advertise_keys", tamper={bad.id: forge})
    assert set(refused) == {bad.id} and isinstance(refused[bad.id], Invalid)
    excluded_for(r, bad.id, r"signature does not verify")
    assert r.messages(bad.id, "advertise_keys") == 0
    for name in STAGES[2:]:
        r.stage(name)
    assert bad.id not in r.in_sum
    r.assert_exact()


@pytest.mark.parametrize("copied", ["both_keys", "s_pk_only"])
def test_advertise_reusing_another_devices_public_key_excludes_sender(
    rig: Callable[..., Rig], copied: str
) -> None:
    r = rig(6)
    victim, thief = r.devs[0], r.devs[4]  # the victim advertises first

    def copy(d: Dev, tk: Task, msg: dict[str, str]) -> dict[str, str]:
        assert victim.client is not None and d.client is not None
        c_pk = victim.client.c_pk if copied == "both_keys" else d.client.c_pk
        return _resign(d.key, _context(tk), d.id, c_pk, victim.client.s_pk)  # validly signed by the thief

    r.stage("configure")
    refused = r.stage("advertise_keys", tamper={thief.id: copy})
    assert set(refused) == {thief.id}
    excluded_for(r, thief.id, r"same public key")
    assert r.participant(victim.id)[0] == "active"
    for name in STAGES[2:]:
        r.stage(name)
    assert thief.id not in r.in_sum and victim.id in r.in_sum
    r.assert_exact()


@pytest.mark.parametrize(
    "how", ["missing_neighbour", "non_neighbour_instead", "extra_non_neighbour", "itself"]
)
def test_share_keys_to_wrong_set_of_neighbours_excludes_sender(rig: Callable[..., Rig], how: str) -> None:
    r = rig(8, k=4, t=3)  # not a complete graph: every device has 3 non-neighbours
    bad = r.devs[5]

    def readdress(d: Dev, tk: Task, msg: dict[str, Any]) -> dict[str, Any]:
        cts = dict(msg["ciphertexts"])
        mine = sorted(cts)
        stranger = next(x.id for x in r.devs if x.id not in cts and x.id != d.id)
        if how == "missing_neighbour":
            del cts[mine[0]]
        elif how == "non_neighbour_instead":
            cts[stranger] = cts.pop(mine[0])
        elif how == "extra_non_neighbour":
            cts[stranger] = cts[mine[0]]
        else:
            cts[d.id] = cts[mine[0]]
        return {"ciphertexts": cts}

    r.stage("configure")
    r.stage("advertise_keys")
    refused = r.stage("share_keys", tamper={bad.id: readdress})
    assert set(refused) == {bad.id}
    excluded_for(r, bad.id, r"share_keys message refused: .*address exactly")
    assert r.messages(bad.id, "share_keys") == 0
    r.stage("masked_input")
    r.stage("unmask")
    assert bad.id not in r.in_sum and len(r.in_sum) == 7
    r.assert_exact()


def _numel_tamper(how: str) -> Callable[[Dev, Task, bytes], bytes]:
    def tamper(d: Dev, tk: Task, body: bytes) -> bytes:
        _, y = codec.decode(body, dtype="uint64")
        if how == "one_short":
            return codec.encode(masked_header(tk.round_id), y[:-1].copy())
        if how == "one_long":
            return codec.encode(masked_header(tk.round_id), np.concatenate([y, y[:1]]))
        if how == "truncated_payload":
            return body[:-8]
        if how == "float32_masked":
            return codec.encode(masked_header(tk.round_id), y.astype(np.float32))
        assert d.update is not None  # "float32_plain_update": the device's own update, unmasked
        return codec.encode(masked_header(tk.round_id), np.append(d.update, np.float32(d.examples)))

    return tamper


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("one_short", r"expected \d+ values"),
        ("one_long", r"expected \d+ values"),
        ("truncated_payload", r"payload is \d+ bytes"),
        ("float32_masked", r"dtype 'float32'"),
        ("float32_plain_update", r"dtype 'float32'"),
    ],
)
def test_masked_input_wrong_length_or_dtype_excludes_sender_never_summed(
    rig: Callable[..., Rig], how: str, why: str
) -> None:
    r = rig(6)
    bad = r.devs[1]
    for name in STAGES[:3]:
        r.stage(name)
    refused = r.stage("masked_input", tamper={bad.id: _numel_tamper(how)})
    assert set(refused) == {bad.id} and isinstance(refused[bad.id], Invalid)
    excluded_for(r, bad.id, r"masked input refused: .*" + why)
    assert r.messages(bad.id, "masked_input") == 0
    assert len(r.stored_contributors()) == 5  # the refused body was not stored, nor added
    r.stage("unmask")
    assert bad.id not in r.in_sum  # it shared keys, so it counts as dropped: its mask key is rebuilt
    r.assert_exact()


def test_message_for_another_stage_excludes_sender(rig: Callable[..., Rig]) -> None:
    r = rig(8)  # k = 7, t = 4: three exclusions leave every survivor 4 neighbours
    early, jumper, late = r.devs[0], r.devs[3], r.devs[6]
    r.stage("configure")
    # An unmask message while the round waits for keys.
    with pytest.raises(CoordinatorError):  # refused (409 or 422): what matters is the exclusion
        r.fed.devices.secure_json(early.id, r.round_id, "unmask", {"shares": {}})
    excluded_for(r, early.id, r"'unmask' message while the round is in stage 'advertise_keys'")
    r.stage("advertise_keys")
    # A masked vector (of the right shape) while the round is sharing keys: it must not reach the sum.
    junk = np.random.default_rng(1).integers(0, 2**63, r.n_params + 1, dtype=np.uint64)
    with pytest.raises(CoordinatorError):
        r.fed.devices.masked_input(jumper.id, r.round_id, codec.encode(masked_header(r.round_id), junk))
    excluded_for(r, jumper.id, r"'masked_input' message while the round is in stage 'share_keys'")
    kept: dict[str, Any] = {}

    def keep(d: Dev, tk: Task, msg: Any) -> Any:
        kept[d.id] = msg
        return msg

    r.stage("share_keys", tamper={late.id: keep})
    # Its share_keys message again, while the round takes masked inputs.
    with pytest.raises(CoordinatorError):
        r.fed.devices.secure_json(late.id, r.round_id, "share_keys", kept[late.id])
    excluded_for(r, late.id, r"'share_keys' message while the round is in stage 'masked_input'")
    r.stage("masked_input")
    r.stage("unmask")
    assert r.messages(jumper.id, "masked_input") == 0
    assert not {early.id, jumper.id, late.id} & set(r.in_sum)
    r.assert_exact()


def _first(table: dict[str, str]) -> str:
    return sorted(table)[0]


MALFORMED: dict[str, tuple[str, Callable[[Dev, Task, Any], Any], str]] = {
    "advertise_short_key": (
        "advertise_keys",
        lambda d, tk, m: {**m, "c_pk": b64e(base64.b64decode(m["c_pk"])[:31])},
        r"public keys must be 32 bytes",
    ),
    "advertise_not_json": ("advertise_keys", lambda d, tk, m: b"{not json", r"not a JSON object"),
    "share_keys_not_base64": (
        "share_keys",
        lambda d, tk, m: {"ciphertexts": {**m["ciphertexts"], _first(m["ciphertexts"]): "***"}},
        r"not valid base64",
    ),
    "share_keys_oversized": (
        "share_keys",
        lambda d, tk, m: {"ciphertexts": {**m["ciphertexts"], _first(m["ciphertexts"]): "A" * 4096}},
        r"at most \d+ characters",
    ),
    "unmask_share_not_asked_for": (
        "unmask",
        lambda d, tk, m: {"shares": {**m["shares"], d.id: m["shares"][_first(m["shares"])]}},
        r"not asked for",
    ),
    "unmask_share_wrong_size": (
        "unmask",
        lambda d, tk, m: {"shares": {**m["shares"], _first(m["shares"]): "AAAA"}},
        r"a share is \d+ bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_excludes_sender_round_still_exact(rig: Callable[..., Rig], case: str) -> None:
    stage, tamper, why = MALFORMED[case]
    r = rig(6)  # k = 5, t = 3
    # In the unmask stage the round finishes as soon as every secret has t shares: the bad
    # device answers first, before that can happen.
    bad = r.devs[0] if stage == "unmask" else r.devs[4]
    for name in STAGES:
        refused = r.stage(name, tamper={bad.id: tamper} if name == stage else None)
        if name == stage:
            assert set(refused) == {bad.id} and isinstance(refused[bad.id], Invalid)
    excluded_for(r, bad.id, rf"{stage} message refused: .*{why}")
    assert r.messages(bad.id, stage) == 0
    # Excluded before its masked input it is out of the sum; excluded in the unmask stage its masked
    # input is already in the sum, and its self mask goes with its neighbours' shares.
    assert (bad.id in r.in_sum) is (stage == "unmask")
    r.assert_exact()


def test_corrupted_share_ciphertext_refused_by_recipient_naming_sender(rig: Callable[..., Rig]) -> None:
    r = rig(8, k=4, t=3)
    sender = r.devs[2]
    target: dict[str, str] = {}

    def corrupt(d: Dev, tk: Task, msg: dict[str, Any]) -> dict[str, Any]:
        cts = dict(msg["ciphertexts"])
        victim = sorted(cts)[0]
        raw = bytearray(base64.b64decode(cts[victim]))
        raw[len(raw) // 2] ^= 0x01
        cts[victim] = base64.b64encode(bytes(raw)).decode()
        target["id"] = victim
        return {"ciphertexts": cts}

    r.stage("configure")
    r.stage("advertise_keys")
    assert r.stage("share_keys", tamper={sender.id: corrupt}) == {}  # the coordinator cannot read it
    recipient = r.by_id[target["id"]]
    tk = r.task(recipient)
    assert tk is not None and tk.stage == "masked_input" and recipient.client is not None
    x = weighted_input(
        np.zeros(r.n_params, np.float32), 10, recipient.client.params, np.random.default_rng(0)
    )
    with pytest.raises(SecAggError, match=re.escape(f"share ciphertext from device {sender.id!r}")):
        recipient.client.masked_input(x, (tk.secagg or {})["ciphertexts"])
    # The recipient sits the round out (as the agent does); the others go on.
    r.stage("masked_input", skip={recipient.id})
    r.stage("unmask")
    assert r.participant(recipient.id) == ("dropped", "missed the deadline of stage 'masked_input'")
    assert sender.id in r.in_sum and recipient.id not in r.in_sum
    r.assert_exact()


def test_resent_message_accepted_again_and_counted_once(rig: Callable[..., Rig]) -> None:
    r = rig(6)
    replayers = {
        "advertise_keys": r.devs[0].id,
        "share_keys": r.devs[1].id,
        "masked_input": r.devs[2].id,
        "unmask": r.devs[0].id,  # the first to answer: the round is still running when it replays
    }
    for name in STAGES:
        r.stage(name, replay={replayers[name]} if name in replayers else frozenset())
    for name, device in replayers.items():
        assert r.replies[(device, name)] is None, name  # the same message again: its answer was lost
        assert r.messages(device, name) == 1
        assert r.participant(device)[0] == "active"  # a duplicate is not a bad message
    assert sorted(r.in_sum) == sorted(d.id for d in r.devs)
    r.assert_exact()  # a masked vector counted twice would leave a mask and a second input in the sum


# -- 5. the coordinator never holds a plaintext update -------------------------------------------

WINDOW = 64
_B64 = re.compile(rb"[A-Za-z0-9+/]{24,}={0,2}")
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2}){24,}")


def _windows(raw: bytes) -> list[bytes]:
    """64-byte windows at the start, the end and two places between."""
    span = len(raw) - WINDOW
    assert span > 0
    return [raw[o : o + WINDOW] for o in sorted({0, span // 3, 2 * span // 3, span})]


def _expanded(raw: bytes) -> list[bytes]:
    """The bytes themselves and whatever their base64 or hex tokens decode to."""
    out = [raw]
    for m in _B64.finditer(raw):
        tok = m.group()
        with contextlib.suppress(binascii.Error, ValueError):
            out.append(base64.b64decode(tok + b"=" * (-len(tok) % 4)))
    out.extend(bytes.fromhex(m.group().decode()) for m in _HEX.finditer(raw))
    return out


def _cell(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict | list):
        return json.dumps(value).encode()
    return str(value).encode()


@dataclass
class Needles:
    binary: list[tuple[str, bytes]]
    text: list[tuple[str, str]]


def needles_of(d: Dev) -> Needles:
    """Byte windows of a device's plaintext update in every form it has on the device, and its values as text."""
    assert d.update is not None
    forms = {
        "float32 update": d.update.astype("<f4").tobytes(),
        "float32 weighted update": (d.update * np.float32(d.examples)).astype("<f4").tobytes(),
    }
    if d.x is not None:
        forms["uint64 x_u"] = d.x.astype("<u8").tobytes()
        forms["uint64 quantised"] = (d.x[:-1] // np.uint64(d.examples)).astype("<u8").tobytes()
        forms["uint32 quantised"] = (d.x[:-1] // np.uint64(d.examples)).astype("<u4").tobytes()
    binary = [(f"{d.id} {name}", w) for name, raw in forms.items() for w in _windows(raw)]
    values = [float(v) for v in d.update[:64] if abs(v) > 1e-3][:8]
    text_ = [(f"{d.id} float text", repr(v)) for v in values]
    if d.x is not None:
        text_.append((f"{d.id} x_u text", ",".join(str(int(v)) for v in d.x[:4])))
    return Needles(binary, text_)


def scan(r: Rig, needles: list[Needles], log_text: str = "") -> list[str]:
    """Where any needle occurs: every row of every table, every blob file, the log."""
    places: list[tuple[str, bytes]] = []
    with r.engine.connect() as conn:
        tables = inspect(conn).get_table_names()
        assert {"rounds", "round_messages", "participants", "events", "model_versions"} <= set(tables)
        for table in tables:
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                places.append((f"table {table}", b"\x1f".join(_cell(v) for v in row)))
    files = [p for p in r.blob_dir.rglob("*") if p.is_file()]
    assert files, "the blob store holds at least the model"
    places.extend((f"blob {p.name[:12]}", p.read_bytes()) for p in files)
    places.append(("log", log_text.encode()))
    hits = []
    for where, raw in places:
        compact = re.sub(rb"\s+", b"", raw)
        for haystack in _expanded(raw):
            for nd in needles:
                hits.extend(f"{label} in {where}" for label, w in nd.binary if w in haystack)
        for nd in needles:
            hits.extend(f"{label} in {where}" for label, s in nd.text if s.encode() in compact)
    return sorted(set(hits))


def test_coordinator_never_stores_a_plaintext_update_db_blobs_or_log(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    r = rig(6, hidden=(49,))  # 197 parameters
    quiet = r.devs[5].id
    for name in STAGES[:-1]:
        r.stage(name)
    devices = [r.by_id[i] for i in r.in_sum]
    assert len(devices) == 6 and all(d.x is not None for d in devices)
    needles = [needles_of(d) for d in devices]
    assert r.masked_blobs(), "the masked vectors are stored until the round ends"
    assert scan(r, needles, caplog.text) == []
    r.stage("unmask", skip={quiet})  # its self mask is removed with its neighbours' shares
    r.assert_exact()
    assert scan(r, needles, caplog.text) == []


def test_plaintext_scan_finds_update_of_a_plain_round(rig: Callable[..., Rig]) -> None:
    """Positive control: the same scan does find an update stored in plaintext (``secure = false``)."""
    r = rig(3, secure=False, hidden=(49,))
    r.stage("configure")
    first = r.devs[0]
    tk = r.task(first)
    assert tk is not None and tk.stage == "input"
    first.update = r.rng.normal(0, CLIP / 2, r.n_params).astype(np.float32)
    first.examples = 40
    header = {**masked_header(tk.round_id), "kind": "update", "num_examples": first.examples}
    r.fed.devices.update(
        first.id, tk.round_id, codec.encode(header, first.update * np.float32(first.examples))
    )
    hits = scan(r, [needles_of(first)])
    assert any("float32 weighted update in blob" in h for h in hits), hits
    # ...and in a JSON column, base64-encoded or as a list of numbers.
    with r.fed.write() as s:
        s.add(Event(actor="control", action="leak", detail={"b64": b64e(first.update.tobytes())}))
        s.add(Event(actor="control", action="leak", detail={"list": first.update[:64].tolist()}))
    hits = scan(r, [needles_of(first)])
    assert any("float32 update in table events" in h for h in hits), hits
    assert any("float text in table events" in h for h in hits), hits
