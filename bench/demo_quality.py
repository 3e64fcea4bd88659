"""The demo's final model next to its ceiling and the AutoML leader, its audits, the agents' memory.

Runs ``aicfl demo`` (real coordinator, real agent processes, mlc_churn split by
state, Horovod pre-training of version 0, an H2O AutoML baseline, an audit
worker) and prints, from its summary.json, the final model's test metrics next
to the same network trained centrally on the pooled training rows and to the
AutoML leader (same test rows), the per-round aggregation time, the audit time
against the round time, and the agents' peak RSS.

    python bench/demo_quality.py [--dataset mlc_churn|digits] [--devices 6] [--rounds N] [--no-pretrain] [--no-automl]
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
    ap.add_argument("--rounds", type=int, default=None, help="default: the demo's for the dataset")
    ap.add_argument("--dataset", default="mlc_churn")
    ap.add_argument("--no-pretrain", action="store_true")
    ap.add_argument("--no-automl", action="store_true")
    args = ap.parse_args()
    extra = (["--no-pretrain"] if args.no_pretrain else []) + (["--no-automl"] if args.no_automl else [])
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
                *(["--rounds", str(args.rounds)] if args.rounds else []),
                "--dataset",
                args.dataset,
                "--out",
                str(out),
                *extra,
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
    rounds = sum(1 for r in summary["rounds"] if r.get("kind", "train") == "train")
    print(f"demo: {args.dataset}, {args.devices} devices, {rounds} rounds, {wall:.0f} s wall")
    for name in [k for k in final if k != "examples"]:
        gap = final[name] - ceiling[name]
        print(f"  {name:10s} federated {final[name]:.4f}   ceiling {ceiling[name]:.4f}   gap {gap:+.4f}")
    agg = [r["aggregation_seconds"] for r in summary["rounds"]]
    print(f"  aggregation per round: median {sorted(agg)[len(agg) // 2] * 1000:.1f} ms")
    rss = summary["agent_peak_rss_mb"]
    print(f"  agent peak RSS: max {rss['max']:.0f} MB, mean {rss['mean']:.0f} MB")
    if summary.get("pretrain"):
        p = summary["pretrain"]
        print(
            f"  version 0 pre-trained (np={p['world_size']}, {p['epochs']} epochs): {p['metrics'].get('central')}"
        )
    if summary.get("baseline"):
        b = summary["baseline"]
        for name in [k for k in b["metrics"] if k != "examples"]:
            print(
                f"  {name:10s} federated {final[name]:.4f}   AutoML {b['leader']} {b['metrics'][name]:.4f}"
                f"   gap {final[name] - b['metrics'][name]:+.4f}"
            )
    timing = summary.get("audit_timing") or {}
    if summary.get("audits"):
        verdicts = [a["verdict"] for a in summary["audits"]]
        print(
            f"  audits: {len(verdicts)} versions ({verdicts.count('ok')} ok, {verdicts.count('drift')} drift); "
            f"mean {timing['mean_audit_seconds']:.2f} s against a mean round of {timing['mean_round_seconds']:.2f} s; "
            f"audited before the next round ended: {timing['audited_before_next_round_ended']}"
        )
    print(
        json.dumps(
            {
                "final": final,
                "ceiling": ceiling,
                "agent_peak_rss_mb": rss,
                "pretrain": summary.get("pretrain"),
                "baseline": summary.get("baseline"),
                "audits": summary.get("audits"),
                "audit_timing": timing,
                "wall_seconds": wall,
                "rounds": [{k: r[k] for k in ("round", "central", "federated")} for r in summary["rounds"]],
            }
        )
    )


if __name__ == "__main__":
    main()
