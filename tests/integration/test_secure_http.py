"""SecAgg+ over real HTTP: real agent processes dropping out at every stage, and a scan for plaintext."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import codec
from shared.jobspec import DataSchema
from shared.secagg import statistics as secagg_statistics
from shared.secagg.params import SecAggParams
from shared.secagg.protocol import SecAggClient, weighted_input
from shared.signing import b64e, identity_verifier, public_key_bytes, sign_request
from shared.wire import masked_input_header

from .harness import Coordinator, churn_slices, small_spec

pytestmark = pytest.mark.slow

CRASHES = {0: "1:advertise_keys", 1: "2:share_keys", 2: "3:masked_input", 3: "4:unmask"}


def test_dropouts_at_every_stage_with_real_agents(coord: Coordinator, tmp_path: Path) -> None:
    """Agent i dies abruptly at the stage in CRASHES[i]; each secure round still completes."""
    paths, ref, schema = churn_slices(tmp_path / "data", 5)
    homes = [coord.enroll(p, f"a{i}") for i, p in enumerate(paths)]
    procs = {
        i: coord.run_agent(h, {"AICFL_AGENT_CRASH_AT": CRASHES[i]} if i in CRASHES else None)
        for i, h in enumerate(homes)
    }
    stop = threading.Event()

    def restarter() -> None:  # a crashed device comes back (without the fault), as a real one would
        while not stop.wait(0.5):
            for i, p in list(procs.items()):
                if p.poll() == 17:
                    procs[i] = coord.run_agent(homes[i])

    threading.Thread(target=restarter, daemon=True).start()
    spec = small_spec(schema, rounds=4, target=5, minimum=3, stage_timeout=12, selection_timeout=3)
    job = coord.api().json("POST", "/v1/jobs", json=spec)
    try:
        coord.wait_job(job["id"], timeout=300)
    finally:
        stop.set()

    device_of = {json.loads((h / "agent.json").read_text())["device_id"]: i for i, h in enumerate(homes)}
    rounds = [r for r in coord.rounds(job["id"]) if r["kind"] == "train"]
    assert [r["status"] for r in rounds] == ["completed"] * 4, [r["reason"] for r in rounds]
    for r in rounds:
        assert r["metrics"]["secure"] is True
        crashed_stage = CRASHES[r["number"] - 1].split(":")[1]
        detail = coord.api().json("GET", f"/v1/jobs/{job['id']}/rounds/{r['number']}")
        (crashed,) = [d for d in detail["devices"] if device_of[d["device_id"]] == r["number"] - 1]
        if crashed_stage == "unmask":
            # Its masked input is in the sum; it just never answered the last stage.
            assert crashed["status"] == "active" and crashed["stage_done"] == "masked_input"
        elif crashed_stage == "advertise_keys" and crashed["status"] == "active":
            # Restarted before the stage closed: it had no secrets yet, so it took part afresh and its
            # masked input is in the sum. Its unmask answer may come after the round already ended (every
            # secret had t shares): the restarted agent is the slowest of the cohort.
            assert crashed["stage_done"] in ("masked_input", "unmask")
        else:
            # Restarted or not, its secrets died with it: dropped at that stage.
            assert crashed["status"] == "dropped" and f"stage {crashed_stage!r}" in crashed["reason"]
        others = [d for d in detail["devices"] if d is not crashed]
        # On a loaded machine a slow agent may miss a deadline too; none is ever excluded.
        assert all(d["status"] in ("active", "dropped") for d in others), others
        assert sum(d["status"] == "active" and d["stage_done"] == "unmask" for d in others) >= 3, others
    versions = coord.api().json("GET", f"/v1/jobs/{job['id']}/models")
    assert [v["version"] for v in versions] == [0, 1, 2, 3, 4]


class _Device:
    """A device speaking the agent's wire protocol from the test, so its update is known."""

    def __init__(self, url: str, token: str):
        self.key = Ed25519PrivateKey.generate()
        self.http = httpx.Client(base_url=url, timeout=60)
        out = self.http.post(
            "/v1/enroll", json={"token": token, "public_key": b64e(public_key_bytes(self.key))}
        )
        out.raise_for_status()
        self.id = out.json()["device_id"]
        self.client: SecAggClient | None = None

    def post(self, path: str, body: bytes, ctype: str = "application/json") -> dict:
        headers = {**sign_request(self.key, self.id, "POST", path, body), "Content-Type": ctype}
        resp = self.http.post(path, content=body, headers=headers)
        if resp.status_code == 409 and path.endswith("/unmask"):
            return {}  # the round finished once every secret had t shares: a late answer is stale
        assert resp.status_code == 200, resp.text
        return resp.json()

    def task(self) -> dict | None:
        return self.post("/v1/device/checkin", b"{}").get("task")


def _windows(vec: np.ndarray, size: int = 64) -> list[bytes]:
    raw = vec.tobytes()
    return [raw[i : i + size] for i in range(0, max(1, len(raw) - size), max(size, len(raw) // 8))]


def test_coordinator_never_holds_a_plaintext_update(coord: Coordinator) -> None:
    """Known updates go through a secure round over HTTP; no database row, blob or log line holds one."""
    tokens = coord.api().json("POST", "/v1/enrollment-tokens", json={"count": 4})["tokens"]
    devs = [_Device(coord.url, t) for t in tokens]
    schema = {
        "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "numeric"}],
        "target": "y",
        "task": "binary",
        "positive": "1",
    }
    spec = {
        "name": "scan",
        "rounds": 1,
        "data": schema,
        "model": {"zoo": "mlp", "hidden": [64]},
        "cohort": {"target": 4, "minimum": 3, "stage_timeout": 60, "selection_timeout": 1},
        "evaluation": {"federated": False},
    }
    job = coord.api().json("POST", "/v1/jobs", json=spec)
    stats = {
        "rows": 10,
        "numeric": {c: {"count": 10, "sum": 1.0, "sum_sq": 12.0} for c in ("a", "b")},
        "categorical": {},
        "target": {"0": 5, "1": 5},
    }
    schema_model = DataSchema.model_validate(schema)
    rng = np.random.default_rng(7)
    secrets_seen: list[bytes] = []

    def drive(d: _Device) -> None:
        while True:
            t = d.task()
            if t is None:
                if coord.job(job["id"])["status"] != "running":
                    return
                time.sleep(0.1)
                continue
            path = f"/v1/device/rounds/{t['round_id']}/{t['stage']}"
            info = t.get("secagg") or {}
            if t["stage"] == "configure":
                vocab = secagg_statistics.vocabulary(stats, schema_model) if t["kind"] == "stats" else None
                d.post(path, json.dumps({"accepted": True, "rows": 10, "vocabulary": vocab}).encode())
            elif t["stage"] == "input":
                d.post(path, json.dumps({"statistics": stats}).encode())
            elif t["stage"] == "advertise_keys":
                d.client = SecAggClient(
                    d.id, base64.b64decode(info["context"]), SecAggParams(**info["params"]), d.key.sign
                )
                d.post(path, json.dumps(d.client.advertise()).encode())
            elif t["stage"] == "share_keys":
                assert d.client is not None
                d.post(
                    path,
                    json.dumps(
                        {
                            "ciphertexts": d.client.share_keys(
                                info["neighbours"], identity_verifier(info["identity_keys"])
                            )
                        }
                    ).encode(),
                )
            elif t["stage"] == "masked_input" and t["kind"] == "stats":
                assert d.client is not None
                x = secagg_statistics.encode(stats, schema_model, info["vocabulary"])
                header = masked_input_header(t["round_id"])
                d.post(
                    path,
                    codec.encode(header, d.client.masked_input(x, info["ciphertexts"])),
                    "application/octet-stream",
                )
            elif t["stage"] == "masked_input":
                assert d.client is not None
                n = coord.api().json("GET", f"/v1/jobs/{job['id']}/models")[0]["num_parameters"]
                update = rng.normal(0, 0.05, n).astype(np.float32)
                x = weighted_input(
                    update,
                    10,
                    d.client.params,
                    np.random.default_rng(int.from_bytes(os.urandom(8), "little")),
                )
                secrets_seen.extend(_windows(update) + _windows(x[:-1]))
                y = d.client.masked_input(x, info["ciphertexts"])
                header = masked_input_header(t["round_id"], train_loss=0.1)
                d.post(path, codec.encode(header, y), "application/octet-stream")
            elif t["stage"] == "unmask":
                assert d.client is not None
                me = {d.id}
                shares = d.client.unmask(set(info["survivors"]) - me, set(info["dropped"]) - me)
                d.post(path, json.dumps({"shares": shares}).encode())

    threads = [threading.Thread(target=drive, args=(d,)) for d in devs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    job_now = coord.wait_job(job["id"], timeout=30)
    assert job_now["rounds_completed"] == 1
    assert secrets_seen

    haystacks: dict[str, bytes] = {"server.log": coord.log.read_bytes()}
    for f in (coord.data_dir / "blobs").rglob("*"):
        if f.is_file():
            haystacks[str(f)] = f.read_bytes()
    db = sqlite3.connect(coord.data_dir / "coordinator.db")
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in db.execute(f'SELECT * FROM "{table}"'):
            for i, value in enumerate(row):
                if isinstance(value, bytes | str):
                    raw = value if isinstance(value, bytes) else value.encode()
                    haystacks[f"{table}.{i}"] = haystacks.get(f"{table}.{i}", b"") + raw
                    # base64 inside JSON too
                    haystacks[f"{table}.{i}.b64"] = haystacks.get(f"{table}.{i}.b64", b"") + _decoded_b64(raw)
    db.close()
    wal = coord.data_dir / "coordinator.db-wal"
    if wal.exists():
        haystacks["wal"] = wal.read_bytes()
    haystacks["db"] = (coord.data_dir / "coordinator.db").read_bytes()
    found = [(name, i) for name, hay in haystacks.items() for i, w in enumerate(secrets_seen) if w in hay]
    assert not found, f"plaintext update bytes found in {found[:5]}"


def _decoded_b64(raw: bytes) -> bytes:
    import re

    out = []
    for m in re.finditer(rb"[A-Za-z0-9+/]{88,}={0,2}", raw):
        with contextlib.suppress(ValueError):
            out.append(base64.b64decode(m.group(0) + b"=" * (-len(m.group(0)) % 4)))
    return b"".join(out)
