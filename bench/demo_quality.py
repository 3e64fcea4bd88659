"""The demo's final model next to its ceiling, and the agents' peak memory.

Runs ``aicfl demo`` (real coordinator, real agent processes, mlc_churn split by
state) and prints, from its summary.json, the final model's test metrics next
to the same network trained centrally on the pooled training rows (same test
rows), the per-round aggregation time, and the agents' peak RSS.

    python bench/demo_quality.py [--devices 6] [--rounds 10]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dataset", default="mlc_churn")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        t0 = time.time()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "server",
                "demo",
                "--devices",
                str(args.devices),
                "--rounds",
                str(args.rounds),
                "--dataset",
                args.dataset,
                "--out",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"demo failed: {proc.stderr.strip()}")
        summary = json.loads((out / "summary.json").read_text())
        wall = time.time() - t0
    final, ceiling = summary["final"], summary["ceiling"]
    print(f"machine: {platform.node()} ({os.cpu_count()} cpus), python {platform.python_version()}")
    print(f"demo: {args.dataset}, {args.devices} devices, {args.rounds} rounds, {wall:.0f} s wall")
    for name in [k for k in final if k != "examples"]:
        gap = final[name] - ceiling[name]
        print(f"  {name:10s} federated {final[name]:.4f}   ceiling {ceiling[name]:.4f}   gap {gap:+.4f}")
    agg = [r["aggregation_seconds"] for r in summary["rounds"]]
    print(f"  aggregation per round: median {sorted(agg)[len(agg) // 2] * 1000:.1f} ms")
    rss = summary["agent_peak_rss_mb"]
    print(f"  agent peak RSS: max {rss['max']:.0f} MB, mean {rss['mean']:.0f} MB")
    print(
        json.dumps(
            {
                "final": final,
                "ceiling": ceiling,
                "agent_peak_rss_mb": rss,
                "wall_seconds": wall,
                "rounds": [{k: r[k] for k in ("round", "central", "federated")} for r in summary["rounds"]],
            }
        )
    )


if __name__ == "__main__":
    main()
