"""CPU cost of the SecAgg+ core (shared/secagg), without HTTP or a database.

For each (devices, params) row, one round is played in this process: every
device's SecAggClient runs advertise, share_keys, masked_input and unmask
(timed per device with the process CPU clock), and the coordinator's
unmask_total is timed with 0% and 10% of the devices dropping after their
masked input (their self-mask seeds are rebuilt from the neighbours' shares),
and with 10% dropping after share_keys (their mask keys are rebuilt and the
pairwise masks with each surviving neighbour re-expanded). The share of
unmask_total spent in Shamir combine is reported, to tell whether Shamir
dominates.

Each round is played twice, with the same inputs: once with the prime-field
Shamir of shared/secagg/primitives.py (what the protocol uses) and once with
the pycryptodome Shamir it replaced (GF(2**128) on two 16-byte halves, kept
below as the reference), so that the before and after figures come from the
same run. ``--shamir`` keeps only one of them.

    python bench/secagg_core.py [--rows 10x100000,50x100000] [--shamir both|prime|pycryptodome] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shared.secagg.protocol as protocol  # noqa: E402
from shared.privacy.skellam import SkellamParams, decode_total, noise_share, noised_input  # noqa: E402
from shared.secagg import (  # noqa: E402
    SecAggClient,
    SecAggError,
    decode_share,
    dequantize_weighted_mean,
    derive_params,
    neighbour_graph,
    unmask_total,
    weighted_input,
)

# ---------------------------------------------------------------- the reference: pycryptodome's Shamir

_PYCRYPTODOME_SHARE_BYTES = 32


def _shamir_split_pycryptodome(secret: bytes, t: int, n: int) -> list[tuple[int, bytes]]:
    """The split the protocol used before issue 3: each 16-byte half shared over GF(2**128), halves joined."""
    if len(secret) != 32 or not 1 <= t <= n:
        raise ValueError("a 32-byte secret and 1 <= t <= n")
    low = Shamir.split(t, n, secret[:16], ssss=False)
    high = Shamir.split(t, n, secret[16:], ssss=False)
    return [(i, a + b) for (i, a), (j, b) in zip(low, high, strict=True) if i == j]


def _shamir_combine_pycryptodome(shares: list[tuple[int, bytes]]) -> bytes:
    """The combine the protocol used before issue 3 (same checks, same cost)."""
    if not shares:
        raise SecAggError("no shares to combine")
    indices = [i for i, _ in shares]
    if len(set(indices)) != len(indices):
        raise SecAggError("duplicate share indices")
    if any(len(s) != _PYCRYPTODOME_SHARE_BYTES or not 1 <= i < 2**16 for i, s in shares):
        raise SecAggError(f"a share is an index in [1, 65535] and {_PYCRYPTODOME_SHARE_BYTES} bytes")
    low = Shamir.combine([(i, s[:16]) for i, s in shares], ssss=False)
    high = Shamir.combine([(i, s[16:]) for i, s in shares], ssss=False)
    return low + high


BACKENDS = ("pycryptodome", "prime")


@contextmanager
def shamir_backend(name: str) -> Iterator[None]:
    """Runs the protocol with one Shamir: "prime" (shared.secagg.primitives, as shipped) or "pycryptodome"."""
    if name == "prime":
        yield
        return
    if name != "pycryptodome":
        raise ValueError(f"unknown Shamir backend {name!r}")
    saved = (protocol.shamir_split, protocol.shamir_combine, protocol.SHARE_BYTES)
    protocol.shamir_split = _shamir_split_pycryptodome
    protocol.shamir_combine = _shamir_combine_pycryptodome
    protocol.SHARE_BYTES = _PYCRYPTODOME_SHARE_BYTES
    try:
        yield
    finally:
        protocol.shamir_split, protocol.shamir_combine, protocol.SHARE_BYTES = saved


class Clock:
    """Accumulates the CPU seconds of the functions it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start
                self.calls += 1

        return timed


def one_round(
    devices: int,
    params_count: int,
    drop_after: str,
    drop_fraction: float,
    backend: str = "prime",
    dp: SkellamParams | None = None,
) -> dict[str, Any]:
    """One round; with ``dp`` every device sends ``noised_input`` (device-level DP) and the sum is decoded."""
    with shamir_backend(backend):
        out = _one_round(devices, params_count, drop_after, drop_fraction, dp)
    return {"shamir": backend, **out}


def _one_round(
    devices: int, params_count: int, drop_after: str, drop_fraction: float, dp: SkellamParams | None = None
) -> dict[str, Any]:
    params = derive_params(devices)
    if dp is not None and dp.dim != params_count:
        raise ValueError(f"the DP parameters are for dim={dp.dim}, the round has {params_count} values")
    context = b"bench/job/round"
    ids = [f"device-{i:04d}" for i in range(devices)]
    rng = np.random.default_rng(0)
    keys = {d: Ed25519PrivateKey.generate() for d in ids}
    public = {d: k.public_key() for d, k in keys.items()}

    def verify(device: str, message: bytes, signature: bytes) -> bool:
        public[device].verify(signature, message)
        return True

    graph = neighbour_graph(ids, params.k, os.urandom(32))
    clients = {d: SecAggClient(d, context, params, keys[d].sign) for d in ids}
    cpu = dict.fromkeys(ids, 0.0)
    stage_cpu = {"advertise": 0.0, "share_keys": 0.0, "masked_input": 0.0, "unmask": 0.0}

    def timed(device: str, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.process_time()
        out = fn()
        spent = time.process_time() - start
        cpu[device] += spent
        stage_cpu[stage] += spent
        return out

    # The trained updates exist before the round; encoding them (quantise, or clip + round + noise) is its first step.
    updates = {d: rng.normal(0, 0.1, params_count).astype(np.float32) for d in ids}
    round_start = time.perf_counter()
    quant_start = time.process_time()
    draw_cpu = 0.0  # of which the Skellam shares' draws (a device can make them between stages)
    if dp is None:
        inputs = {d: weighted_input(updates.pop(d), 100, params, rng) for d in ids}
    else:
        device_rng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32))))
        inputs = {}
        for d in ids:
            draw_start = time.process_time()
            drawn = noise_share(dp, device_rng)
            draw_cpu += time.process_time() - draw_start
            inputs[d] = noised_input(updates.pop(d), dp, device_rng, noise=drawn)
    quant_cpu = (time.process_time() - quant_start) / devices

    drop_count = round(drop_fraction * devices)
    dropping = set(ids[:: max(1, devices // drop_count)][:drop_count]) if drop_count else set()

    advertised = {d: timed(d, "advertise", clients[d].advertise) for d in ids}

    def share(d: str) -> dict[str, str]:
        return clients[d].share_keys({v: advertised[v] for v in graph[d]}, verify)

    ciphertexts = {d: timed(d, "share_keys", partial(share, d)) for d in ids}
    shared = set(ids)
    senders = shared - dropping if drop_after == "share_keys" else shared

    def mask(d: str) -> np.ndarray:
        return clients[d].masked_input(inputs[d], {v: ciphertexts[v][d] for v in graph[d] if v in shared})

    masked = {d: timed(d, "masked_input", partial(mask, d)) for d in sorted(senders)}
    survivors = set(masked)
    responders = survivors - dropping if drop_after == "masked_input" else survivors
    dropped = shared - survivors

    def unmask(d: str) -> dict[str, str]:
        nbrs = set(graph[d])
        return clients[d].unmask((survivors - {d}) & nbrs, dropped & nbrs)

    b_shares: dict[str, list[tuple[int, bytes]]] = {}
    sk_shares: dict[str, list[tuple[int, bytes]]] = {}
    for d in sorted(responders):
        for v, text in timed(d, "unmask", partial(unmask, d)).items():
            (b_shares if v in survivors else sk_shares).setdefault(v, []).append(decode_share(text))

    # What the coordinator does as masked inputs arrive: a running uint64 sum (the plaintext floor's work).
    sum_start = time.process_time()
    total = np.zeros(params_count + 1 if dp is None else dp.coordinates, dtype=np.uint64)
    for y in masked.values():
        total += y
    sum_cpu = time.process_time() - sum_start

    shamir = Clock()
    original = protocol.shamir_combine
    protocol.shamir_combine = shamir.wrap(original)
    try:
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = unmask_total(
            total,
            context=context,
            params=params,
            graph=graph,
            shared=shared,
            survivors=survivors,
            advertised=advertised,
            b_shares=b_shares,
            sk_shares=sk_shares,
        )
        server_cpu = time.process_time() - cpu_start
        server_wall = time.perf_counter() - wall_start
    finally:
        protocol.shamir_combine = original
    decode_start = time.process_time()
    if dp is None:
        dequantize_weighted_mean(result[:-1], int(result[-1]), params.clip, params.bits)
    else:
        noised = decode_total(result, dp)
        np.divide(noised.total, noised.contributors, out=noised.total)
    decode_cpu = time.process_time() - decode_start
    round_wall = time.perf_counter() - round_start

    plain = np.zeros_like(total)
    for d in survivors:
        plain += inputs[d]

    return {
        "devices": devices,
        "params": params_count,
        "k": params.k,
        "t": params.t,
        "drop_after": drop_after if drop_count else None,
        "dropped": drop_count,
        "exact": bool(np.array_equal(result, plain)),
        "client_cpu_s_mean": sum(cpu.values()) / devices,
        "client_cpu_s_max": max(cpu.values()),
        "client_stage_cpu_s_mean": {k: v / devices for k, v in stage_cpu.items()},
        "client_quantise_cpu_s_mean": quant_cpu,
        "client_noise_draw_cpu_s_mean": draw_cpu / devices,
        "server_unmask_cpu_s": server_cpu,
        "server_unmask_wall_s": server_wall,
        "shamir_combine_calls": shamir.calls,
        "shamir_combine_cpu_s": shamir.seconds,
        "shamir_share_of_unmask": shamir.seconds / server_cpu if server_cpu else 0.0,
        "running_sum_cpu_s": sum_cpu,
        "decode_cpu_s": decode_cpu,
        "round_wall_s": round_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10x100000,50x100000", help="comma-separated DEVICESxPARAMS")
    parser.add_argument("--shamir", choices=("both", *BACKENDS), default="both", help="which Shamir to time")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args()
    rows = [tuple(int(float(x)) for x in row.split("x")) for row in args.rows.split(",")]
    cases = [("none", 0.0), ("masked_input", 0.1), ("share_keys", 0.1)]
    backends = BACKENDS if args.shamir == "both" else (args.shamir,)
    if not args.json:
        print(
            f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
        )
        print(
            f"{'devices':>7} {'params':>8} {'k':>3} {'t':>3} {'drop':>20} {'shamir':>12} {'exact':>5} "
            f"{'client cpu s':>12} {'server s':>9} {'shamir s':>9} {'shamir %':>8} {'per combine':>11} "
            f"{'running sum s':>13}"
        )
    for devices, params_count in rows:
        for drop_after, fraction in cases:
            server: dict[str, float] = {}
            for backend in backends:
                r = one_round(devices, params_count, drop_after, fraction, backend)
                server[backend] = r["server_unmask_cpu_s"]
                if args.json:
                    print(json.dumps(r))
                    continue
                drop = f"{r['dropped']} after {drop_after}" if r["dropped"] else "0"
                per_combine = r["shamir_combine_cpu_s"] / max(1, r["shamir_combine_calls"])
                print(
                    f"{devices:>7} {params_count:>8} {r['k']:>3} {r['t']:>3} {drop:>20} {backend:>12} "
                    f"{r['exact']!s:>5} {r['client_cpu_s_mean']:>12.4f} {r['server_unmask_cpu_s']:>9.4f} "
                    f"{r['shamir_combine_cpu_s']:>9.4f} {100 * r['shamir_share_of_unmask']:>7.1f}% "
                    f"{per_combine * 1e3:>8.3f} ms {r['running_sum_cpu_s']:>13.4f}"
                )
                stages = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["client_stage_cpu_s_mean"].items())
                print(
                    f"{'':>7} client ms per device: {stages}; "
                    f"quantise {r['client_quantise_cpu_s_mean'] * 1e3:.1f}"
                )
            if len(server) == 2 and not args.json and server["prime"] > 0:
                print(
                    f"{'':>7} server unmask: pycryptodome {server['pycryptodome'] * 1e3:.1f} ms -> prime field "
                    f"{server['prime'] * 1e3:.1f} ms ({server['pycryptodome'] / server['prime']:.1f}x)"
                )


if __name__ == "__main__":
    main()
