"""A coordinator process for benches and load tests: start it, and read its CPU time and memory from procfs.

Figures of a coordinator come from its own process (``/proc/PID/stat``, ``/proc/PID/status``), so a bench
can time what the coordinator spends while its load generator runs beside it on the same machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of proc(5))."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_mb(pid: int, key: str) -> float | None:
    """A ``/proc/PID/status`` size (VmHWM, VmRSS) in MB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def bootstrap_admin(data_dir: Path, env: dict[str, str] | None = None) -> str:
    """``python -m server admin bootstrap``: a fresh data folder and its first admin token."""
    return subprocess.run(
        [sys.executable, "-m", "server", "admin", "bootstrap", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=ROOT,
    ).stdout.strip()


def start_coordinator(
    data_dir: Path, port: int, log: Path, env: dict[str, str], *flags: str
) -> subprocess.Popen[bytes]:
    """``python -m server server start`` on 127.0.0.1:``port``, its output appended to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
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
                *flags,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
