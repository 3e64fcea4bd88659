"""The federation engine on a real database, SQLite and PostgreSQL: rounds, aggregation, recovery.

Devices are driven in-process here (the HTTP path has its own tests), so every
value that goes into a round is known and the aggregate can be checked exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import auth, registry
from coordinator.blobs import LocalBlobStore
from coordinator.engine import EngineSettings, Federation
from coordinator.errors import Conflict, Forbidden, Invalid, Unauthorized
from coordinator.models import Participant, Round, RoundMessage
from coordinator.store import make_engine, migrate, session_factory
from shared import codec
from shared.signing import b64e, public_key_bytes, sign_request
from shared.tabular import local_statistics
from shared.wire import CheckinRequest, ConfigureMessage

SCHEMA = {
    "features": [
        {"name": "a", "type": "numeric"},
        {"name": "b", "type": "numeric"},
        {"name": "c", "type": "categorical"},
    ],
    "target": "y",
    "task": "binary",
    "positive": "yes",
}


def frame(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.normal(seed, 1, n)
    return pd.DataFrame(
        {
            "a": a,
            "b": rng.normal(0, 2, n),
            "c": rng.choice(["u", "v", "w"], n),
            "y": np.where(a > seed, "yes", "no"),
        }
    )


def spec(
    rounds: int = 2, stage_timeout: float = 30, target: int = 3, minimum: int = 2, strategy: str = "fedavg"
) -> dict:
    return {
        "name": "engine",
        "rounds": rounds,
        "seed": 5,
        "data": SCHEMA,
        "model": {"zoo": "mlp", "hidden": [4]},
        "cohort": {
            "target": target,
            "minimum": minimum,
            "stage_timeout": stage_timeout,
            "selection_timeout": 0.01,
        },
        "strategy": {"name": strategy},
        "secure": False,  # these tests check the plaintext sum; SecAgg+ rounds have their own
    }


@pytest.fixture
def fed(database_url: str, tmp_path: Path) -> Federation:
    engine = make_engine(database_url)
    migrate(engine)
    f = Federation(
        session_factory(engine),
        LocalBlobStore(tmp_path / "blobs"),
        Ed25519PrivateKey.generate(),
        EngineSettings(eligibility_window=60),
    )
    yield f
    engine.dispose()


def enroll(fed: Federation, n: int) -> list[str]:
    with fed.write() as s:
        tokens = auth.create_enrollment_tokens(s, n, 60, "test")
    ids = []
    for t in tokens:
        key = Ed25519PrivateKey.generate()
        with fed.write() as s:
            ids.append(auth.enroll_device(s, t, b64e(public_key_bytes(key)), "d", "test").id)
    return ids


def checkin_all(fed: Federation, devices: list[str]) -> dict:
    return {d: fed.checkins.checkin(d, CheckinRequest()).task for d in devices}


def current_round(fed: Federation, job_id: int) -> Round:
    with fed.read() as s:
        return s.query(Round).filter(Round.job_id == job_id).order_by(Round.number.desc()).first()


def run_stats_round(fed: Federation, job_id: int, devices: list[str]) -> None:
    checkin_all(fed, devices)
    fed.tick()
    tasks = checkin_all(fed, devices)
    for d, t in tasks.items():
        assert t is not None and t.kind == "stats" and t.stage == "configure"
        fed.devices.configure(d, t.round_id, ConfigureMessage(accepted=True, rows=50))
    for i, (d, t) in enumerate(checkin_all(fed, devices).items()):
        assert t.stage == "input"
        fed.devices.input_json(d, t.round_id, {"statistics": local_statistics(frame(i, 50), _schema())})


def _schema():  # type: ignore[no-untyped-def]
    from shared.jobspec import DataSchema

    return DataSchema.model_validate(SCHEMA)


def open_train_round(fed: Federation, devices: list[str]) -> dict:
    checkin_all(fed, devices)
    fed.tick()
    tasks = checkin_all(fed, devices)
    for d, t in tasks.items():
        assert t is not None and t.kind == "train", t
        fed.devices.configure(d, t.round_id, ConfigureMessage(accepted=True, rows=50))
    return checkin_all(fed, devices)


def update(round_id: int, vec: np.ndarray, n: int) -> bytes:
    return codec.encode(
        {
            "kind": "update",
            "round_id": round_id,
            "num_examples": n,
            "train_loss": 0.5,
            "metrics": {"accuracy": 0.5},
            "holdout_examples": 10,
        },
        vec,
    )


def test_rounds_aggregate_the_exact_weighted_mean(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1), "test")
    run_stats_round(fed, job.id, devices)
    with fed.read() as s:
        v0 = registry.get_version(s, job.id, 0)
        _, w0 = registry.load_vector(fed.blobs, v0)
    tasks = open_train_round(fed, devices)
    rng = np.random.default_rng(0)
    deltas = {d: rng.normal(0, 0.1, w0.size).astype(np.float32) for d in devices}
    counts = {d: 10 * (i + 1) for i, d in enumerate(devices)}
    for d, t in tasks.items():
        assert t.stage == "input" and t.model.version == 0
        fed.devices.update(d, t.round_id, update(t.round_id, deltas[d] * np.float32(counts[d]), counts[d]))

    expected = w0 + sum(counts[d] * deltas[d].astype(np.float64) for d in devices) / sum(counts.values())
    with fed.read() as s:
        v1 = registry.get_version(s, job.id, 1)
        _, w1 = registry.load_vector(fed.blobs, v1)
        r = s.get(Round, tasks[devices[0]].round_id)
        assert r.status == "completed" and r.aggregation_seconds is not None
        # the individual update vectors are gone from the blob store once summed
        shas = [
            m.blob_sha256
            for m in s.query(RoundMessage).filter(RoundMessage.round_id == r.id)
            if m.blob_sha256
        ]
    np.testing.assert_allclose(w1, expected, rtol=0, atol=1e-6)
    assert v1.parent == 0 and v1.provenance["examples"] == 60
    assert shas and not any(fed.blobs.exists(sha) for sha in shas)


def test_restarted_coordinator_sums_the_stored_updates(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1), "test")
    run_stats_round(fed, job.id, devices)
    tasks = open_train_round(fed, devices)
    with fed.read() as s:
        _, w0 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 0))
    ones = np.ones(w0.size, dtype=np.float32)
    for i, (d, t) in enumerate(tasks.items()):
        if i == 2:
            fed.sums._acc.clear()  # the running sum of the first two is lost, as in a restart
        fed.devices.update(d, t.round_id, update(t.round_id, ones * (i + 1), 1))
    with fed.read() as s:
        _, w1 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 1))
    np.testing.assert_allclose(w1, w0 + 2.0, atol=1e-6)


def test_missed_deadline_drops_device_and_round_completes(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1, stage_timeout=1.5), "test")
    run_stats_round(fed, job.id, devices)
    tasks = open_train_round(fed, devices)
    with fed.read() as s:
        _, w0 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 0))
    late = devices[2]
    for d in devices[:2]:
        fed.devices.update(
            d, tasks[d].round_id, update(tasks[d].round_id, np.full(w0.size, 3.0 * 7, np.float32), 7)
        )
    time.sleep(1.6)
    fed.tick()
    with fed.read() as s:
        r = s.get(Round, tasks[late].round_id)
        late_p = s.query(Participant).filter_by(round_id=r.id, device_id=late).one()
        _, w1 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 1))
    assert r.status == "completed"
    assert late_p.status == "dropped" and "deadline" in late_p.reason
    np.testing.assert_allclose(w1, w0 + 3.0, atol=1e-6)
    with pytest.raises(Conflict):
        fed.devices.update(late, r.id, update(r.id, np.zeros(w0.size, np.float32), 1))


def test_below_minimum_abandons_round_and_keeps_model(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1, stage_timeout=1.0), "test")
    run_stats_round(fed, job.id, devices)
    tasks = open_train_round(fed, devices)
    with fed.read() as s:
        w0_size = registry.get_version(s, job.id, 0).num_parameters
    d0 = devices[0]
    fed.devices.update(d0, tasks[d0].round_id, update(tasks[d0].round_id, np.ones(w0_size, np.float32), 5))
    time.sleep(1.1)
    fed.tick()
    with fed.read() as s:
        r = s.get(Round, tasks[d0].round_id)
        versions = registry.list_versions(s, job.id)
        shas = [
            m.blob_sha256
            for m in s.query(RoundMessage).filter(RoundMessage.round_id == r.id)
            if m.blob_sha256
        ]
    assert r.status == "abandoned" and "only 1 of 3 devices completed stage 'input'" in r.reason
    assert [v.version for v in versions] == [0]
    assert shas and not any(fed.blobs.exists(sha) for sha in shas)


def test_bad_updates_are_refused_without_touching_the_round(fed: Federation) -> None:
    devices = enroll(fed, 4)
    job = fed.jobs.submit(spec(rounds=1), "test")
    run_stats_round(fed, job.id, devices[:3])
    tasks = open_train_round(fed, devices[:3])
    d = devices[0]
    rid = tasks[d].round_id
    with fed.read() as s:
        n = registry.get_version(s, job.id, 0).num_parameters
    bad = [
        (update(rid, np.ones(n + 1, np.float32), 1), Invalid, "expected"),
        (update(rid + 99, np.ones(n, np.float32), 1), Conflict, "was made for round"),
        (update(rid, np.ones(n, np.float32), 0), Invalid, "num_examples"),
        (b"garbage", Invalid, "bad magic"),
        (update(rid, np.array([np.nan] * n, np.float32), 1), Invalid, "NaN"),
    ]
    for body, exc, text in bad:
        with pytest.raises(exc, match=text):
            fed.devices.update(d, rid, body)
    with pytest.raises(Forbidden):
        fed.devices.update(devices[3], rid, update(rid, np.ones(n, np.float32), 1))
    fed.devices.update(d, rid, update(rid, np.ones(n, np.float32), 1))
    fed.devices.update(d, rid, update(rid, np.ones(n, np.float32), 1))  # a resend: accepted, counted once
    with pytest.raises(Conflict, match="already sent a different 'input' message"):
        fed.devices.update(d, rid, update(rid, np.full(n, 2, np.float32), 1))
    with fed.read() as s:
        p = s.query(Participant).filter_by(round_id=rid, device_id=d).one()
        assert p.status == "active" and p.stage_done == "input" and p.num_examples == 1
        assert s.get(Round, rid).status == "running"


def test_replayed_device_request_is_refused(fed: Federation) -> None:
    with fed.write() as s:
        (token,) = auth.create_enrollment_tokens(s, 1, 60, "test")
    key = Ed25519PrivateKey.generate()
    with fed.write() as s:
        device = auth.enroll_device(s, token, b64e(public_key_bytes(key)), "d", "test")
    headers = sign_request(key, device.id, "POST", "/v1/device/checkin", b"{}")
    with fed.write() as s:
        auth.authenticate_device(s, headers, "POST", "/v1/device/checkin", b"{}", window_seconds=60)
    with pytest.raises(Unauthorized, match="replayed"), fed.write() as s:
        auth.authenticate_device(s, headers, "POST", "/v1/device/checkin", b"{}", window_seconds=60)


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_stateful_strategy_keeps_its_state_across_rounds(fed: Federation, strategy: str) -> None:
    devices = enroll(fed, 2)
    job = fed.jobs.submit(spec(rounds=2, target=2, strategy=strategy), "test")
    run_stats_round(fed, job.id, devices)
    for _ in range(2):
        tasks = open_train_round(fed, devices)
        with fed.read() as s:
            n = registry.get_version(s, job.id).num_parameters
        for d, t in tasks.items():
            fed.devices.update(d, t.round_id, update(t.round_id, np.full(n, 0.1 * 3, np.float32), 3))
    with fed.read() as s:
        vs = [registry.load_vector(fed.blobs, v)[1] for v in registry.list_versions(s, job.id)]
        state = s.get(type(job), job.id).strategy_state_sha256
    assert len(vs) == 3 and state is not None
    step1, step2 = vs[1] - vs[0], vs[2] - vs[1]
    # With a constant pseudo-gradient, momentum (or Adam's moments) makes the second step differ from the first.
    assert not np.allclose(step1, step2)
