"""Device-level DP at 1,000 devices: examples/churn_dp.toml simulated with and without its [privacy] table.

Issue 13's target: with epsilon <= 8 at delta = 1e-5 over the whole job, the
final AUC is within 0.03 of the same job without DP. Both jobs run through
``aicfl simulate`` (the real coordinator and agents, SecAgg+ in every round),
with the same devices, split, rounds and seed; the second differs only by its
missing ``[privacy]`` table (same ``secure = true``, same cohort). Prints both
final AUCs, the epsilon spent and both wall times.

    python bench/dp_devices.py [--spec examples/churn_dp.toml] [--devices 1000] [--split rows]
        [--rounds N] [--processes 2] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ValueError(f"cannot write {value!r} as TOML")


def without_privacy(spec_text: str) -> str:
    """The same job spec without its ``[privacy]`` table (and so without DP)."""
    data = tomllib.loads(spec_text)
    if "privacy" not in data:
        raise ValueError("the spec has no [privacy] table")
    data.pop("privacy")
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def run(spec: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        str(Path(sys.executable).with_name("aicfl")),
        "simulate",
        str(spec),
        "--devices",
        str(args.devices),
        "--split",
        args.split,
        "--processes",
        str(args.processes),
        "--seed",
        str(args.seed),
        "--no-ceiling",
        "--out",
        str(out),
    ]
    if args.rounds is not None:
        command += ["--rounds", str(args.rounds)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"command": " ".join(command), "wall_s": wall, "summary": summary}


def headline(result: dict[str, Any]) -> dict[str, Any]:
    s = result["summary"]
    privacy = s.get("privacy") or {}
    return {
        "status": s["status"],
        "reason": s.get("reason"),
        "final": s.get("final"),
        "epsilon": privacy.get("epsilon"),
        "target_epsilon": privacy.get("target_epsilon"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "rounds": len(s.get("rounds") or []),
        "wall_s": round(result["wall_s"], 1),
        "secagg_exact": (s.get("simulation") or {}).get("secagg_exact"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "churn_dp.toml")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--split", default="rows")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.spec.is_file():
        parser.error(f"--spec {args.spec}: no such file")
    try:
        plain_text = without_privacy(args.spec.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        parser.error(f"--spec {args.spec}: {e}")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dp-devices-") as tmp:
        plain_spec = Path(tmp) / "plain.toml"
        plain_spec.write_text(plain_text)
        dp = headline(run(args.spec.resolve(), Path(tmp) / "dp", args))
        plain = headline(run(plain_spec, Path(tmp) / "plain", args))
    report = {"devices": args.devices, "split": args.split, "load_before": load, "dp": dp, "no_dp": plain}
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"# {args.devices} devices, split {args.split}, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for name, r in (("DP", dp), ("no DP", plain)):
        final = r["final"] or {}
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        eps = (
            f"epsilon {r['epsilon']:.3f} of {r['target_epsilon']}, z {r['noise_multiplier']}"
            if r["epsilon"]
            else ""
        )
        print(f"{name:>6}: {r['status']}, {r['rounds']} rounds, {r['wall_s']} s; {metrics} {eps}")
    auc = [(r["final"] or {}).get("auc") for r in (dp, plain)]
    if None not in auc:
        print(f"AUC gap (no DP - DP): {auc[1] - auc[0]:+.4f} (target <= 0.03)")


if __name__ == "__main__":
    main()
