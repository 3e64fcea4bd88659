#!/usr/bin/env python3
"""Load-test a fresh coordinator on this machine with locust, and write a report.

Steps: pick the database (a throw-away PostgreSQL database when the server on
127.0.0.1:5432 answers, else SQLite; or ``--db``), bootstrap an admin token in
a new data folder, start the coordinator (``python -m server server start``)
on a free 127.0.0.1 port, run ``loadtests/locustfile.py`` headless against
that loopback URL (one process, or a master and ``--workers`` worker
processes), and:

- ``--scenario idle``: enrolled devices check in at the pace they are told;
- ``--scenario plain`` / ``secure``: once every device has checked in, submit
  a job through the operator API (``--rounds`` training rounds of an MLP of
  about ``--params`` parameters, every device selected, plaintext or SecAgg+),
  wait for it to end and check each round's new model against the exact
  aggregate of what the devices sent (``loadtests/synthetic.py``);
- ``--abuse``: during the first training round, slow clients, an enrollment
  burst, oversized bodies and replayed signed requests (``loadtests/abuse.py``).

Then stop the coordinator, drop the throw-away database, print the table and
write ``report.json`` and locust's ``report.html`` under ``--out``. Traffic
never leaves the machine. Exit status: 0 when every request succeeded (and
every round completed exactly), 1 when not, 2 when the test could not run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.coordinator_process import cpu_seconds, start_coordinator, status_mb  # noqa: E402

CLIP = 0.5  # as loadtests/synthetic.py (imported late: numpy is not needed for --help)
LOCUSTFILE = HERE / "locustfile.py"
MAX_USERS = 20_000
TERMINAL = ("completed", "failed", "cancelled")
MAX_SECONDS = 30 * 60
STARTUP_SECONDS = 120


class RunError(Exception):
    """The load test could not run; the message says why."""


def parse_duration(text: str) -> int:
    """Seconds in '45', '30s', '2m' or '1m30s' (locust's -t syntax)."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 2m or 1m30s")
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(
    url: str, method: str = "GET", token: str | None = None, payload: Any = None, timeout: float = 10
) -> Any:
    """One JSON request to the coordinator; raises RunError with its problem detail."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read()).get("detail")
        except ValueError:
            detail = err.reason
        raise RunError(f"{method} {url}: HTTP {err.code}: {detail}") from None
    return json.loads(body) if body and body[:1] in b"[{" else body.decode()


def all_devices(base: str, token: str) -> list[dict[str, Any]]:
    """Every enrolled device, following the coordinator's pages of its device list."""
    from shared.api_client import ApiClient

    api = ApiClient(base, token, timeout=60)
    try:
        return api.pages("/v1/devices", params={"limit": 1000})
    finally:
        api.close()


def run_module(args: list[str], env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RunError(f"python -m {' '.join(args[:3])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def wait_healthy(base: str, server: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RunError(f"the coordinator exited with status {server.returncode}:\n{tail(log_path)}")
        try:
            if call(base + "/v1/health", timeout=2).get("status") == "ok":
                return
        except (OSError, RunError, ValueError):
            pass
        time.sleep(0.3)
    raise RunError(f"the coordinator did not answer /v1/health within {STARTUP_SECONDS} s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within the grace period."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_stats(prefix: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    stats_path = Path(f"{prefix}_stats.csv")
    if not stats_path.exists():
        raise RunError(f"locust wrote no {stats_path.name}")
    with stats_path.open(newline="") as fh:
        stats = list(csv.DictReader(fh))
    failures_path = Path(f"{prefix}_failures.csv")
    failures: list[dict[str, str]] = []
    if failures_path.exists():
        with failures_path.open(newline="") as fh:
            failures = list(csv.DictReader(fh))
    return stats, failures


def _num(row: dict[str, str], key: str) -> float:
    value = row.get(key, "") or "0"
    return float(value) if value != "N/A" else float("nan")


def summarise(stats: list[dict[str, str]], failures: list[dict[str, str]]) -> tuple[str, int]:
    """A table of the endpoints and the total, and the number of failed requests."""
    head = f"{'request':<44} {'count':>8} {'fail':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    lines = [head, "-" * len(head)]
    total_failures = 0
    for row in stats:
        name = row["Name"] if row["Name"] == "Aggregated" else f"{row['Type']} {row['Name']}"
        if row["Name"] == "Aggregated":
            lines.append("-" * len(head))
            total_failures = int(_num(row, "Failure Count"))
        lines.append(
            f"{name:<44} {int(_num(row, 'Request Count')):>8} {int(_num(row, 'Failure Count')):>6} "
            f"{_num(row, 'Requests/s'):>8.1f} {_num(row, '50%'):>8.0f} {_num(row, '95%'):>8.0f} {_num(row, '99%'):>8.0f}"
        )
    if failures:
        lines.append("")
        lines.append("failures:")
        for f in failures[:10]:
            lines.append(f"  {f['Occurrences']:>6} x {f['Method']} {f['Name']}: {f['Error'][:160]}")
    return "\n".join(lines), total_failures


# ---------------------------------------------------------------------------- the coordinator's process


# ---------------------------------------------------------------------------- the database


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


class ThrowawayDatabase:
    """A PostgreSQL database made for one run and dropped after it; ``url`` is None when none could be made."""

    def __init__(self) -> None:
        self.name = f"aicfl_load_{os.getpid()}_{int(time.time())}"
        self.url: str | None = None
        self.why_not = ""

    def __enter__(self) -> ThrowawayDatabase:
        try:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"
        except Exception as err:  # noqa: BLE001 - no PostgreSQL here: SQLite instead, and say why
            self.why_not = (
                f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.url is None:
            return
        try:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except Exception as err:  # noqa: BLE001
            print(f"warning: could not drop database {self.name}: {err}", file=sys.stderr)


def database_label(url: str | None) -> str:
    if not url:
        return "sqlite"
    return url.split(":", 1)[0].split("+", 1)[0]


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        choices=("idle", "plain", "secure"),
        default="idle",
        help="idle: check-ins only; plain / secure: devices through whole plaintext or SecAgg+ rounds",
    )
    parser.add_argument("--devices", type=int, default=None, help=f"device users, 1..{MAX_USERS}")
    parser.add_argument("--users", type=int, default=None, help="the same as --devices")
    parser.add_argument(
        "--operators", type=int, default=1, help="idle: operator users listing devices and jobs (default 1)"
    )
    parser.add_argument(
        "--spawn-rate", type=float, default=None, help="users started per second (default 10; rounds: 50)"
    )
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=None,
        help=f"idle: run time (default 30s); rounds: the most the job may take (default 10m); at most {MAX_SECONDS // 60}m",
    )
    parser.add_argument(
        "--params", type=int, default=100_000, help="rounds: the model's size, about (default 1e5)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds: training rounds (default 1)")
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="rounds: each device's chance to drop out at each stage (default 0)",
    )
    parser.add_argument(
        "--stage-timeout",
        type=float,
        default=None,
        help="rounds: each stage's deadline, seconds (default: by size)",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="rounds: a federated evaluate round after the last"
    )
    parser.add_argument(
        "--abuse",
        action="store_true",
        help="rounds: slow clients, enrollment burst, oversized and replayed requests",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="locust worker processes (default 1: no master)"
    )
    parser.add_argument(
        "--long-poll",
        type=float,
        default=None,
        help="seconds a device lets a check-in be held (default: none sent)",
    )
    parser.add_argument(
        "--checkin-interval",
        type=float,
        default=None,
        help="seconds between a device's check-ins (default: the coordinator's retry_after)",
    )
    parser.add_argument(
        "--steady",
        action="store_true",
        help="idle: report only what follows the ramp-up (locust --reset-stats once every device has started), "
        "so that enrollment does not count in the check-in percentiles",
    )
    parser.add_argument(
        "--db",
        default=None,
        help="database URL for the coordinator, with no admin token yet, or 'sqlite' (default: a throw-away "
        "PostgreSQL database on 127.0.0.1:5432 when it answers, else SQLite in a temporary folder)",
    )
    parser.add_argument(
        "--server-log-level", default="warning", help="the coordinator's log level (default warning)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the report, CSV files and logs (default loadtests/results/<time>)",
    )
    args = parser.parse_args(argv)
    args.devices = args.devices or args.users or 50
    if args.spawn_rate is None:
        args.spawn_rate = 10.0 if args.scenario == "idle" else 50.0
    if args.duration is None:
        args.duration = parse_duration("30s" if args.scenario == "idle" else "10m")
    if not 1 <= args.devices <= MAX_USERS:
        parser.error(f"--devices must be 1..{MAX_USERS}")
    if args.scenario != "idle" and args.devices < 3:
        parser.error("rounds need at least 3 devices")
    if not 0 < args.spawn_rate <= 5000:
        parser.error("--spawn-rate must be above 0 and at most 5000")
    if not 1 <= args.duration <= MAX_SECONDS:
        parser.error(f"--duration must be 1 s to {MAX_SECONDS // 60} min")
    if not 0 <= args.dropout < 0.5:
        parser.error("--dropout must be 0 to below 0.5")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be 1..64")
    if not 1 <= args.rounds <= 100 or not 10 <= args.params <= 10_000_000:
        parser.error("--rounds must be 1..100 and --params 10..1e7")
    if args.steady and args.scenario != "idle":
        parser.error("--steady is for --scenario idle")
    if args.abuse and args.scenario == "idle":
        parser.error("--abuse needs a round: --scenario plain or secure")
    if importlib.util.find_spec("locust") is None:
        print('error: locust is not installed: pip install "aicfl[load]"', file=sys.stderr)
        return 2
    try:
        if args.db:
            args.db = None if args.db == "sqlite" else args.db
            return run(args, "given" if args.db else "asked for")
        with ThrowawayDatabase() as pg:
            args.db = pg.url
            return run(args, f"throw-away {pg.name}" if pg.url else f"PostgreSQL unreachable ({pg.why_not})")
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, db_note: str) -> int:
    out: Path = args.out or HERE / "results" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="aicfl-load-") as tmp:
        data_dir = Path(tmp) / "data"
        db = ["--db", args.db] if args.db else []
        admin = run_module(
            ["server", "admin", "bootstrap", "--data-dir", str(data_dir), *db], env, timeout=120
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server_log = out / "coordinator.log"
        server_log.unlink(missing_ok=True)
        server = start_coordinator(data_dir, port, server_log, env, "--log-level", args.server_log_level, *db)
        report: dict[str, Any] = {
            "scenario": args.scenario,
            "database": database_label(args.db),
            "database_note": db_note,
            "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            return drive(args, base, admin, server, server_log, out, env, Path(tmp), report)
        finally:
            stop(server)


def locust_command(args: argparse.Namespace, base: str, out: Path, run_seconds: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(args.devices if args.scenario != "idle" else args.devices + args.operators),
        "-r",
        str(args.spawn_rate),
        "-t",
        f"{run_seconds}s",
        "--host",
        base,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--stop-timeout",
        "5",
    ]
    if args.workers > 1:
        cmd += ["--processes", str(args.workers)]
    if args.steady:
        cmd.append("--reset-stats")
    if args.scenario == "idle":
        return cmd + (["DeviceUser", "OperatorUser"] if args.operators else ["DeviceUser"])
    return cmd + ["RoundDeviceUser"]


def job_spec(args: argparse.Namespace, stage_timeout: float) -> dict[str, Any]:
    """The job the devices take part in: every device selected, enough slack for the dropout."""
    from server.simulate import SCHEMA, hidden_for

    secure = args.scenario == "secure"
    stages = 5 if secure else 2
    survive = (1 - args.dropout) ** stages
    minimum = max(2, int(args.devices * survive * 0.6)) if args.dropout else args.devices
    spec: dict[str, Any] = {
        "name": f"loadtest-{args.scenario}-{args.devices}x{args.params}",
        "rounds": args.rounds,
        "seed": 1,
        "data": SCHEMA,
        "model": {"zoo": "mlp", "hidden": hidden_for(args.params)},
        "cohort": {
            "target": args.devices,
            "minimum": minimum,
            "stage_timeout": stage_timeout,
            "selection_timeout": 5,
        },
        "evaluation": {"federated": bool(args.evaluate)},
        "secure": secure,
    }
    if secure:
        spec["secagg"] = {"clip": CLIP, "bits": 16}
        if args.dropout:
            k, t = neighbourhood(args.devices, args.dropout)
            spec["secagg"].update(k=k, t=t, dropout=min(0.45, round(1 - (1 - args.dropout) ** 4, 2)))
    return spec


def neighbourhood(n: int, p: float, z: float = 4.5) -> tuple[int, int]:
    """SecAgg+'s k and t for devices that each drop with probability ``p`` at each stage.

    A device's secrets need t = floor(k/2) + 1 of its k neighbours to answer the
    unmask stage; a neighbour gets there with probability q = (1 - p)^4
    (advertise, share keys, masked input, unmask). The default k (about 3 log2 n)
    leaves some device short of t in most rounds of 1,000 devices at p = 10 %, so
    k grows until the expected survivors clear t by ``z`` standard deviations,
    or to the cap below.
    """
    q = (1 - p) ** 4
    # The round's n is the devices that answered configure, about n (1 - p): k must stay below
    # it (3 standard deviations down), and even, for a k-regular graph to exist whatever n is.
    cap = int(n * (1 - p) - 3 * math.sqrt(n * p * (1 - p))) - 1
    k = 4
    while k < cap and k * q - (k // 2 + 1) < z * math.sqrt(k * q * (1 - q)):
        k += 1
    k = max(2, min(k, cap))
    k -= k % 2
    return k, k // 2 + 1


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise RunError(f"timed out after {timeout:.0f} s waiting for {what}")


def drive(
    args: argparse.Namespace,
    base: str,
    admin: str,
    server: subprocess.Popen[bytes],
    server_log: Path,
    out: Path,
    env: dict[str, str],
    tmp: Path,
    report: dict[str, Any],
) -> int:
    wait_healthy(base, server, server_log)
    cpu_start = cpu_seconds(server.pid)
    ledger = tmp / "ledger"
    ledger.mkdir()
    locust_env = dict(env, AICFL_TOKEN=admin, AICFL_LOAD_LEDGER=str(ledger))
    if args.scenario != "idle":
        locust_env["AICFL_LOAD_ROUNDS"] = "1"
    if args.workers == 1:  # one process: a file of tokens; several: each mints its own through the API
        users = args.devices
        tokens = call(
            base + "/v1/enrollment-tokens",
            "POST",
            admin,
            {"count": users, "ttl_seconds": args.duration + 3600},
        )["tokens"]
        token_file = tmp / "enrollment-tokens.txt"
        token_file.write_text("\n".join(tokens) + "\n")
        locust_env["AICFL_LOAD_TOKENS"] = str(token_file)
    locust_env["AICFL_LOAD_OPERATORS"] = str(args.operators)
    if args.checkin_interval is not None:
        locust_env["AICFL_LOAD_CHECKIN_INTERVAL"] = str(args.checkin_interval)
    if args.long_poll is not None:
        locust_env["AICFL_LOAD_WAIT"] = str(args.long_poll)
    if args.dropout:
        locust_env["AICFL_LOAD_DROPOUT"] = str(args.dropout)
    enroll_seconds = int(args.devices / args.spawn_rate) + 60
    run_seconds = args.duration if args.scenario == "idle" else args.duration + enroll_seconds
    cmd = locust_command(args, base, out, run_seconds)
    print(
        f"coordinator {base} ({report['database']}: {report['database_note']}); locust: {args.scenario}, "
        f"{args.devices} devices, {args.workers} process(es), spawn rate {args.spawn_rate}/s"
    )
    locust_log = out / "locust.log"
    if args.scenario != "idle":
        submit_job(args, base, admin, report)
    started = time.monotonic()
    job: dict[str, Any] | None = None
    with locust_log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=locust_env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            if args.scenario != "idle":
                job = run_job(args, base, admin, server, proc, report, locust_log)
                # Locust rewrites its CSV files once a second and not again on SIGINT: let it catch up.
                time.sleep(2.5)
                proc.send_signal(
                    signal.SIGINT
                )  # the job is over: locust writes its reports (HTML too) and exits
            proc.wait(timeout=run_seconds + 120)
        except subprocess.TimeoutExpired:
            raise RunError(f"locust ran past {run_seconds + 120} s; see {locust_log}") from None
        finally:
            stop(proc, grace=60)
    elapsed = time.monotonic() - started
    if proc.returncode not in (
        0,
        1,
        -signal.SIGINT,
        -signal.SIGTERM,
    ):  # 1: some requests failed, which the summary shows
        raise RunError(f"locust exited with status {proc.returncode}:\n{tail(locust_log)}")
    stats, failures = read_stats(out / "locust")
    table, failed = summarise(stats, failures)
    report["locust_seconds"] = round(elapsed, 1)
    report["steady_state_only"] = bool(args.steady)
    report["requests"] = endpoint_report(stats)
    report["failures"] = failed
    report["failure_kinds"] = [
        {"method": f["Method"], "name": f["Name"], "error": f["Error"][:300], "count": int(f["Occurrences"])}
        for f in failures[:20]
    ]
    report["coordinator"] = {
        "cpu_seconds": round(cpu_seconds(server.pid) - cpu_start, 2),
        "peak_rss_mb": status_mb(server.pid, "VmHWM"),
        "error_log_lines": sum(
            1
            for line in server_log.read_text(errors="replace").splitlines()
            if " ERROR " in line or "Traceback" in line
        ),
    }
    devices = all_devices(base, admin)
    cutoff = time.time() - 90
    report["devices_enrolled"] = len(devices)
    report["devices_seen_last_90s"] = sum(1 for d in devices if d["last_seen"] and d["last_seen"] >= cutoff)
    ok = failed == 0
    if job is not None:
        ok = finish_job_report(args, base, admin, job, ledger, stats, report) and ok
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(table)
    print()
    print_summary(report)
    print(f"report: {out / 'report.json'}, {out / 'report.html'}")
    return 0 if ok else 1


def endpoint_report(stats: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per request name (and the total): count, failures, req/s, p50/p95/p99 ms, bytes of the answers."""
    rows: dict[str, dict[str, Any]] = {}
    for row in stats:
        name = row["Name"] if row["Name"] == "Aggregated" else f"{row['Type']} {row['Name']}"
        count = int(_num(row, "Request Count"))
        rows[name] = {
            "count": count,
            "failures": int(_num(row, "Failure Count")),
            "rps": round(_num(row, "Requests/s"), 2),
            "p50_ms": _num(row, "50%"),
            "p95_ms": _num(row, "95%"),
            "p99_ms": _num(row, "99%"),
            "max_ms": _num(row, "Max Response Time"),
            "response_bytes": int(_num(row, "Average Content Size") * count),
        }
    return rows


def submit_job(args: argparse.Namespace, base: str, admin: str, report: dict[str, Any]) -> None:
    """Submit the job before any device enrolls, and wait until the coordinator counts it as selecting."""
    stage_timeout = args.stage_timeout or max(10.0, round(5 + args.devices * args.params * 3e-7, 1))
    spec = job_spec(args, stage_timeout)
    spec["cohort"]["selection_timeout"] = round(args.devices / args.spawn_rate + 60)
    report["job_spec"] = spec
    report["job_id"] = call(base + "/v1/jobs", "POST", admin, spec, timeout=60)["id"]
    # The coordinator reads "a job may select devices" at most once a second (coordinator/checkins.py):
    # a device checking in before that would be told the idle interval.
    time.sleep(2.0)


def run_job(
    args: argparse.Namespace,
    base: str,
    admin: str,
    server: subprocess.Popen[bytes],
    locust: subprocess.Popen[bytes],
    report: dict[str, Any],
    locust_log: Path,
) -> dict[str, Any]:
    """Submit the job, run the abuse if asked, wait for the job's end.

    The job goes in first, as the devices enroll: a device then hears that a job
    may select it and checks in at the short poll interval, not the idle one
    (which, without long polls, would leave the first rounds' configure stage
    unanswered). Its first round waits for every device (``selection_timeout``).
    """
    job_id = report["job_id"]
    t0 = time.monotonic()
    abuse_result: dict[str, Any] = {}
    abuse_thread: threading.Thread | None = None
    cpu0: float | None = None
    wall0 = time.monotonic()
    deadline = time.monotonic() + args.duration + args.devices / args.spawn_rate + 60
    while time.monotonic() < deadline:
        job = call(f"{base}/v1/jobs/{job_id}", token=admin, timeout=60)
        latest = job.get("latest_round") or {}
        if cpu0 is None and latest:
            # The first round opened: every device is in (or the selection timed out).
            cpu0, wall0 = cpu_seconds(server.pid), time.monotonic()
            report["enroll_seconds"] = round(wall0 - t0, 1)
        if job["status"] in TERMINAL:
            break
        if (
            args.abuse
            and abuse_thread is None
            and (latest.get("kind"), latest.get("status")) == ("train", "running")
        ):
            from loadtests.abuse import abuse

            abuse_thread = threading.Thread(
                target=lambda: abuse_result.update(abuse(base, admin, server.pid, job_id)), daemon=True
            )
            abuse_thread.start()
        if server.poll() is not None:
            raise RunError(f"the coordinator exited with status {server.returncode}")
        if locust.poll() is not None:
            raise RunError(f"locust exited with status {locust.returncode}:\n{tail(locust_log)}")
        time.sleep(0.5)
    if cpu0 is None:
        cpu0 = cpu_seconds(server.pid)
    report["job_seconds"] = round(time.monotonic() - wall0, 1)
    report["job_cpu_seconds"] = round(cpu_seconds(server.pid) - cpu0, 2)
    report["job_status"] = job["status"]
    report["job_reason"] = job.get("reason")
    if abuse_thread is not None:
        abuse_thread.join(timeout=120)
        report["abuse"] = abuse_result
    elif args.abuse:
        report["abuse"] = {"error": "the training round was not seen running; nothing was sent"}
    return job


def finish_job_report(
    args: argparse.Namespace,
    base: str,
    admin: str,
    job: dict[str, Any],
    ledger: Path,
    stats: list[dict[str, str]],
    report: dict[str, Any],
) -> bool:
    """Rounds, the exactness of each new model, the coordinator's cost per device per round. True when all good."""
    import numpy as np

    from loadtests.synthetic import expected_delta, read_ledger
    from shared import codec
    from shared.secagg.quantize import quantisation_bound

    job_id = job["id"]
    rounds = call(f"{base}/v1/jobs/{job_id}/rounds", token=admin, timeout=60)
    contributions = [r for r in read_ledger(ledger, "contrib") if r["job_id"] == job_id]
    secure = args.scenario == "secure"
    clip = (job.get("spec") or {}).get("secagg", {}).get("clip", CLIP)

    def model(version: int) -> np.ndarray:
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{base}/v1/jobs/{job_id}/models/{version}/blob", headers={"Authorization": f"Bearer {admin}"}
            ),
            timeout=120,
        ) as resp:
            return codec.decode(resp.read())[1].astype(np.float64)

    out_rounds = []
    ok = job["status"] == "completed"
    for r in rounds:
        row: dict[str, Any] = {
            k: r.get(k)
            for k in (
                "number",
                "kind",
                "status",
                "reason",
                "participants",
                "dropped",
                "completed_by",
                "aggregation_seconds",
            )
        }
        if r.get("ended_at") and r.get("started_at"):
            row["seconds"] = round(
                datetime.fromisoformat(str(r["ended_at"])).timestamp()
                - datetime.fromisoformat(str(r["started_at"])).timestamp(),
                2,
            )
        if r["kind"] == "train":
            ok = ok and r["status"] == "completed"
            mine = [c for c in contributions if c["round"] == r["number"]]
            row["inputs_recorded"] = len(mine)
            if r["status"] == "completed" and r.get("model_version_out") is not None and mine:
                before, after = model(r["model_version_in"]), model(r["model_version_out"])
                want = expected_delta(before.size, mine, secure, clip)
                err = float(np.max(np.abs((after - before) - want)))
                bound = (
                    quantisation_bound(clip, 16) + 1e-6
                    if secure
                    else 1e-5 * max(1.0, float(np.max(np.abs(want))))
                )
                row.update(max_abs_error=err, bound=bound, exact=bool(err <= bound), params=int(before.size))
            else:
                row["exact"] = False
            ok = ok and row["exact"]
        out_rounds.append(row)
    report["rounds"] = out_rounds
    train = [r for r in out_rounds if r["kind"] == "train"]
    report["rounds_completed"] = sum(1 for r in train if r["status"] == "completed")
    report["rounds_exact"] = sum(1 for r in train if r.get("exact"))
    # The coordinator's cost of a device's round: the job's CPU (statistics round, check-ins and all)
    # over devices x training rounds; bytes are request and answer bodies of the rounds' endpoints.
    sent = [b for b in read_ledger(ledger, "bytes")]
    body_in = sum(v for b in sent for v in b["sent"].values())
    drops: dict[str, int] = {}
    late: dict[str, int] = {}
    resent: dict[str, int] = {}
    for b in sent:
        for k, v in b.get("resent", {}).items():
            resent[k] = resent.get(k, 0) + v
        for k, v in b["drops"].items():
            drops[k] = drops.get(k, 0) + v
        for k, v in b.get("late", {}).items():
            late[k] = late.get(k, 0) + v
    body_out = sum(
        v["response_bytes"] for k, v in report["requests"].items() if "/rounds/" in k or "/models/" in k
    )
    per = args.devices * max(1, report["rounds_completed"])
    report["drops"] = drops
    report["late_after_round_end"] = late
    report["resent_after_connection_closed"] = resent
    report["per_device_round"] = {
        "coordinator_cpu_ms": round(1000 * report["job_cpu_seconds"] / per, 2),
        "bytes_in": round(body_in / per),
        "bytes_out": round(body_out / per),
        "note": "job CPU (statistics round and check-ins included) and round-endpoint bodies over devices x training rounds",
    }
    if "abuse" in report:
        ok = ok and bool(report["abuse"].get("all_refused"))
    return ok


def print_summary(report: dict[str, Any]) -> None:
    c = report["coordinator"]
    print(
        f"{report['scenario']}, {report['database']}: devices enrolled {report['devices_enrolled']}, seen in the last "
        f"90 s {report['devices_seen_last_90s']}; failures {report['failures']}; coordinator CPU {c['cpu_seconds']} s, "
        f"peak RSS {c['peak_rss_mb']:.0f} MB, ERROR log lines {c['error_log_lines']}"
    )
    if "rounds" in report:
        print(
            f"job {report['job_status']} in {report['job_seconds']} s; training rounds completed "
            f"{report['rounds_completed']}, exact {report['rounds_exact']}; drops {report.get('drops')}; "
            f"late unmask answers {report.get('late_after_round_end')}; "
            f"resent after a closed connection {report.get('resent_after_connection_closed')}"
        )
        for r in report["rounds"]:
            print(
                f"  round {r['number']} {r['kind']}: {r['status']} ({r.get('seconds')} s, {r.get('completed_by')} devices)"
                + (
                    f", max error {r['max_abs_error']:.2e} <= {r['bound']:.2e}: {r['exact']}"
                    if "max_abs_error" in r
                    else ""
                )
            )
        p = report["per_device_round"]
        print(
            f"per device per round: coordinator CPU {p['coordinator_cpu_ms']} ms, {p['bytes_in']} bytes in, "
            f"{p['bytes_out']} bytes out"
        )
    if "abuse" in report:
        print(f"abuse: {json.dumps(report['abuse'])}")


if __name__ == "__main__":
    sys.exit(main())
