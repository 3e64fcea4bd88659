"""The coordinator's CPU per request, by kind of request: the floor under bench/secagg.py's per-message figure.

One coordinator process (SQLite, default settings, no job) and, in this process, clients on threads:

- ``health``: ``GET /v1/health``, FastAPI's floor here (one sync route, one ``SELECT 1``);
- ``checkin``: a signed ``POST /v1/device/checkin`` that does not wait (signature check, nonce insert,
  the device's rounds read, ``last_seen`` written at most once a second);

each sequentially (one client) and from ``--concurrent`` clients at once. Printed per row: the coordinator's
user and system CPU per request (``/proc/PID/stat``) and the wall time per request. The clients share the
machine with the coordinator, so compare rows of one invocation, not machines.

    python bench/request_cost.py [--requests 2000] [--concurrent 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.coordinator_process import bootstrap_admin, start_coordinator  # noqa: E402


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(pid: int, calls: list[Callable[[], None]], per_client: int) -> dict[str, float]:
    """Run ``per_client`` requests from each client at once; the coordinator's CPU and the wall per request."""
    for call in calls:
        for _ in range(min(50, per_client)):  # warm: connections, caches
            call()
    u0, s0 = cpu_split(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda c=c: [c() for _ in range(per_client)]) for c in calls]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    u1, s1 = cpu_split(pid)
    n = per_client * len(calls)
    return {
        "requests": n,
        "clients": len(calls),
        "user_cpu_ms": 1000 * (u1 - u0) / n,
        "system_cpu_ms": 1000 * (s1 - s0) / n,
        "cpu_ms": 1000 * ((u1 - u0) + (s1 - s0)) / n,
        "wall_ms": 1000 * wall / n,
    }


def main(argv: list[str] | None = None) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.demo import free_port, wait_healthy
    from shared.signing import b64e, public_key_bytes, sign_request

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per row")
    ap.add_argument("--concurrent", type=int, default=50, help="clients at once in the concurrent rows")
    args = ap.parse_args(argv)
    print(
        f"# {platform.node()} cpus={os.cpu_count()} python={platform.python_version()} load={os.getloadavg()}"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="aicfl-bench-requests-") as tmp:
        data = Path(tmp) / "coord"
        token = bootstrap_admin(data, env)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_coordinator(data, port, Path(tmp) / "server.log", env, "--log-level", "warning")
        try:
            wait_healthy(url, server)
            op = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
            n_dev = max(1, args.concurrent)
            tokens = op.post("/v1/enrollment-tokens", json={"count": n_dev, "ttl_seconds": 600}).json()[
                "tokens"
            ]

            def device(enroll_token: str) -> Callable[[], None]:
                key = Ed25519PrivateKey.generate()
                http = httpx.Client(base_url=url)
                resp = http.post(
                    "/v1/enroll", json={"token": enroll_token, "public_key": b64e(public_key_bytes(key))}
                )
                device_id = resp.json()["device_id"]

                def checkin() -> None:
                    headers = sign_request(key, device_id, "POST", "/v1/device/checkin", b"{}")
                    headers["Content-Type"] = "application/json"
                    r = http.post("/v1/device/checkin", content=b"{}", headers=headers)
                    if r.status_code != 200:
                        raise RuntimeError(f"check-in: HTTP {r.status_code}: {r.text[:200]}")

                return checkin

            def health() -> Callable[[], None]:
                http = httpx.Client(base_url=url)
                return lambda: http.get("/v1/health").raise_for_status()

            devices = [device(t) for t in tokens]
            rows = {
                "health, 1 client": measure(server.pid, [health()], args.requests),
                f"health, {n_dev} clients": measure(
                    server.pid, [health() for _ in range(n_dev)], max(1, args.requests // n_dev)
                ),
                "checkin, 1 client": measure(server.pid, devices[:1], args.requests),
                f"checkin, {n_dev} clients": measure(server.pid, devices, max(1, args.requests // n_dev)),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(rows))
    print("| request | coordinator CPU per request (user + system) | wall per request |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['cpu_ms']:.2f} ms ({r['user_cpu_ms']:.2f} + {r['system_cpu_ms']:.2f}) "
            f"| {r['wall_ms']:.2f} ms |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
