"""One SecAgg+ round four ways: aicfl in simulation mode, aicfl over loopback HTTP, Flower, numpy's floor.

For each ``DEVICESxPARAMS`` row and each dropout fraction (devices that drop
out after their masked input: their input is in the sum, they never answer
the unmask stage), in one invocation (before each engine's run the script
waits, up to 30 s, for the CPUs to be mostly idle, so that what the previous
run left exiting, such as Ray's daemons after a Flower run, is not timed):

1. **aicfl, simulation mode**: ``server.simulate.simulate`` (the coordinator
   engine and the devices' SecAgg+ code in one process, the devices of each
   stage on a thread per CPU, no HTTP, a virtual clock instead of waiting out
   a deadline), in a fresh child process.
   ``round_seconds``, ``coordinator_cpu_seconds``, ``client_cpu_seconds`` (per
   device) and ``exact`` come from it unchanged.
2. **aicfl over loopback HTTP**: a real coordinator process
   (``python -m server admin bootstrap`` then ``server start``, SQLite,
   the default tick interval, ``AICFL_ACTIVE_RETRY=0.1``) and the devices in
   ``--workers`` separate OS processes, each hosting its share of the devices
   in threads. Every device has its own Ed25519 key, enrolls with a one-time
   token from the operator API, long-polls ``/v1/device/checkin`` as the
   agent does (``wait``: the coordinator holds the request until the device
   owes a message; after its masked input a device holds 2 s and then asks
   once without a hold whether it is still in a running round), sends each
   stage's message with ``?wait`` and takes its next task from the answer
   (``next``) instead of checking in, and speaks the SecAgg+ stages as
   ``tests/integration/test_secure_http.py`` does: configure (it downloads the
   model and checks its signature, as the agent does), statistics input,
   advertise_keys, share_keys, masked_input (a synthetic float32 update of the
   model's size, uniform as the simulation's, quantised, weighted and masked
   in place as the agent does, in the binary uint64 codec), unmask. Each
   device's HTTP client drops idle connections after 2 s, before the
   server's 5 s keep-alive does. A device that is done with the training
   round (it answered unmask, or the coordinator says it is in no running
   round any more: the round ended before it was asked to unmask) stops
   polling; a dropping device stops after its masked input. The job: one training round
   of an MLP on 2 numeric features sized by ``server.simulate.hidden_for``,
   ``secure`` left at its default (true), the same SecAgg+ settings as the
   simulation, ``cohort.target = devices``, ``cohort.minimum = devices -
   dropped``.

   Figures, all from the coordinator's own records where they exist:
   ``round_seconds`` is the training round's ``ended_at - started_at`` (from
   the round's opening, configure stage and model download included, to the
   new model version); ``active_round_seconds`` leaves out the idle wait for
   the dropped devices: ``last unmask message - started_at`` plus the round's
   ``finalize_seconds`` (the ``created_at`` of the round's messages is read
   from the coordinator's SQLite file after the round);
   ``advertise_to_version_seconds`` is the same from the last configure
   message (the start of advertise_keys, where Flower's measurement starts).
   The unmask stage of a dropout row waits out its ``stage_timeout``, which is
   600 s for rows without dropout and, for dropout rows, three times the
   slowest stage of the same row without dropout plus 5 s (at least 10 s).
   ``coordinator_cpu_seconds``: utime + stime of the server process
   (``/proc/PID/stat``) from the moment the training round is seen opened
   (this script polls ``GET /v1/jobs/{id}/rounds`` every 20 ms until then, every
   100 ms after) to its end, idle wait included; ``coordinator_cpu_to_last_
   unmask`` stops when the last device reported done. ``client_cpu_seconds``:
   each worker process's CPU time from its first training-round task to its
   last device being done (polling, HTTP, signing, synthetic update included),
   summed over workers and divided by the devices; ``client_stage_cpu_seconds``
   counts only the stage handlers' thread time (SecAgg+ work, encoding, the
   request itself), without generating the synthetic update.
   ``coordinator_peak_rss_mb``: the server's ``VmHWM`` at the end of the row
   (a fresh coordinator per row). ``exact``: the new version minus version 0
   against the plain mean of the clipped updates, within the quantisation
   bound.
3. **Flower**: ``bench.flower_secagg.run_flower`` (flwr 1.42's
   SecAggPlusWorkflow and secaggplus_mod in its simulation engine), in a fresh
   child process; see that module for what it measures.
4. **The plaintext floor**: a numpy sum, in memory, of as many uint64 vectors
   of ``params + 1`` values as devices (what the coordinator adds), and of
   float32 vectors of ``params`` values; best of 5.

Plus, once, the **agent's memory at 1e6 parameters**: a child process plays
one device's advertise, share_keys, masked_input (synthetic update,
quantisation, masking, encoding) and unmask with its k neighbours (the
neighbours only advertise and share keys) and reports its peak RSS
(``ru_maxrss``) next to the RSS after imports.

    python bench/secagg.py [--rows 10x100000,50x100000] [--dropouts 0,0.1]
                           [--skip-sim] [--skip-http] [--skip-flower] [--json-out FILE]

Prints one JSON line per measurement as it goes, then the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.coordinator_process import bootstrap_admin  # noqa: E402

DEFAULT_ROWS = "10x100000,50x100000,100x100000,50x1000000,100x1000000"
CLIP = 0.5
BITS = 16
EXAMPLES = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
SPAWN = mp.get_context("spawn")
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "AICFL_ACTIVE_RETRY": "0.1",
}
# Seconds a device lets the coordinator hold its check-in (the agent's long poll, AICFL_AGENT_WAIT), and
# once it has sent its masked input (it may never be asked to unmask, and then stops).
HOLD = 30.0
HOLD_TRAINED = 2.0


# --------------------------------------------------------------------------- helpers


def _in_child(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a fresh spawned process (own memory, own CPU clock); re-raise its error here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=SPAWN) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def _proc_status_kb(pid: int, key: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _parse_rows(text: str) -> list[tuple[int, int]]:
    rows = []
    for part in text.split(","):
        d, p = part.strip().lower().split("x")
        rows.append((int(float(d)), int(float(p))))
    return rows


def _dropped(devices: int, dropout: float) -> set[int]:
    """A deterministic round(dropout * devices) device indices, spread evenly (as bench/flower_secagg.py)."""
    n = int(round(dropout * devices))
    return {(i * devices) // n for i in range(n)} if n > 0 else set()


def _secagg_dropout(devices: int, n_drop: int) -> float:
    """The job's tolerated dropout, as server.simulate sets it (so both give the same k and t)."""
    return max(0.1, n_drop / devices + 0.05) if n_drop else 0.1


def _neighbours(devices: int, tolerate: float | None) -> tuple[int | None, int | None]:
    """SecAgg+'s k and t for every engine when ``--tolerate`` pins the tolerated dropout, else (None, None):
    each engine derives them from the job's default (the same rule, so the same values)."""
    if tolerate is None:
        return None, None
    from shared.secagg.params import derive_params

    p = derive_params(devices, dropout=tolerate)
    return p.k, p.t


def _db_time(text: str) -> float:
    """A timestamp as SQLAlchemy stores it in SQLite (UTC, no zone), as a Unix time."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- 1. simulation mode


def run_sim(devices: int, params: int, dropout: float, tolerate: float | None = None) -> dict[str, Any]:
    from server.simulate import simulate

    k, t = _neighbours(devices, tolerate)
    out = simulate(devices=devices, params=params, dropout=dropout, drop_after="masked_input", k=k, t=t)
    return {"engine": "aicfl-sim", "dropout": dropout, **out}


# --------------------------------------------------------------------------- 4. plaintext floor


def run_floor(devices: int, numel: int, repeat: int = 5) -> dict[str, Any]:
    rng = np.random.default_rng(0)

    def best(vectors: list[np.ndarray]) -> float:
        out = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            acc = np.zeros_like(vectors[0])
            for v in vectors:
                acc += v
            out = min(out, time.perf_counter() - t0)
        return out

    u64 = [rng.integers(0, 2**64 - 1, numel + 1, dtype=np.uint64, endpoint=True) for _ in range(devices)]
    floor_u64 = best(u64)
    del u64
    f32 = [rng.random(numel, dtype=np.float32) for _ in range(devices)]
    floor_f32 = best(f32)
    del f32
    return {
        "engine": "numpy-floor",
        "devices": devices,
        "params": numel,
        "uint64_seconds": floor_u64,
        "float32_seconds": floor_f32,
    }


# --------------------------------------------------------------------------- 3. Flower


def _cpu_busy(seconds: float) -> float:
    """The machine's busy fraction of CPU time over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def settle(limit: float = 30.0, busy: float = 0.25) -> float:
    """Wait (up to ``limit`` s) until the CPUs are mostly idle: what the previous engine's run left
    behind (Ray's daemons exiting after a Flower run, a coordinator's shutdown) must not be timed
    in the next one. Returns the seconds waited."""
    t0 = time.monotonic()
    if not os.path.exists("/proc/stat"):
        return 0.0
    while _cpu_busy(0.5) > busy and time.monotonic() - t0 < limit:
        pass
    return time.monotonic() - t0


def run_flower_child(
    devices: int, params: int, dropout: float, tolerate: float | None = None
) -> dict[str, Any]:
    from bench.flower_secagg import run_flower

    return run_flower(devices, params, dropout, tolerate=tolerate)


# --------------------------------------------------------------------------- agent memory


def agent_memory(n_params: int, cohort: int) -> dict[str, Any]:
    """Peak RSS of one device's four SecAgg+ stages at ``n_params`` parameters (run in a fresh process)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared import codec
    from shared.secagg.params import derive_params
    from shared.secagg.protocol import SecAggClient, weighted_input
    from shared.wire import masked_input_header

    def status_mb(key: str) -> float:
        return (_proc_status_kb(os.getpid(), key) or 0) / 1024

    params = derive_params(cohort, clip=CLIP, bits=BITS)
    ids = [f"device-{i:03d}" for i in range(params.k + 1)]  # me and my k neighbours: a complete graph
    keys = {d: Ed25519PrivateKey.generate() for d in ids}
    public = {d: k.public_key() for d, k in keys.items()}

    def verify(who: str, message: bytes, signature: bytes) -> bool:
        public[who].verify(signature, message)
        return True

    clients = {d: SecAggClient(d, b"bench/agent-memory", params, keys[d].sign) for d in ids}
    after_imports = status_mb("VmRSS")
    peak_before = status_mb("VmHWM")
    try:  # reset the peak (VmHWM) so that it measures the round alone; ru_maxrss survives exec, VmHWM does not
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    me, others = ids[0], ids[1:]
    cpu: dict[str, float] = {}
    t0 = time.process_time()
    adv = {d: clients[d].advertise() for d in ids}
    cpu["advertise"] = (time.process_time() - t0) / len(ids)
    cts = {}
    for d in ids:
        t0 = time.process_time()
        cts[d] = clients[d].share_keys({v: adv[v] for v in ids if v != d}, verify)
        if d == me:
            cpu["share_keys"] = time.process_time() - t0
    rng = np.random.default_rng(0)
    update = rng.normal(0, CLIP / 4, n_params).astype(np.float32)
    t0 = time.process_time()
    x = weighted_input(update, EXAMPLES, params, rng)
    y = clients[me].masked_input(x, {v: cts[v][me] for v in others}, in_place=True)  # as the agent does
    body = codec.encode(masked_input_header(1), y)
    cpu["masked_input"] = time.process_time() - t0
    size = len(body)
    del update, x, y, body
    t0 = time.process_time()
    clients[me].unmask(set(others), set())
    cpu["unmask"] = time.process_time() - t0
    return {
        "engine": "agent-memory",
        "params": n_params,
        "k": params.k,
        "t": params.t,
        "rss_after_imports_mb": after_imports,
        "peak_rss_mb": status_mb("VmHWM"),
        "peak_rss_before_round_mb": peak_before,
        "peak_reset": reset,
        "round_peak_increase_mb": status_mb("VmHWM") - after_imports,
        "masked_body_bytes": size,
        "cpu_seconds": cpu,
    }


# --------------------------------------------------------------------------- 2. over loopback HTTP


class _HttpDevice:
    """One device speaking the agent's wire protocol (as tests/integration/test_secure_http.py's drive())."""

    def __init__(self, url: str, token: str, drop: bool, seed: int):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from shared.signing import b64e, load_public_key, public_key_bytes

        self.key = Ed25519PrivateKey.generate()
        # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive closes them: otherwise a
        # device that computes for about 5 s may send its masked input on a connection the server is
        # closing and lose it (httpx's default expiry is 5 s too).
        self.http = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(keepalive_expiry=2.0))
        resp = self.http.post(
            "/v1/enroll", json={"token": token, "public_key": b64e(public_key_bytes(self.key))}
        )
        resp.raise_for_status()
        self.id = resp.json()["device_id"]
        self.coordinator_key = load_public_key(resp.json()["coordinator_public_key"])
        self.drop = drop
        self.rng = np.random.default_rng(seed)
        self.client: Any = None
        self.numel = 0
        self.stage_cpu: dict[str, float] = {}
        self.errors: list[str] = []
        self.sent: set[tuple[int, str]] = set()
        self.trained = False  # sent (or tried to send) its masked input of the training round

    def call(
        self, method: str, path: str, body: bytes = b"", ctype: str = "application/json"
    ) -> httpx.Response:
        from shared.signing import sign_request

        headers = sign_request(self.key, self.id, method, path, body)
        if body:
            headers["Content-Type"] = ctype
        resp = self.http.request(method, path, content=body, headers=headers)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp


def _device_loop(d: _HttpDevice, stop: Any, shared: dict[str, Any]) -> None:
    """Poll and answer every stage until this device is done with the training round."""
    import base64

    from shared import codec
    from shared.secagg import statistics as secagg_statistics
    from shared.secagg.params import SecAggParams
    from shared.secagg.protocol import SecAggClient, weighted_input
    from shared.signing import identity_verifier, verify_model
    from shared.wire import masked_input_header

    def mark_train_start() -> None:
        with shared["lock"]:
            if shared["cpu_start"] is None:
                shared["cpu_start"] = time.process_time()

    answered: dict[str, Any] | None = None  # the next check-in's answer, carried by a stage's (?wait)
    while not stop.is_set():
        try:
            # As the agent does: the coordinator holds the check-in (or the stage message sent with
            # ?wait) until the device owes a message. Once the device sent its masked input it holds
            # shorter, then asks once without a hold whether it is still in a running round (a hold's
            # answer does not say), so that it can stop.
            wait = HOLD_TRAINED if d.trained else HOLD
            if answered is not None:
                resp, answered = answered, None
            else:
                resp = d.call("POST", "/v1/device/checkin", json.dumps({"wait": wait}).encode()).json()
            if resp.get("task") is None and d.trained:
                resp = d.call("POST", "/v1/device/checkin", b"{}").json()
        except Exception as err:  # noqa: BLE001 - report and keep polling
            d.errors.append(f"checkin: {err}")
            stop.wait(0.5)
            continue
        t = resp.get("task")
        retry = float(resp.get("retry_after", 0.1))
        if t is None and d.trained and retry > float(ENV["AICFL_ACTIVE_RETRY"]):
            # The coordinator says this device is in no running round any more: the training round ended
            # before it was asked to unmask (every secret already had t shares).
            return
        if t is None or (t["round_id"], t["stage"]) in d.sent:
            stop.wait(retry)
            continue
        stage, kind = t["stage"], t["kind"]
        d.sent.add((t["round_id"], stage))
        if kind == "train":
            mark_train_start()
        path = f"/v1/device/rounds/{t['round_id']}/{stage}"
        info = t.get("secagg") or {}

        def post(
            body: bytes, ctype: str = "application/json", last: bool = False, path: str = path
        ) -> dict[str, Any] | None:
            """The stage's message; unless it is the device's last, asking for its next task (?wait)."""
            if last:
                d.call("POST", path, body, ctype)
                return None
            hold = HOLD_TRAINED if d.trained else HOLD
            answer: dict[str, Any] = d.call("POST", f"{path}?wait={hold:g}", body, ctype).json()
            return answer.get("next")

        c0 = time.thread_time()
        try:
            if stage == "configure":
                if kind == "train":
                    ref = t["model"]
                    mpath = f"/v1/device/jobs/{t['job_id']}/models/{ref['version']}"
                    blob = d.call("GET", mpath).content
                    verify_model(
                        d.coordinator_key, t["job_id"], ref["version"], blob, ref["sha256"], ref["signature"]
                    )
                    _, vec = codec.decode(blob)
                    d.numel = int(vec.size)
                    del blob, vec
                msg: dict[str, Any] = {"accepted": True, "rows": EXAMPLES}
                if kind == "stats":  # the statistics round is secure too: value sets go at configure
                    msg["vocabulary"] = shared["vocabulary"]
                answered = post(json.dumps(msg).encode())
            elif stage == "input":  # a statistics round without secure aggregation (secure = false)
                answered = post(json.dumps({"statistics": shared["stats"]}).encode())
            elif stage == "advertise_keys":
                d.client = SecAggClient(
                    d.id, base64.b64decode(info["context"]), SecAggParams(**info["params"]), d.key.sign
                )
                answered = post(json.dumps(d.client.advertise()).encode())
            elif stage == "share_keys":
                cts = d.client.share_keys(info["neighbours"], identity_verifier(info["identity_keys"]))
                answered = post(json.dumps({"ciphertexts": cts}).encode())
            elif stage == "masked_input" and kind == "stats":
                x = secagg_statistics.encode(shared["stats"], shared["schema"], info["vocabulary"])
                y = d.client.masked_input(x, info["ciphertexts"])
                header = masked_input_header(t["round_id"])
                answered = post(codec.encode(header, y), "application/octet-stream")
            elif stage == "masked_input":
                d.trained = True
                g0 = time.thread_time()
                # Stands in for training: uniform in [-1.1 clip, 1.1 clip), drawn as server.simulate and
                # bench/flower_secagg.py's clients draw theirs; not counted as SecAgg+ work.
                update = d.rng.random(d.numel, dtype=np.float32)
                update -= np.float32(0.5)
                update *= np.float32(2.2 * CLIP)
                c0 += time.thread_time() - g0
                x = weighted_input(
                    update,
                    EXAMPLES,
                    d.client.params,
                    np.random.default_rng(int.from_bytes(os.urandom(8), "little")),
                )
                y = d.client.masked_input(x, info["ciphertexts"], in_place=True)  # as the agent does
                header = masked_input_header(t["round_id"])
                body = codec.encode(header, y)
                del x, y
                answered = post(body, "application/octet-stream", last=d.drop)
                del body
                with shared["lock"]:  # the plain sum of what went in, to check the new version against
                    clipped = np.clip(update, -CLIP, CLIP).astype(np.float64)
                    if shared["plain_sum"] is None:
                        shared["plain_sum"] = clipped
                    else:
                        shared["plain_sum"] += clipped
                    shared["plain_count"] += 1
                del update
            elif stage == "unmask":
                me = {d.id}
                shares = d.client.unmask(set(info["survivors"]) - me, set(info["dropped"]) - me)
                answered = post(json.dumps({"shares": shares}).encode(), last=kind == "train")
        except Exception as err:  # noqa: BLE001 - report; the coordinator decides what it means
            d.errors.append(f"{kind}/{stage}: {type(err).__name__}: {err}")
        if kind == "train":
            d.stage_cpu[stage] = d.stage_cpu.get(stage, 0.0) + time.thread_time() - c0
            if stage == "unmask" or (stage == "masked_input" and d.drop):
                return


def _http_worker(index: int, url: str, tokens: list[str], drops: list[bool], q: Any, stop: Any) -> None:
    """A worker process hosting some devices in threads; reports its CPU time around the training round."""
    try:
        import pandas as pd

        from server.simulate import SCHEMA
        from shared.jobspec import DataSchema
        from shared.secagg import statistics as secagg_statistics
        from shared.tabular import local_statistics

        rng = np.random.default_rng(index)
        frame = pd.DataFrame(
            {"a": rng.normal(size=32), "b": rng.normal(size=32), "y": rng.integers(0, 2, 32).astype(str)}
        )
        schema = DataSchema.model_validate(SCHEMA)
        stats = local_statistics(frame, schema)
        devs = [
            _HttpDevice(url, tok, drop, seed=1000 * index + i)
            for i, (tok, drop) in enumerate(zip(tokens, drops, strict=True))
        ]
        shared: dict[str, Any] = {
            "lock": threading.Lock(),
            "cpu_start": None,
            "stats": stats,
            "schema": schema,
            "vocabulary": secagg_statistics.vocabulary(stats, schema),
            "plain_sum": None,
            "plain_count": 0,
        }
        q.put(("enrolled", index, [d.id for d in devs]))
        threads = [threading.Thread(target=_device_loop, args=(d, stop, shared), daemon=True) for d in devs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        cpu_end = time.process_time()
        q.put(
            (
                "done",
                index,
                {
                    "devices": len(devs),
                    "cpu_seconds": cpu_end - shared["cpu_start"] if shared["cpu_start"] is not None else None,
                    "stage_cpu": [d.stage_cpu for d in devs],
                    "errors": [e for d in devs for e in d.errors],
                    "plain_sum": shared["plain_sum"],
                    "plain_count": shared["plain_count"],
                    "peak_rss_mb": (_proc_status_kb(os.getpid(), "VmHWM") or 0) / 1024,
                },
            )
        )
    except Exception:  # noqa: BLE001
        q.put(("error", index, traceback.format_exc()))


def _db_rounds(db_path: Path, job_id: int) -> list[dict[str, Any]]:
    """The job's rounds as the coordinator's SQLite file has them (read-only; WAL lets it read
    while the coordinator writes)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute(
            "SELECT number, kind, status, stage, reason FROM rounds WHERE job_id = ? ORDER BY number",
            (job_id,),
        ).fetchall()
    finally:
        db.close()
    return [dict(zip(("number", "kind", "status", "stage", "reason"), row, strict=True)) for row in rows]


def _device_requests(op: httpx.Client) -> dict[str, int]:
    """Device requests the coordinator has answered, by route, from its /metrics."""
    out: dict[str, int] = {}
    for line in op.get("/metrics").text.splitlines():
        m = re.match(
            r'aicfl_http_requests_total\{route="(/v1/device/[^"]*)",status="[^"]*"\} ([0-9.e+]+)', line
        )
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(2)))
    return out


def _wait(pred: Any, timeout: float, what: str, interval: float) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_http(
    devices: int,
    params: int,
    dropout: float,
    stage_timeout: float,
    workers: int = 4,
    timeout: float = 1800.0,
    tolerate: float | None = None,
) -> dict[str, Any]:
    from server.demo import free_port
    from server.simulate import SCHEMA, hidden_for
    from shared import codec
    from shared.secagg.quantize import quantisation_bound

    drop = _dropped(devices, dropout)
    n_drop = len(drop)
    workers = max(1, min(workers, devices))
    tmp = Path(tempfile.mkdtemp(prefix="aicfl-bench-secagg-"))
    data = tmp / "coord"
    log_path = tmp / "server.log"
    admin = bootstrap_admin(data, ENV)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
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
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=ROOT,
        )
    q = SPAWN.Queue()
    stop = SPAWN.Event()
    procs: list[Any] = []
    op = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=120)
    out: dict[str, Any] = {
        "engine": "aicfl-http",
        "devices": devices,
        "dropout": dropout,
        "dropped": n_drop,
        "stage_timeout": stage_timeout,
        "workers": workers,
    }
    try:

        def healthy() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"coordinator exited: {log_path.read_text()[-2000:]}")
            try:
                return httpx.get(url + "/v1/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 60, "the coordinator", 0.1)
        tokens = op.post("/v1/enrollment-tokens", json={"count": devices, "ttl_seconds": 3600}).json()[
            "tokens"
        ]
        for w in range(workers):
            idx = list(range(w, devices, workers))
            p = SPAWN.Process(
                target=_http_worker,
                daemon=True,
                args=(w, url, [tokens[i] for i in idx], [i in drop for i in idx], q, stop),
            )
            p.start()
            procs.append(p)
        results: dict[int, dict[str, Any]] = {}
        enrolled = 0
        while enrolled < workers:
            kind, w, payload = q.get(timeout=300)
            if kind == "error":
                raise RuntimeError(f"worker {w}: {payload}")
            enrolled += kind == "enrolled"
        spec = {
            "name": f"bench-secagg-{devices}x{params}-{dropout}",
            "rounds": 1,
            "seed": 1,
            "data": SCHEMA,
            "model": {"zoo": "mlp", "hidden": hidden_for(params)},
            "cohort": {
                "target": devices,
                "minimum": devices - n_drop,
                "stage_timeout": stage_timeout,
                "selection_timeout": 1,
            },
            "evaluation": {"federated": False},
            "secagg": {"dropout": _secagg_dropout(devices, n_drop), "clip": CLIP, "bits": BITS},
        }
        k, t = _neighbours(devices, tolerate)
        if k is not None:
            spec["secagg"].update(k=k, t=t)
        job = op.post("/v1/jobs", json=spec)
        if job.status_code >= 400:
            raise RuntimeError(f"job refused: {job.text}")
        job_id = job.json()["id"]

        def train_round() -> dict[str, Any] | None:
            # Read from the coordinator's SQLite file, not its API: watching the round every 20 ms
            # must not cost the coordinator CPU that the figures would count as the round's.
            rounds = _db_rounds(data / "coordinator.db", job_id)
            bad = [x for x in rounds if x["kind"] == "stats" and x["status"] == "abandoned"]
            if bad:
                raise RuntimeError(f"the statistics round was abandoned: {bad[0]['reason']}")
            rs = [x for x in rounds if x["kind"] == "train"]
            return rs[0] if rs else None

        _wait(train_round, timeout, "the training round to open", 0.02)
        requests0 = _device_requests(op)
        cpu0, wall0 = _proc_cpu(server.pid), time.perf_counter()

        def past_configure() -> bool:
            tr = train_round()
            return tr is not None and (tr["stage"] != "configure" or tr["status"] != "running")

        _wait(past_configure, timeout, "the training round's configure stage to end", 0.02)
        cpu_adv = _proc_cpu(server.pid)
        cpu_done = None
        deadline = time.time() + timeout
        r: dict[str, Any] | None = None
        while time.time() < deadline:
            while not q.empty():
                kind, w, payload = q.get()
                if kind == "error":
                    raise RuntimeError(f"worker {w}: {payload}")
                if kind == "done":
                    results[w] = payload
                    if len(results) == workers:
                        cpu_done = _proc_cpu(server.pid)
            r = train_round()
            if r is not None and r["status"] != "running":
                break
            if server.poll() is not None:
                raise RuntimeError(f"coordinator exited: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            raise TimeoutError(f"the training round did not end within {timeout:.0f} s")
        cpu1 = _proc_cpu(server.pid)
        wall1 = time.perf_counter()
        requests1 = _device_requests(op)
        hwm_kb = _proc_status_kb(server.pid, "VmHWM")
        assert r is not None
        r = next(x for x in op.get(f"/v1/jobs/{job_id}/rounds").json() if x["number"] == r["number"])
        device_requests = {
            k: v - requests0.get(k, 0) for k, v in requests1.items() if v > requests0.get(k, 0)
        }
        # Workers whose devices are done report; any still running are stopped below.
        end = time.time() + 60
        while len(results) < workers and time.time() < end:
            try:
                kind, w, payload = q.get(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if kind == "done":
                results[w] = payload
            elif kind == "error":
                raise RuntimeError(f"worker {w}: {payload}")
        if cpu_done is None:
            cpu_done = cpu1

        detail = op.get(f"/v1/jobs/{job_id}/rounds/{r['number']}").json()
        statuses: dict[str, int] = {}
        for p in detail.get("devices", []):
            key = f"{p['status']}/{p['stage_done']}"
            statuses[key] = statuses.get(key, 0) + 1
        metrics = r.get("metrics") or {}
        agg = metrics.get("aggregation") or {}
        db = sqlite3.connect(data / "coordinator.db")
        try:
            rid, started, ended = db.execute(
                "SELECT id, started_at, ended_at FROM rounds WHERE job_id = ? AND kind = 'train'", (job_id,)
            ).fetchone()
            stage_times = {
                s: (_db_time(a), _db_time(b), n)
                for s, a, b, n in db.execute(
                    "SELECT stage, min(created_at), max(created_at), count(*) FROM round_messages "
                    "WHERE round_id = ? GROUP BY stage",
                    (rid,),
                )
            }
        finally:
            db.close()
        t_start = _db_time(started)
        t_end = _db_time(ended) if ended else None
        order = ["configure", "advertise_keys", "share_keys", "masked_input", "unmask"]
        stage_seconds: dict[str, float] = {}
        prev = t_start
        for s in order:
            if s in stage_times:
                stage_seconds[s] = stage_times[s][1] - prev
                prev = stage_times[s][1]
        finalize = agg.get("finalize_seconds") or 0.0
        last_unmask = stage_times.get("unmask", (None, None, 0))[1]
        last_configure = stage_times.get("configure", (None, None, 0))[1]
        out.update(
            params=None,
            status=r["status"],
            reason=r.get("reason"),
            participants=statuses,
            messages={s: v[2] for s, v in stage_times.items()},
            round_seconds=(t_end - t_start) if t_end else None,
            active_round_seconds=(last_unmask - t_start + finalize) if last_unmask else None,
            advertise_to_version_seconds=(last_unmask - last_configure + finalize)
            if last_unmask and last_configure
            else None,
            idle_wait_seconds=(t_end - last_unmask - finalize) if (t_end and last_unmask) else None,
            stage_seconds=stage_seconds,
            observed_round_seconds=wall1 - wall0,
            coordinator_cpu_seconds=(cpu1 - cpu_adv) - max(0.0, (cpu1 - cpu_done) - finalize),
            coordinator_cpu_from_advertise=cpu1 - cpu_adv,
            coordinator_cpu_whole_round=cpu1 - cpu0,
            coordinator_cpu_idle_wait=max(0.0, (cpu1 - cpu_done) - finalize),
            device_requests=device_requests,
            coordinator_cpu_per_device_request=(cpu1 - cpu0) / max(1, sum(device_requests.values())),
            coordinator_peak_rss_mb=hwm_kb / 1024 if hwm_kb else None,
            aggregation_seconds=r.get("aggregation_seconds"),
            accumulate_cpu_seconds=agg.get("accumulate_cpu_seconds"),
            finalize_seconds=agg.get("finalize_seconds"),
            unmask_seconds=metrics.get("unmask_seconds"),
        )
        cpu_total = [w["cpu_seconds"] for w in results.values() if w["cpu_seconds"] is not None]
        stage_cpu = [sc for w in results.values() for sc in w["stage_cpu"]]
        out["client_cpu_seconds"] = sum(cpu_total) / devices if cpu_total else None
        out["client_stage_cpu_seconds"] = (
            sum(sum(sc.values()) for sc in stage_cpu) / len(stage_cpu) if stage_cpu else None
        )
        out["client_stage_cpu_by_stage"] = (
            {s: sum(sc.get(s, 0.0) for sc in stage_cpu) / len(stage_cpu) for s in order} if stage_cpu else {}
        )
        out["worker_peak_rss_mb"] = max((w["peak_rss_mb"] for w in results.values()), default=None)
        errors = [e for w in results.values() for e in w["errors"]]
        if errors:
            out["device_errors"] = errors[:10]
            out["device_error_count"] = len(errors)
        if len(results) < workers:
            out["workers_unfinished"] = workers - len(results)
        # Exactness: the new version minus version 0 against the plain mean of the clipped updates.
        sums = [w["plain_sum"] for w in results.values() if w["plain_sum"] is not None]
        count = sum(w["plain_count"] for w in results.values())
        if r["status"] == "completed" and sums and count:
            v0 = codec.decode(op.get(f"/v1/jobs/{job_id}/models/0/blob").content)[1].astype(np.float64)
            v1 = codec.decode(op.get(f"/v1/jobs/{job_id}/models/1/blob").content)[1].astype(np.float64)
            out["params"] = int(v0.size)
            plain = np.sum(sums, axis=0) / count
            err = float(np.max(np.abs((v1 - v0) - plain)))
            bound = quantisation_bound(CLIP, BITS) + 1e-6
            out.update(max_abs_error=err, exact=bool(err <= bound), inputs_summed=count)
        else:
            out.update(max_abs_error=None, exact=False)
        return out
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        op.close()
        warnings = [
            ln
            for ln in log_path.read_text(errors="replace").splitlines()
            if "ERROR" in ln or "Traceback" in ln
        ]
        if warnings:
            out["server_log_errors"] = warnings[:5]
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


# --------------------------------------------------------------------------- the table


def _fmt(x: float | None, unit: str = "s", digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if unit == "ms":
        return f"{x * 1000:.1f} ms"
    return f"{x:.{digits}f}{' ' + unit if unit else ''}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _cell_ratio(x: float | None, need: float | None = None) -> str:
    if x is None:
        return "—"
    mark = "" if need is None else (" ✓" if x >= need else " ✗")
    return f"{x:.1f}x{mark}"


def print_tables(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        "| devices × params | dropout | aicfl sim: wall / coord CPU / client CPU per device | exact "
        "| aicfl HTTP: wall (advertise → version, no idle wait) / coord CPU / client CPU per device | exact "
        "| Flower: wall / server CPU / client CPU per device | floor uint64 / float32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, h, f, fl = (
            row.get("sim") or {},
            row.get("http") or {},
            row.get("flower") or {},
            row.get("floor") or {},
        )
        label = f"{row['devices']} × {row['params']:.0e}".replace("e+0", "e")
        sim = (
            (
                f"{_fmt(s.get('round_seconds'))} / {_fmt(s.get('coordinator_cpu_seconds'))} / "
                f"{_fmt(s.get('client_cpu_seconds'), 'ms')}"
            )
            if "round_seconds" in s
            else s.get("error", "—")
        )
        http = (
            f"{_fmt(h.get('advertise_to_version_seconds'))} / "
            f"{_fmt(h.get('coordinator_cpu_seconds'))} / {_fmt(h.get('client_cpu_seconds'), 'ms')}"
            if "round_seconds" in h
            else h.get("error", "—")
        )
        flw = (
            (
                f"{_fmt(f.get('round_seconds'))} / {_fmt(f.get('server_cpu_seconds'))} / "
                f"{_fmt(f.get('client_cpu_seconds'), 'ms')}"
            )
            if "round_seconds" in f
            else f.get("error", "—")
        )
        floor = (
            f"{_fmt(fl.get('uint64_seconds'), 'ms')} / {_fmt(fl.get('float32_seconds'), 'ms')}" if fl else "—"
        )
        print(
            f"| {label} | {row['dropout']:.0%} | {sim} | {s.get('exact', '—')} | {http} | {h.get('exact', '—')} "
            f"| {flw} | {floor} |"
        )
    print()
    print(
        "| devices × params | dropout | sim wall vs Flower (>= 3x, aim 10x) | sim coord CPU vs Flower server CPU "
        "(>= 5x) | HTTP wall vs Flower (> 1x) | HTTP coord CPU vs Flower server CPU "
        "| aggregation (sim / HTTP) | aggregation vs uint64 floor (sim / HTTP; <= 10x at 50 × 1e6) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, h, f, fl = (
            row.get("sim") or {},
            row.get("http") or {},
            row.get("flower") or {},
            row.get("floor") or {},
        )
        label = f"{row['devices']} × {row['params']:.0e}".replace("e+0", "e")
        floor_s = fl.get("uint64_seconds")
        a_s, a_h = s.get("aggregation_seconds"), h.get("aggregation_seconds")
        r_s, r_h = _ratio(a_s, floor_s), _ratio(a_h, floor_s)
        print(
            f"| {label} | {row['dropout']:.0%} "
            f"| {_cell_ratio(_ratio(f.get('round_seconds'), s.get('round_seconds')), 3)} "
            f"| {_cell_ratio(_ratio(f.get('server_cpu_seconds'), s.get('coordinator_cpu_seconds')), 5)} "
            f"| {_cell_ratio(_ratio(f.get('round_seconds'), h.get('advertise_to_version_seconds')), 1)} "
            f"| {_cell_ratio(_ratio(f.get('server_cpu_seconds'), h.get('coordinator_cpu_seconds')))} "
            f"| {_fmt(a_s, 'ms')} / {_fmt(a_h, 'ms')} "
            f"| {'—' if r_s is None else f'{r_s:.1f}x'} / {'—' if r_h is None else f'{r_h:.1f}x'} |"
        )
    print()
    print(
        "| devices × params | dropout | HTTP: whole round (configure → version) | same, no idle wait "
        "| idle wait for the dropped | stages: configure / advertise / share / masked / unmask "
        "| coord CPU, whole round | device requests | coord CPU per device request "
        "| Flower wall / whole round (>= 3x) | Flower server CPU / coord CPU, whole round (>= 5x) "
        "| coordinator peak RSS | client stage CPU per device |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        h = row.get("http") or {}
        if "round_seconds" not in h:
            continue
        fl = row.get("flower") or {}
        label = f"{row['devices']} × {row['params']:.0e}".replace("e+0", "e")
        st = h.get("stage_seconds") or {}
        stages = " / ".join(
            _fmt(st.get(k)) for k in ("configure", "advertise_keys", "share_keys", "masked_input", "unmask")
        )
        print(
            f"| {label} | {row['dropout']:.0%} | {_fmt(h.get('round_seconds'))} "
            f"| {_fmt(h.get('active_round_seconds'))} | {_fmt(h.get('idle_wait_seconds'))} | {stages} "
            f"| {_fmt(h.get('coordinator_cpu_whole_round'))} | {sum((h.get('device_requests') or {}).values())} "
            f"| {_fmt(h.get('coordinator_cpu_per_device_request'), 'ms')} "
            f"| {_fmt(_ratio(fl.get('round_seconds'), h.get('round_seconds')), 'x')} "
            f"| {_fmt(_ratio(fl.get('server_cpu_seconds'), h.get('coordinator_cpu_whole_round')), 'x')} "
            f"| {_fmt(h.get('coordinator_peak_rss_mb'), 'MB', 0)} | {_fmt(h.get('client_stage_cpu_seconds'), 'ms')} |"
        )


# --------------------------------------------------------------------------- main


def _emit(obj: dict[str, Any], sink: list[dict[str, Any]]) -> None:
    sink.append(obj)
    print(json.dumps(obj, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated DEVICESxPARAMS (1e5 accepted)")
    ap.add_argument(
        "--dropouts", default="0,0.1", help="comma-separated fractions dropping after the masked input"
    )
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--skip-agent-memory", action="store_true")
    ap.add_argument("--workers", type=int, default=4, help="device worker processes over HTTP")
    ap.add_argument("--json-out", help="write every measurement here as one JSON document")
    ap.add_argument(
        "--tolerate",
        type=float,
        default=None,
        help="the tolerated dropout SecAgg+'s k and t are derived for, the same k and t given to every engine "
        "(default: each engine's own default, which is the job's 0.2)",
    )
    args = ap.parse_args(argv)
    rows_wanted = _parse_rows(args.rows)
    dropouts = [float(x) for x in args.dropouts.split(",")]

    machine = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg": os.getloadavg(),
        "mem_available_gb": round(_mem_available_gb(), 1),
    }
    print(f"# {machine}", flush=True)
    everything: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    no_dropout_stage: dict[tuple[int, int], float] = {}
    for devices, params in rows_wanted:
        heavy = devices * params >= 50_000_000
        if heavy and _mem_available_gb() < 6:
            msg = f"skipped: only {_mem_available_gb():.1f} GB of memory available"
            for dropout in dropouts:
                table.append(
                    {
                        "devices": devices,
                        "params": params,
                        "dropout": dropout,
                        "sim": {"error": msg},
                        "http": {"error": msg},
                        "flower": {"error": msg},
                    }
                )
            continue
        floor: dict[str, Any] = {}
        for dropout in dropouts:
            row: dict[str, Any] = {"devices": devices, "params": params, "dropout": dropout}
            if not args.skip_sim:
                settle()
                try:
                    row["sim"] = _in_child(run_sim, devices, params, dropout, args.tolerate)
                except Exception as err:  # noqa: BLE001 - say so and go on
                    row["sim"] = {"engine": "aicfl-sim", "error": f"{type(err).__name__}: {err}"}
                _emit({**row["sim"], "row": f"{devices}x{params}", "dropout": dropout}, everything)
            if not args.skip_http:
                if dropout == 0:
                    stage_timeout = 600.0
                else:
                    slowest = no_dropout_stage.get((devices, params))
                    if slowest is None:  # no row without dropout to learn from: a generous guess
                        slowest = 2 + devices * params * 1e-7
                    stage_timeout = round(max(10.0, 3 * slowest + 5), 1)
                settle()
                try:
                    row["http"] = run_http(
                        devices, params, dropout, stage_timeout, workers=args.workers, tolerate=args.tolerate
                    )
                    if dropout == 0 and row["http"].get("stage_seconds"):
                        no_dropout_stage[(devices, params)] = max(row["http"]["stage_seconds"].values())
                except Exception as err:  # noqa: BLE001
                    row["http"] = {"engine": "aicfl-http", "error": f"{type(err).__name__}: {err}"}
                _emit({**row["http"], "row": f"{devices}x{params}", "dropout": dropout}, everything)
            if not args.skip_flower:
                settle()
                try:
                    row["flower"] = _in_child(run_flower_child, devices, params, dropout, args.tolerate)
                except Exception as err:  # noqa: BLE001
                    row["flower"] = {"engine": "flower-secagg+", "error": f"{type(err).__name__}: {err}"}
                _emit({**row["flower"], "row": f"{devices}x{params}", "dropout": dropout}, everything)
            if not floor:
                numel = (row.get("sim") or {}).get("params") or (row.get("http") or {}).get("params")
                if not numel:
                    from server.simulate import hidden_for
                    from shared.jobspec import ModelSpec
                    from shared.zoo import architecture, parameter_count

                    numel = parameter_count(architecture(ModelSpec(hidden=hidden_for(params)), 2, 1))
                floor = run_floor(devices, int(numel))
                _emit({**floor, "row": f"{devices}x{params}"}, everything)
            row["floor"] = floor
            table.append(row)
    memory = None
    if not args.skip_agent_memory:
        try:
            memory = _in_child(agent_memory, 1_000_000, 100)
        except Exception as err:  # noqa: BLE001
            memory = {"engine": "agent-memory", "error": f"{type(err).__name__}: {err}"}
        _emit(memory, everything)
    print_tables(table)
    if memory and "peak_rss_mb" in memory:
        print(
            f"\nagent, one device at 1e6 parameters (k={memory['k']}): peak RSS {memory['peak_rss_mb']:.0f} MB, "
            f"{memory['rss_after_imports_mb']:.0f} MB after imports (+{memory['round_peak_increase_mb']:.0f} MB "
            f"for the round)"
        )
    for row in table:
        h = row.get("http") or {}
        if h.get("coordinator_peak_rss_mb") and row["devices"] * row["params"] >= 100_000_000:
            mb = h["coordinator_peak_rss_mb"]
            print(
                f"coordinator peak RSS at {row['devices']} x {row['params']:.0e}, dropout {row['dropout']:.0%}: "
                f"{mb:.0f} MB (target < 1536 MB: {'met' if mb < 1536 else 'missed'})"
            )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"machine": machine, "results": everything}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
