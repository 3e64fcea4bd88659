#!/usr/bin/env python3
"""Load-test a fresh coordinator on this machine with locust, and summarise the result.

Steps: bootstrap an admin token in a new data folder, start the coordinator
(``python -m server server start``) on a free 127.0.0.1 port, make one
enrollment token per user, run ``loadtests/locustfile.py`` headless against
that loopback URL for a bounded number of users and time, stop the
coordinator, and print requests per second, latency percentiles and failures
from locust's CSV files. The CSV files, the locust log and the coordinator
log are kept under ``--out``.

Traffic never leaves the machine: the only target is the coordinator this
script starts on 127.0.0.1. Exit status: 0 when every request succeeded, 1
when some failed, 2 when the test could not run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCUSTFILE = HERE / "locustfile.py"
MAX_USERS = 2000
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--users", type=int, default=50, help=f"concurrent users, 1..{MAX_USERS} (default 50)"
    )
    parser.add_argument(
        "--spawn-rate", type=float, default=10.0, help="users started per second (default 10)"
    )
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=parse_duration("30s"),
        help=f"run time, e.g. 30s, 2m (default 30s, at most {MAX_SECONDS // 60}m)",
    )
    parser.add_argument(
        "--checkin-interval",
        type=float,
        default=None,
        help="seconds between a device's check-ins (default: the coordinator's retry_after)",
    )
    parser.add_argument(
        "--db",
        default=None,
        help="database URL for the coordinator (default: SQLite in a temporary folder); "
        "it must hold no admin token yet",
    )
    parser.add_argument(
        "--server-log-level", default="info", help="the coordinator's log level (default info)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the CSV files and logs (default loadtests/results/<time>)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.users <= MAX_USERS:
        parser.error(f"--users must be 1..{MAX_USERS}")
    if not 0 < args.spawn_rate <= 1000:
        parser.error("--spawn-rate must be above 0 and at most 1000")
    if not 1 <= args.duration <= MAX_SECONDS:
        parser.error(f"--duration must be 1 s to {MAX_SECONDS // 60} min")
    if importlib.util.find_spec("locust") is None:
        print('error: locust is not installed: pip install "aicfl[load]"', file=sys.stderr)
        return 2
    try:
        return run(args)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
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
        with server_log.open("wb") as log_fh:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "server",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(data_dir),
                    "--log-level",
                    args.server_log_level,
                    *db,
                ],
                cwd=REPO,
                env=env,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
            )
            try:
                return drive(args, base, admin, server, server_log, out, env, Path(tmp))
            finally:
                stop(server)


def drive(
    args: argparse.Namespace,
    base: str,
    admin: str,
    server: subprocess.Popen[bytes],
    server_log: Path,
    out: Path,
    env: dict[str, str],
    tmp: Path,
) -> int:
    wait_healthy(base, server, server_log)
    tokens = call(
        base + "/v1/enrollment-tokens",
        "POST",
        admin,
        {"count": args.users, "ttl_seconds": args.duration + 3600},
    )["tokens"]
    token_file = tmp / "enrollment-tokens.txt"
    token_file.write_text("\n".join(tokens) + "\n")
    locust_env = dict(env, AICFL_LOAD_TOKENS=str(token_file), AICFL_TOKEN=admin)
    if args.checkin_interval is not None:
        locust_env["AICFL_LOAD_CHECKIN_INTERVAL"] = str(args.checkin_interval)
    prefix = out / "locust"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate),
        "-t",
        f"{args.duration}s",
        "--host",
        base,
        "--csv",
        str(prefix),
        "--only-summary",
    ]
    print(
        f"coordinator {base}; locust: {args.users} users, spawn rate {args.spawn_rate}/s, {args.duration} s"
    )
    locust_log = out / "locust.log"
    started = time.monotonic()
    with locust_log.open("wb") as fh:
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=locust_env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=args.duration + 120,
            )
        except subprocess.TimeoutExpired:
            raise RunError(f"locust ran past {args.duration + 120} s; see {locust_log}") from None
    elapsed = time.monotonic() - started
    if proc.returncode not in (0, 1):  # 1: some requests failed, which the summary shows
        raise RunError(f"locust exited with status {proc.returncode}:\n{tail(locust_log)}")
    stats, failures = read_stats(prefix)
    table, failed = summarise(stats, failures)
    devices = call(base + "/v1/devices", token=admin)
    cutoff = time.time() - 30
    seen = sum(1 for d in devices if d["last_seen"] and d["last_seen"] >= cutoff)
    errors = sum(1 for line in server_log.read_text(errors="replace").splitlines() if " ERROR " in line)
    print(table)
    print()
    print(
        f"locust ran {elapsed:.0f} s; devices enrolled: {len(devices)}, checked in within the last 30 s: {seen}; "
        f"coordinator ERROR log lines: {errors}"
    )
    print(f"CSV files and logs: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
