"""The coordinator's side of the training cluster, on SQLite and PostgreSQL: a pre-trained version 0,
the AutoML baseline, and the audit queue (leases, retries, the release gate, concurrent workers)."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
from sqlalchemy import select

from coordinator import registry
from coordinator.engine import Federation
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.models import Audit, Job, ModelVersion, Round
from shared import codec
from shared.tabular import Preprocessor
from shared.zoo import architecture, build_model, flatten_parameters

from .test_engine_store import checkin_all, enroll, fed, open_train_round, run_stats_round, spec, update

__all__ = ["fed"]  # the fixture, imported for its side effect on pytest

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def pretrained_spec(**kw: object) -> dict:
    s = spec(**kw)  # type: ignore[arg-type]
    s["model"] = {**s["model"], "initial": "pretrained"}
    return s


def job_arch(fed: Federation, job_id: int) -> dict:
    from shared.jobspec import JobSpec

    with fed.read() as s:
        job = s.get(Job, job_id)
        pre = Preprocessor.from_dict(job.preprocess)
        return architecture(JobSpec.model_validate(job.spec).model, pre.input_dim, pre.output_dim)


def version0_body(arch: dict, vec: np.ndarray, **provenance: object) -> bytes:
    prov = {"data_sha256": "ab" * 32, "world_size": 2, "epochs": 3, "metrics": {"loss": 0.3}, **provenance}
    return codec.encode({"kind": "pretrained", "arch": arch, "provenance": prov}, vec)


def test_pretrained_job_waits_for_version0_and_first_round_starts_from_it(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(pretrained_spec(rounds=1), "test")
    with pytest.raises(Conflict, match="statistics round has not finished"):
        fed.cluster.upload_version0(job.id, version0_body({"zoo": "mlp"}, np.zeros(3, np.float32)), "op")
    run_stats_round(fed, job.id, devices)
    # the statistics round fixed the preprocessing but made no version: training waits
    checkin_all(fed, devices)
    fed.tick()
    with fed.read() as s:
        assert s.scalar(select(ModelVersion.id).where(ModelVersion.job_id == job.id)) is None
        assert s.scalar(select(Round).where(Round.job_id == job.id, Round.kind == "train")) is None

    arch = job_arch(fed, job.id)
    vec = flatten_parameters(build_model(arch, seed=99))
    with pytest.raises(Invalid, match="was built for"):
        fed.cluster.upload_version0(job.id, version0_body({**arch, "hidden": [5]}, vec), "op")
    with pytest.raises(Invalid, match="parameters"):
        fed.cluster.upload_version0(job.id, version0_body(arch, vec[:-1]), "op")
    bad = vec.copy()
    bad[0] = np.nan
    with pytest.raises(Invalid, match="finite"):
        fed.cluster.upload_version0(job.id, version0_body(arch, bad), "op")
    with pytest.raises(Invalid, match="provenance lacks world_size"):
        fed.cluster.upload_version0(
            job.id,
            codec.encode({"arch": arch, "provenance": {"data_sha256": "x", "epochs": 1, "metrics": {}}}, vec),
            "op",
        )
    with pytest.raises(Invalid, match="bad magic"):
        fed.cluster.upload_version0(job.id, b"not a tensor", "op")

    row = fed.cluster.upload_version0(job.id, version0_body(arch, vec), "op")
    assert row.version == 0 and row.provenance["source"] == "pretrain" and row.provenance["world_size"] == 2
    with pytest.raises(Conflict, match="already has a version 0"):
        fed.cluster.upload_version0(job.id, version0_body(arch, vec), "op")

    tasks = open_train_round(fed, devices)
    for d, t in tasks.items():
        assert t.model.version == 0
        fed.devices.update(d, t.round_id, update(t.round_id, np.zeros(vec.size, np.float32), 1))
    with fed.read() as s:
        _, w0 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 0))
        _, w1 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 1))
    np.testing.assert_array_equal(w0, vec)
    np.testing.assert_allclose(w1, vec, atol=1e-7)  # zero updates: the federation continued those weights


def test_random_job_refuses_a_pretrained_version0(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1), "test")
    run_stats_round(fed, job.id, devices)
    arch = job_arch(fed, job.id)
    with pytest.raises(Conflict, match='model.initial = "pretrained"'):
        fed.cluster.upload_version0(job.id, version0_body(arch, flatten_parameters(build_model(arch))), "op")


def test_version0_is_refused_for_an_unknown_or_stopped_job_and_for_wrong_numbers(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(pretrained_spec(rounds=1), "test")
    run_stats_round(fed, job.id, devices)
    arch = job_arch(fed, job.id)
    vec = flatten_parameters(build_model(arch, seed=1))
    with pytest.raises(Invalid, match="version 0: unsupported dtype 'uint64'; expected 'float32'"):
        fed.cluster.upload_version0(job.id, version0_body(arch, vec.view(np.uint32).astype(np.uint64)), "op")
    with pytest.raises(Invalid, match="needs a 'provenance' object"):
        fed.cluster.upload_version0(job.id, codec.encode({"arch": arch}, vec), "op")
    with pytest.raises(NotFound, match=f"no job {job.id + 100}"):
        fed.cluster.upload_version0(job.id + 100, version0_body(arch, vec), "op")
    fed.jobs.cancel(job.id, "op")
    with pytest.raises(Conflict, match=f"job {job.id} is cancelled"):
        fed.cluster.upload_version0(job.id, version0_body(arch, vec), "op")
    with fed.read() as s:
        assert s.scalar(select(ModelVersion.id).where(ModelVersion.job_id == job.id)) is None


def test_baseline_is_validated_and_replaced(fed: Federation) -> None:
    job = fed.jobs.submit(spec(), "test")
    good = {
        "leader": "GBM_1",
        "algorithm": "GBM",
        "metrics": {"auc": 0.91},
        "leaderboard": [{"model_id": "GBM_1", "auc": 0.9}],
        "contributions": {"model": "GBM_1", "features": {"a": 0.5, "b": 0.1}, "rows": 10},
        "provenance": {"data_sha256": "x"},
    }
    for bad, message in (
        ({**good, "leader": ""}, "leader"),
        ({**good, "metrics": {"auc": float("nan")}}, "finite"),
        ({**good, "leaderboard": {}}, "leaderboard"),
        ({**good, "contributions": {"features": {"zzz": 1.0}}}, "zzz"),
        ({**good, "surprise": 1}, "surprise"),
    ):
        with pytest.raises(Invalid, match=message):
            fed.cluster.put_baseline(job.id, bad, "op")
    with pytest.raises(NotFound):
        fed.cluster.put_baseline(job.id + 100, good, "op")
    fed.cluster.put_baseline(job.id, good, "op")
    fed.cluster.put_baseline(job.id, {**good, "leader": "XGB_2"}, "op")
    from coordinator.models import Baseline

    with fed.read() as s:
        rows = list(s.scalars(select(Baseline).where(Baseline.job_id == job.id)))
    assert [r.leader for r in rows] == ["XGB_2"]


def _audit_rows(fed: Federation, job_id: int) -> list[Audit]:
    with fed.read() as s:
        return list(s.scalars(select(Audit).where(Audit.job_id == job_id).order_by(Audit.version)))


def _report(verdict: str = "ok") -> dict:
    return {"verdict": verdict, "top_features": ["a"], "drift": {"rank_correlation": 0.9}, "reasons": []}


def test_every_version_is_queued_and_a_claim_is_a_lease(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(rounds=1), "test")
    run_stats_round(fed, job.id, devices)
    assert [(a.version, a.status) for a in _audit_rows(fed, job.id)] == [(0, "queued")]

    now = [1000.0]
    fed.clock = lambda: now[0]
    taken = fed.audits.claim("w1", 30)
    assert taken is not None and taken["version"] == 0 and taken["previous_version"] is None
    assert fed.audits.claim("w2", 30) is None  # held
    now[0] += 31  # w1 died: its lease runs out and w2 takes the audit again
    again = fed.audits.claim("w2", 30)
    assert again is not None and again["id"] == taken["id"] and again["attempt"] == 2
    with pytest.raises(Conflict, match="not held by w1"):
        fed.audits.complete(taken["id"], {"worker": "w1", "verdict": "ok", "report": _report(), "plots": {}})
    for body, message in (
        ({"verdict": "fine", "report": {}}, "verdict"),
        ({"verdict": "ok", "report": []}, "report"),
        ({"verdict": "ok", "report": {}, "plots": {"../x.png": ""}}, "plot name"),
        ({"verdict": "ok", "report": {}, "plots": {"a.png": "!!"}}, "base64"),
        ({"verdict": "ok", "report": {}, "plots": {"a.png": base64.b64encode(b"GIF89a").decode()}}, "PNG"),
    ):
        with pytest.raises(Invalid, match=message):
            fed.audits.complete(again["id"], {"worker": "w2", **body})
    done = fed.audits.complete(
        again["id"],
        {
            "worker": "w2",
            "verdict": "ok",
            "report": _report(),
            "seconds": 1.5,
            "plots": {"importance.png": base64.b64encode(PNG).decode()},
        },
    )
    assert done.status == "done" and fed.blobs.get(done.plots["importance.png"]) == PNG
    assert fed.audits.claim("w2", 30) is None


def test_failed_attempts_are_retried_then_recorded(fed: Federation) -> None:
    devices = enroll(fed, 3)
    s = spec(rounds=1)
    s["audit"] = {"max_attempts": 2}
    job = fed.jobs.submit(s, "test")
    run_stats_round(fed, job.id, devices)
    first = fed.audits.claim("w", 60)
    assert first is not None
    assert fed.audits.fail(first["id"], {"worker": "w", "error": "boom"}).status == "queued"
    second = fed.audits.claim("w", 60)
    assert second is not None and second["attempt"] == 2
    with pytest.raises(Invalid, match="error"):
        fed.audits.fail(second["id"], {"worker": "w", "error": ""})
    row = fed.audits.fail(second["id"], {"worker": "w", "error": "boom again"})
    assert row.status == "failed" and row.error == "boom again"
    assert fed.audits.claim("w", 60) is None
    # a failed audit does not block rounds (no gate)
    tasks = open_train_round(fed, devices)
    assert all(t.kind == "train" for t in tasks.values())


def test_gate_withholds_a_drifting_version_and_rounds_go_on_from_the_released_one(fed: Federation) -> None:
    devices = enroll(fed, 3)
    s = spec(rounds=3)
    s["audit"] = {"gate": True}
    job = fed.jobs.submit(s, "test")
    run_stats_round(fed, job.id, devices)

    def finish_audit(verdict: str) -> None:
        taken = fed.audits.claim("w", 60)
        assert taken is not None
        fed.audits.complete(taken["id"], {"worker": "w", "verdict": verdict, "report": _report(verdict)})

    finish_audit("ok")  # version 0

    with fed.read() as ss:
        numel = registry.get_version(ss, job.id, 0).num_parameters

    def train_round(expected_in: int) -> None:
        tasks = open_train_round(fed, devices)
        for d, t in tasks.items():
            assert t.model.version == expected_in
            fed.devices.update(d, t.round_id, update(t.round_id, np.ones(numel, np.float32), 1))

    train_round(0)  # makes version 1, unreleased until audited
    with fed.read() as ss:
        v1 = registry.get_version(ss, job.id, 1)
        assert not v1.released and ss.get(Job, job.id).current_version == 0
    checkin_all(fed, devices)
    fed.tick()  # the gate holds the next round while version 1's audit is queued
    with fed.read() as ss:
        assert ss.scalar(select(Round).where(Round.job_id == job.id, Round.status == "running")) is None
    finish_audit("drift")
    with fed.read() as ss:
        assert not registry.get_version(ss, job.id, 1).released
        assert ss.get(Job, job.id).current_version == 0
    train_round(0)  # version 1 was withheld: devices keep training from version 0
    finish_audit("ok")
    with fed.read() as ss:
        v2 = registry.get_version(ss, job.id, 2)
        assert v2.released and v2.parent == 0 and ss.get(Job, job.id).current_version == 2


@pytest.mark.postgres
def test_concurrent_workers_never_take_the_same_audit(postgres_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from coordinator.blobs import LocalBlobStore
    from coordinator.engine import EngineSettings
    from coordinator.store import make_engine, migrate, session_factory

    engine = make_engine(postgres_url)
    migrate(engine)
    f = Federation(
        session_factory(engine), LocalBlobStore(tmp_path), Ed25519PrivateKey.generate(), EngineSettings()
    )
    job = f.jobs.submit(spec(), "test")
    with f.write() as s:
        for v in range(40):
            s.add(Audit(job_id=job.id, version=v, status="queued", queued_at=0.0))
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def worker(name: str) -> None:
        barrier.wait()
        while (a := f.audits.claim(name, 600)) is not None:
            with lock:
                taken.append((name, a["version"]))
            f.audits.complete(a["id"], {"worker": name, "verdict": "ok", "report": {}})

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    versions = sorted(v for _, v in taken)
    assert versions == list(range(40))  # each exactly once
    assert len({n for n, _ in taken}) > 1  # and the work was shared
