"""The cost in time of device-level DP (distributed Skellam) under SecAgg+: one round with and without it.

Issue 13's target: at 100 devices x 1e6 parameters, the round with DP takes
at most 1.2x the round without. Both rounds are played in this process by
``bench/secagg_core.py`` (no HTTP, no database), alternately, with the same
devices and sizes: without DP every device quantises its update
(``weighted_input``) and the coordinator dequantises the mean; with DP every
device runs ``noised_input`` (clip, scale, conditional randomised rounding,
its Skellam share) and the coordinator runs ``decode_total``. The rest of the
round (advertise, share_keys, masked_input, unmask, the running sum and
``unmask_total``) is the same code.

Two figures per round:

- **round wall**: from the first device's encoding to the decoded mean, with
  every device played one after the other on this machine, as the whole-job
  simulation plays them (what a simulation user waits for);
- **critical path**: what a user of real devices waits for, the devices
  working in parallel: one device's encoding (the mean), the slowest device's
  protocol CPU, and the coordinator's running sum, unmask and decode.

The Skellam share depends only on the round's parameters, not on the update,
so a device draws it while it waits between SecAgg+ stages (after answering
share_keys, ``client_agent/worker.py``) and only adds it at masked input. The
DP critical path is therefore shown twice: "path DP, draw on" with the draw
counted in the encoding (a device that restarted mid-round and draws at masked
input), and "path DP" without it (the agent's usual case); "draw ms" is the
draw alone, per device, timed in the same rounds.

    python bench/dp_cost.py [--rows 100x1000000] [--repeat 3] [--noise-multiplier 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secagg_core import one_round  # noqa: E402

from shared.privacy.modulus import check_no_wrap  # noqa: E402
from shared.privacy.skellam import SkellamParams, honest_floor  # noqa: E402
from shared.secagg import derive_params  # noqa: E402


def skellam_for(devices: int, params_count: int, noise_multiplier: float) -> SkellamParams:
    """The Skellam parameters the coordinator would fix: clip 1, SecAgg+'s bits, 90% minimum, 10% corruption."""
    dp = SkellamParams(
        clip=1.0,
        bits=derive_params(devices).bits,
        dim=params_count,
        noise_multiplier=noise_multiplier,
        min_contributors=honest_floor(max(1, round(0.9 * devices)), 0.1),
    )
    check_no_wrap(dp, devices)
    return dp


def critical_path(r: dict[str, Any], draw_ahead: bool = True) -> float:
    """The round's critical path; with ``draw_ahead`` the noise share's draw is off it (made between stages)."""
    encode = r["client_quantise_cpu_s_mean"] - (r["client_noise_draw_cpu_s_mean"] if draw_ahead else 0.0)
    return (
        encode + r["client_cpu_s_max"] + r["running_sum_cpu_s"] + r["server_unmask_cpu_s"] + r["decode_cpu_s"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100x1000000", help="comma-separated DEVICESxPARAMS")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of each kind, alternating; medians are shown"
    )
    parser.add_argument(
        "--noise-multiplier", type=float, default=1.0, help="z (the cost does not depend on it)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per round instead of a table")
    args = parser.parse_args()
    try:
        rows = [tuple(int(float(x)) for x in row.split("x")) for row in args.rows.split(",")]
        if any(len(row) != 2 or min(row) < 1 for row in rows) or args.repeat < 1:
            raise ValueError
    except ValueError:
        parser.error(
            f"--rows must be DEVICESxPARAMS[,...] with positive numbers and --repeat >= 1, got {args.rows!r}"
        )
    if not args.json:
        load = os.getloadavg()
        print(
            f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        print(
            f"{'devices':>7} {'params':>8} {'wall no DP':>10} {'wall DP':>8} {'ratio':>6} "
            f"{'path no DP':>10} {'path DP, draw on':>16} {'ratio':>6} {'path DP':>8} {'ratio':>6} "
            f"{'encode ms no DP / DP':>21} {'draw ms':>8} {'decode ms':>14}"
        )
    for devices, params_count in rows:
        dp = skellam_for(devices, params_count, args.noise_multiplier)
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "dp": []}
        for _ in range(args.repeat):
            for kind in runs:
                r = one_round(devices, params_count, "none", 0.0, "prime", dp if kind == "dp" else None)
                r["dp"] = kind == "dp"
                r["critical_path_s"] = critical_path(r)
                r["critical_path_draw_on_s"] = critical_path(r, draw_ahead=False)
                runs[kind].append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
        if args.json:
            continue

        def med(kind: str, key: str, runs: dict[str, list[dict[str, Any]]] = runs) -> float:
            return statistics.median(r[key] for r in runs[kind])

        wall = {k: med(k, "round_wall_s") for k in runs}
        path = {k: med(k, "critical_path_s") for k in runs}
        path_draw_on = med("dp", "critical_path_draw_on_s")
        enc = {k: 1e3 * med(k, "client_quantise_cpu_s_mean") for k in runs}
        draw = 1e3 * med("dp", "client_noise_draw_cpu_s_mean")
        dec = {k: 1e3 * med(k, "decode_cpu_s") for k in runs}
        print(
            f"{devices:>7} {params_count:>8} {wall['plain']:>9.2f}s {wall['dp']:>7.2f}s "
            f"{wall['dp'] / wall['plain']:>5.2f}x {path['plain']:>9.3f}s {path_draw_on:>15.3f}s "
            f"{path_draw_on / path['plain']:>5.2f}x {path['dp']:>7.3f}s {path['dp'] / path['plain']:>5.2f}x "
            f"{enc['plain']:>9.1f} / {enc['dp']:>7.1f} {draw:>8.1f} {dec['plain']:>6.1f} / {dec['dp']:>5.1f}"
        )
        print(f"{'':>7} exact: {all(r['exact'] for k in runs for r in runs[k])}; dp: {dp}")


if __name__ == "__main__":
    main()
