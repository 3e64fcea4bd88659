"""Coordinator-side aggregation of one round over loopback HTTP, next to a bare numpy sum.

Starts a real coordinator (SQLite), enrolls N devices with their own Ed25519
keys, runs a statistics round and one training round whose updates (about
--params float32 values each) are uploaded over HTTP by a thread pool, then
reads the round's ``aggregation_seconds`` (the coordinator's time adding the
updates as they arrive plus turning the sum into a signed model version) and
times a plain numpy sum of the same N vectors in this process (the floor).

    python bench/aggregate.py [--devices 50] [--params 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.coordinator_process import bootstrap_admin  # noqa: E402
from server.demo import free_port  # noqa: E402
from shared import codec  # noqa: E402
from shared.jobspec import DataSchema, ModelSpec  # noqa: E402
from shared.signing import b64e, public_key_bytes, sign_request  # noqa: E402
from shared.tabular import local_statistics  # noqa: E402
from shared.zoo import architecture, parameter_count  # noqa: E402

SCHEMA = {
    "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "numeric"}],
    "target": "y",
    "task": "binary",
    "positive": "1",
}


def hidden_for(params: int) -> list[int]:
    """Two hidden layers of about equal width giving roughly ``params`` parameters on 2 inputs."""
    width = int(np.sqrt(params))
    return [width, width]


class Device:
    def __init__(self, url: str, token: str):
        self.key = Ed25519PrivateKey.generate()
        self.http = httpx.Client(base_url=url, timeout=300)
        resp = self.http.post(
            "/v1/enroll", json={"token": token, "public_key": b64e(public_key_bytes(self.key))}
        )
        resp.raise_for_status()
        self.id = resp.json()["device_id"]

    def call(self, path: str, body: bytes = b"{}", content_type: str = "application/json") -> dict:
        headers = sign_request(self.key, self.id, "POST", path, body)
        headers["Content-Type"] = content_type
        resp = self.http.post(path, content=body, headers=headers)
        if resp.status_code >= 400:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.text}")
        return resp.json()

    def task(self) -> dict | None:
        return self.call("/v1/device/checkin").get("task")


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def floor_seconds(vectors: list[np.ndarray], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        acc = np.zeros_like(vectors[0])
        for v in vectors:
            acc += v
        best = min(best, time.perf_counter() - t0)
    return best


def enroll_devices(url: str, admin: str, n_devices: int) -> list[Device]:
    op = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    tokens = op.post("/v1/enrollment-tokens", json={"count": n_devices}).json()["tokens"]
    return [Device(url, t) for t in tokens]


def one_round(url: str, admin: str, devices: list[Device], params: int, upload_threads: int) -> dict:
    """One job of one round; the same devices take part in every repeat."""
    n_devices = len(devices)
    op = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    spec = {
        "name": "bench-aggregate",
        "rounds": 1,
        "seed": 1,
        "data": SCHEMA,
        "model": {"zoo": "mlp", "hidden": hidden_for(params)},
        "cohort": {"target": n_devices, "minimum": n_devices, "stage_timeout": 600, "selection_timeout": 1},
        "evaluation": {"federated": False},
        # The plaintext path this bench measures; SecAgg+ rounds (the default) are bench/secagg.py's.
        "secure": False,
    }
    job = op.post("/v1/jobs", json=spec).json()
    pool = ThreadPoolExecutor(max_workers=upload_threads)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"a": rng.normal(size=64), "b": rng.normal(size=64), "y": rng.integers(0, 2, 64).astype(str)}
    )
    stats = {"statistics": local_statistics(frame, DataSchema.model_validate(SCHEMA))}

    def step(d: Device, kind: str, payload: dict | None = None) -> dict:
        t = wait_until(d.task, 300, f"a {kind} task", interval=0.3)
        if t["stage"] == "configure":
            d.call(
                f"/v1/device/rounds/{t['round_id']}/configure",
                json.dumps({"accepted": True, "rows": 64}).encode(),
            )
            t = wait_until(d.task, 300, f"the {kind} input stage", interval=0.3)
        if payload is not None:
            d.call(f"/v1/device/rounds/{t['round_id']}/input", json.dumps(payload).encode())
        return t

    # Every device polls at once (as real ones do), so all are online when the cohort is drawn.
    everyone = ThreadPoolExecutor(max_workers=n_devices)
    list(everyone.map(lambda d: step(d, "stats", stats), devices))
    tasks = list(everyone.map(lambda d: step(d, "train"), devices))
    n_params = parameter_count(architecture(ModelSpec(hidden=hidden_for(params)), 2, 1))
    vectors = [rng.normal(0, 0.01, n_params).astype(np.float32) * np.float32(64) for _ in devices]
    bodies = [
        codec.encode(
            {
                "kind": "update",
                "round_id": t["round_id"],
                "num_examples": 64,
                "train_loss": 0.1,
                "metrics": {},
                "holdout_examples": 0,
            },
            v,
        )
        for t, v in zip(tasks, vectors, strict=True)
    ]
    t0 = time.perf_counter()
    list(
        pool.map(
            lambda i: devices[i].call(
                f"/v1/device/rounds/{tasks[i]['round_id']}/input", bodies[i], "application/octet-stream"
            ),
            range(n_devices),
        )
    )

    def done() -> dict | None:
        rounds = op.get(f"/v1/jobs/{job['id']}/rounds").json()
        r = [x for x in rounds if x["kind"] == "train"]
        return r[0] if r and r[0]["status"] != "running" else None

    r = wait_until(done, 600, "the round to finish")
    wall = time.perf_counter() - t0
    assert r["status"] == "completed", r
    return {
        "params": n_params,
        "aggregation_seconds": r["aggregation_seconds"],
        "parts": r["metrics"]["aggregation"],
        "upload_to_version_seconds": wall,
        "vectors": vectors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="rounds measured (each on a fresh job)")
    ap.add_argument("--upload-threads", type=int, default=2, help="devices uploading at once")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "coord"
        env = {**os.environ, "AICFL_TICK_INTERVAL": "0.05", "AICFL_ACTIVE_RETRY": "0.1"}
        admin = bootstrap_admin(data, env)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(Path(tempfile.gettempdir()) / "aicfl-bench-server.log", "wb") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "server",
                    "server",
                    "start",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(data),
                    "--log-level",
                    "info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        try:
            wait_until(lambda: _healthy(url), 60, "the coordinator")
            results = []
            devices = enroll_devices(url, admin, args.devices)
            for _ in range(args.repeat):
                res = one_round(url, admin, devices, args.params, args.upload_threads)
                res["floor_seconds"] = floor_seconds(res.pop("vectors"), 5)
                results.append(res)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    agg = sorted(r["aggregation_seconds"] for r in results)[len(results) // 2]
    floor = sorted(r["floor_seconds"] for r in results)[len(results) // 2]
    wall = sorted(r["upload_to_version_seconds"] for r in results)[len(results) // 2]
    print(
        f"machine: {platform.node()} ({os.cpu_count()} cpus), python {platform.python_version()}, numpy {np.__version__}"
    )
    print(
        f"{args.devices} devices x {results[0]['params']:,} parameters (float32), median of {args.repeat} rounds"
    )
    print(
        f"  coordinator aggregation  {agg * 1000:8.1f} ms   (adding updates as they arrive + new signed version)"
    )
    parts = {
        k: sorted(r["parts"][k] for r in results)[len(results) // 2]
        for k in ("accumulate_cpu_seconds", "finalize_seconds")
    }
    for i, r in enumerate(results, 1):
        print(
            f"  round {i}: aggregation {r['aggregation_seconds'] * 1000:6.1f} ms = adding {r['parts']['accumulate_cpu_seconds'] * 1000:5.1f}"
            f" + new version {r['parts']['finalize_seconds'] * 1000:5.1f}; floor {r['floor_seconds'] * 1000:5.1f} ms"
        )
    print(
        f"    of which adding        {parts['accumulate_cpu_seconds'] * 1000:8.1f} ms   (CPU time of the additions as updates arrive)"
    )
    print(
        f"    of which new version   {parts['finalize_seconds'] * 1000:8.1f} ms   (mean, Flower strategy, encode, hash, sign, store)"
    )
    print(f"  numpy sum floor          {floor * 1000:8.1f} ms   (same vectors, in memory, this process)")
    print(f"  ratio                    {agg / floor:8.2f} x   (target <= 3x)")
    print(
        f"  uploads -> new version   {wall:8.2f} s    (all {args.devices} uploads over loopback HTTP, {args.upload_threads} at a time)"
    )
    print(
        json.dumps(
            {
                "devices": args.devices,
                "params": results[0]["params"],
                "aggregation_seconds": agg,
                "floor_seconds": floor,
                "ratio": agg / floor,
                "upload_to_version_seconds": wall,
                "rounds": results,
            }
        )
    )


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
