"""An agent's peak memory per app: the churn (built-in tabular) app and the digits CNN app.

Runs ``aicfl demo`` for each dataset in one invocation (real coordinator, real agent processes,
SecAgg+, the same number of devices and rounds, no pre-training or AutoML) and prints the
agents' peak RSS (``ru_maxrss``, reported at every check-in) from each summary.json. Beside them,
the floor every torch app pays: a bare Python importing torch, and torch with pandas (what the
tabular app reads its table with).

    python bench/agent_rss.py [--devices 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"python + torch": "import torch", "python + torch + pandas": "import torch, pandas"}


def floor_mb(code: str) -> float:
    probe = f"{code}; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    )


def demo(dataset: str, devices: int, rounds: int, out: Path) -> tuple[dict, float]:
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable, "-m", "server", "demo", "--dataset", dataset, "--devices", str(devices),
            "--rounds", str(rounds), "--no-pretrain", "--no-automl", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"demo --dataset {dataset} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text()), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'what':32} {'peak RSS max (MB)':>18} {'mean (MB)':>10} {'wall s':>7}")
    for name, code in FLOORS.items():
        print(f"{name:32} {floor_mb(code):18.0f} {'':>10} {'':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, label in (
            ("mlc_churn", "agent, churn (tabular app)"),
            ("digits", "agent, digits (CNN app)"),
        ):
            summary, wall = demo(dataset, args.devices, args.rounds, Path(tmp) / dataset)
            rss = summary["agent_peak_rss_mb"]
            print(f"{label:32} {rss['max']:18.0f} {rss['mean']:10.0f} {wall:7.0f}")


if __name__ == "__main__":
    main()
