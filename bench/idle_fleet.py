#!/usr/bin/env python3
"""What an idle fleet costs the coordinator, and how fast a new round still gathers its cohort.

One invocation, on this machine's loopback:

1. bootstrap a data folder and enroll N devices straight into its database (each with its own
   Ed25519 key: the requests below are signed and checked like any agent's);
2. for each way of checking in, start a real coordinator (``python -m server server start``) and
   run N devices in one asyncio process, each on its own connection (a tiny HTTP/1.1 client over
   asyncio streams: httpx's pool is slow at thousands of connections), that check in and wait as
   they are told:

   - ``old``: the behaviour before long polls: no hold, ``retry_after`` 2 s (``AICFL_LONG_POLL=0``,
     ``AICFL_IDLE_RETRY=2``), run with ``--old-devices`` (400): neither a 2-core generator nor the
     coordinator sustains 10,000 devices at 2 s; N devices cost N times what each one does;
   - ``long poll``: the defaults: each device sends ``wait: 55`` and is held until it has a task or
     the hold ends (49.5 to 55 s);
   - ``old agents, new coordinator`` (``--old-agents``): devices that do not send ``wait`` against
     the defaults: ``retry_after`` 60 s ±10 % while no job could select them;

3. count the check-ins over a window once every device has started (requests a second, each
   device's mean time between check-ins, and the coordinator's CPU), then submit a job and time,
   from the submit, until every device of its first round's cohort has been told its task, against
   the job's selection timeout.

Nothing is recorded: the figures go to stdout (BENCHMARKS.md keeps them with the command).
Usage: ``python bench/idle_fleet.py [--devices 10000] [--window 60] [--target 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from sqlalchemy import create_engine, insert  # noqa: E402

from bench import coordinator_process  # noqa: E402
from coordinator.models import Device  # noqa: E402
from server.demo import free_port  # noqa: E402
from shared.signing import b64e, public_key_bytes, sign_request  # noqa: E402

PATH = "/v1/device/checkin"
SPEC: dict[str, Any] = {
    "name": "idle-fleet",
    "rounds": 1,
    "secure": False,
    "data": {
        "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical"}],
        "target": "y",
        "task": "binary",
    },
}
OLD = "old (2 s retry)"
MODES: dict[str, tuple[dict[str, str], float, float]] = {
    # mode: (coordinator environment, the devices' wait, one cycle: the devices' first check-ins are
    # spread over it, so that the window counted is the steady state)
    OLD: ({"AICFL_LONG_POLL": "0", "AICFL_IDLE_RETRY": "2", "AICFL_POLL_RETRY": "2"}, 0.0, 2.0),
    "long poll (defaults)": ({}, 55.0, 55.0),
    "old agents, new coordinator": ({}, 0.0, 60.0),
}


@dataclass
class Fleet:
    """N devices checking in; what they were answered, and when."""

    ids: list[str]
    keys: list[Ed25519PrivateKey]
    port: int
    wait: float
    sent: list[float] = field(default_factory=list)  # monotonic times of check-ins sent
    cycles: list[tuple[float, float]] = field(default_factory=list)  # (sent at, since the device's last)
    answered: list[float] = field(default_factory=list)  # monotonic times of answered check-ins
    errors: dict[str, int] = field(default_factory=dict)
    started: int = 0
    tasks: dict[str, float] = field(default_factory=dict)  # device -> when it was first told a task
    checked_in: set[str] = field(default_factory=set)
    stop: bool = False

    async def run_device(self, i: int, start_delay: float) -> None:
        await asyncio.sleep(start_delay)
        self.started += 1
        device_id, key = self.ids[i], self.keys[i]
        body = json.dumps({"wait": self.wait} if self.wait else {}).encode()
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        last = 0.0
        while not self.stop:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                headers = sign_request(key, device_id, "POST", PATH, body)
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                writer.write(
                    (
                        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n{head}\r\n"
                    ).encode()
                    + body
                )
                await writer.drain()
                now = time.monotonic()
                self.sent.append(now)
                if last:
                    self.cycles.append((now, now - last))
                last = now
                status, payload, keep = await _response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                self.errors[type(err).__name__] = self.errors.get(type(err).__name__, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(1.0 + secrets.randbelow(1000) / 1000)
                continue
            if not keep:
                writer.close()
                reader = writer = None
            if self.stop:
                break
            self.answered.append(time.monotonic())
            if status != 200:
                self.errors[str(status)] = self.errors.get(str(status), 0) + 1
                await asyncio.sleep(1.0)
                continue
            self.checked_in.add(device_id)
            answer = json.loads(payload)
            if answer.get("task") is not None:
                self.tasks.setdefault(device_id, time.monotonic())
                break  # a bench device does not work: it has been told, which is what is timed
            await asyncio.sleep(float(answer["retry_after"]))
        if writer is not None:
            writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    length, keep = 0, True
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value.strip())
        elif name.lower() == "connection" and value.strip().lower() == "close":
            keep = False
    return status, await reader.readexactly(length), keep


def enroll(db_url: str, n: int) -> tuple[list[str], list[Ed25519PrivateKey]]:
    """N devices straight into the database, each with its own key (as enrollment would leave them)."""
    keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    ids = [f"dev-{secrets.token_hex(6)}" for _ in range(n)]
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            insert(Device),
            [
                {"id": d, "name": f"bench-{i}", "public_key": b64e(public_key_bytes(k)), "platform": "bench"}
                for i, (d, k) in enumerate(zip(ids, keys, strict=True))
            ],
        )
    engine.dispose()
    return ids, keys


def start_coordinator(data_dir: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    proc = coordinator_process.start_coordinator(data_dir, port, log, env)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the coordinator did not start; see {log}")


async def measure(
    mode: str, args: argparse.Namespace, data_dir: Path, token: str, ids: list[str], keys: list[Any]
) -> dict[str, Any]:
    extra, wait, cycle = MODES[mode]
    if mode == OLD:
        ids, keys = ids[: args.old_devices], keys[: args.old_devices]
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    proc = start_coordinator(data_dir, port, env, data_dir.parent / "server.log")
    fleet = Fleet(ids, keys, port, wait)
    n = len(ids)
    try:
        began = time.monotonic()
        tasks = [asyncio.create_task(fleet.run_device(i, cycle * i / n)) for i in range(n)]
        while fleet.started < n:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        window = args.old_window if mode == OLD else args.window
        t0, cpu0 = time.monotonic(), coordinator_process.cpu_seconds(proc.pid)
        await asyncio.sleep(window)
        t1, cpu1 = time.monotonic(), coordinator_process.cpu_seconds(proc.pid)
        sent = sum(1 for t in fleet.sent if t0 <= t <= t1) / (t1 - t0)
        gaps = [gap for t, gap in fleet.cycles if t0 <= t <= t1]
        mean_cycle = sum(gaps) / len(gaps) if gaps else float("nan")
        served = sum(1 for t in fleet.answered if t0 <= t <= t1) / (t1 - t0)
        cpu = (cpu1 - cpu0) / (t1 - t0)
        print(f"  {mode}: {len(fleet.checked_in)} answered at least once; counted {window:.0f} s", flush=True)
        # A new job: from its submit to the last of its first cohort told its task.
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"})
        spec = {
            **SPEC,
            "cohort": {
                "target": args.target,
                "minimum": 2,
                "selection_timeout": args.selection_timeout,
                "stage_timeout": 120,
            },
        }
        submitted = time.monotonic()
        job = api.post("/v1/jobs", json=spec, timeout=60).json()
        gather = float("nan")
        limit = submitted + args.gather_limit
        while time.monotonic() < limit:
            if len(fleet.tasks) >= args.target:
                gather = max(fleet.tasks.values()) - submitted
                break
            await asyncio.sleep(0.05)
        told = len(fleet.tasks)
        api.post(f"/v1/jobs/{job['id']}/cancel", timeout=60)
        fleet.stop = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "mode": mode,
        "devices": n,
        "online": len(fleet.checked_in),
        "mean_cycle": mean_cycle,
        "per_device": 1.0 / mean_cycle,
        "sent": sent,
        "served": served,
        "seconds": time.monotonic() - began,
        "cpu": cpu,
        "window": window,
        "errors": fleet.errors,
        "gather": gather,
        "told": told,
    }


async def main_async(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the coordinator inherits it
    if args.devices + 200 > hard:
        print(
            f"this machine allows {hard} open files per process: measuring {hard - 200} devices, not"
            f" {args.devices} (the load generator is the limit)"
        )
        args.devices = hard - 200
    root = Path(tempfile.mkdtemp(prefix="aicfl-idle-fleet-"))
    data_dir = root / "server"
    token = coordinator_process.bootstrap_admin(data_dir)
    started = time.monotonic()
    ids, keys = enroll(f"sqlite:///{data_dir / 'coordinator.db'}", args.devices)
    print(f"{args.devices} devices enrolled in {time.monotonic() - started:.1f} s; data under {root}")
    modes = list(MODES) if args.old_agents else list(MODES)[:2]
    rows = []
    for mode in modes:
        row = await measure(mode, args, data_dir, token, ids, keys)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        f"| check-ins | devices run | each device checks in every | so {args.devices} idle devices cost |"
        f" measured req/s | coordinator CPU | errors | cohort of {args.target} told after | selection timeout |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cost = f"{r['per_device'] * args.devices:.0f} req/s"
        gather = (
            f"{r['gather']:.2f} s"
            if r["gather"] == r["gather"]
            else f"> {args.gather_limit:.0f} s ({r['told']} told)"
        )
        print(
            f"| {r['mode']} | {r['devices']} | {r['mean_cycle']:.2f} s | {cost} | {r['sent']:.0f} sent,"
            f" {r['served']:.0f} answered (over {r['window']:.0f} s) | {r['cpu'] * 100:.0f} % of a core |"
            f" {sum(r['errors'].values())} | {gather} |"
            f" {args.selection_timeout:.0f} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds counted (long polls: one hold or more)"
    )
    parser.add_argument(
        "--old-window", type=float, default=20.0, help="seconds counted for the old behaviour"
    )
    parser.add_argument(
        "--old-devices",
        type=int,
        default=400,
        help="devices run the old way (a 2-core machine cannot generate, nor a coordinator serve, 10,000 at 2 s)",
    )
    parser.add_argument("--target", type=int, default=100, help="the new job's cohort target")
    parser.add_argument("--selection-timeout", type=float, default=10.0)
    parser.add_argument("--gather-limit", type=float, default=75.0, help="longest wait for the cohort")
    parser.add_argument(
        "--old-agents", action="store_true", help="also: agents without wait, new coordinator"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
