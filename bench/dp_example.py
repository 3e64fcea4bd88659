"""Example-level DP (local DP-SGD with Opacus) against plain local training, on the churn demo's split.

The demo's data and job (``server.demo_data.prepare_data``: mlc_churn split by state over 6
devices, a fifth of the rows held out as the test rows; an MLP 64-32, 2 epochs of Adam at 0.005
per round, batch 32, a fifth of each device's rows held aside as the agents do), preprocessing
fitted on the pooled training rows, version 0 from the job's seed (no pre-training). For each
device: its own model trained alone for the planned rounds, without DP and with DP-SGD whose noise
multiplier is calibrated so that the device's epsilon over all the rounds is at most ``--epsilon``
at ``--delta``; the AUC of both on the test rows, and the epsilon spent from what Opacus reports
(``shared.privacy.accounting``) next to Opacus's own RDP accountant. With ``--federated``, the
same rounds as an in-process FedAvg over the 6 devices (every device every round, the mean
weighted by examples as the engine's plain FedAvg, not the engine itself), with and without DP.

    python bench/dp_example.py [--devices 6] [--rounds 10] [--epsilon 3] [--delta 1e-5] [--clip 1.0] [--federated [--repeats N]] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_devices(devices: int, seed: int, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    """The demo's split, preprocessed: each device's training arrays, the test rows and the job
    (with the overrides asked for, applied to both runs)."""
    from server.demo_data import prepare_data
    from shared.apps import DeviceContext, JobContext
    from shared.jobspec import validate_spec
    from shared.tabular import Preprocessor, local_statistics
    from shared.zoo import architecture

    with tempfile.TemporaryDirectory(prefix="aicfl-dp-bench-") as tmp:
        data = prepare_data("mlc_churn", devices, seed, Path(tmp), rounds=rounds, audit=False)
    raw = data["spec"]
    for key, value in (
        ("batch_size", args.batch_size),
        ("learning_rate", args.learning_rate),
        ("optimizer", args.optimizer),
        ("epochs", args.epochs),
    ):
        if value is not None:
            raw["training"][key] = value
    if args.model == "logreg":
        raw["model"] = {"zoo": "logreg"}
    elif args.hidden is not None:
        raw["model"] = {"zoo": "mlp", "hidden": args.hidden}
    spec = validate_spec(raw)
    schema = spec.tabular
    pre = Preprocessor.from_statistics(local_statistics(data["train"], schema), schema)
    job = JobContext(spec, pre.to_dict())
    parts = []
    for i, part in enumerate(data["parts"]):
        train_idx, _ = DeviceContext(job, "", f"device-{i:02d}").holdout_split(len(part))
        parts.append(pre.transform(part.iloc[train_idx]))
    return {
        "spec": spec,
        "arch": architecture(spec.model, pre.input_dim, pre.output_dim),
        "parts": parts,
        "test": pre.transform(data["test"]),
    }


def _auc(model: Any, test: tuple[np.ndarray, np.ndarray]) -> float:
    from shared.training import evaluate

    return float(evaluate(model, test[0], test[1], task="binary")["auc"])


def _train(model: Any, x: np.ndarray, y: np.ndarray, spec: Any, seed: int, dp: dict[str, Any] | None) -> Any:
    from shared.privacy.example import train_local_dp
    from shared.training import train_local

    t = spec.training
    common = {
        "task": "binary",
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "learning_rate": t.learning_rate,
        "optimizer": t.optimizer,
        "seed": seed,
    }
    if dp is None:
        return train_local(model, x, y, **common)
    return train_local_dp(model, x, y, **common, noise_multiplier=dp["z"], clip=dp["clip"])


def plan(n: int, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A device's DP-SGD plan: Opacus's rate and steps for ``n`` examples, the multiplier for the target."""
    from shared.privacy.accounting import calibrate_dpsgd

    per_epoch = math.ceil(n / spec.training.batch_size)
    q = 1.0 / per_epoch
    steps = spec.training.epochs * int(1 / q)  # what Opacus's Poisson loader takes per epoch
    z = calibrate_dpsgd(args.epsilon, args.delta, q, steps, args.rounds)
    return {"z": z, "q": q, "steps_per_round": steps, "clip": args.clip}


def spent(reports: list[Any], delta: float) -> tuple[float, float]:
    """Epsilon of a device's reports: ours (dp-accounting) and Opacus's RDP accountant's."""
    from opacus.accountants import RDPAccountant

    from shared.privacy.accounting import dpsgd_costs, epsilon

    costs = [c for r in reports for c in dpsgd_costs(r.noise_multiplier, r.sampling_rate, r.steps)]
    theirs = RDPAccountant()
    theirs.history = [(r.noise_multiplier, r.sampling_rate, r.steps) for r in reports]
    return epsilon(costs, delta), float(theirs.get_epsilon(delta))


def local_runs(d: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each device alone for the planned rounds, without and with DP-SGD."""
    from shared.zoo import build_model

    spec = d["spec"]
    rows = []
    for i, (x, y) in enumerate(d["parts"]):
        p = plan(len(y), spec, args)
        plain, private = build_model(d["arch"], seed=spec.seed), build_model(d["arch"], seed=spec.seed)
        reports = []
        t0 = time.perf_counter()
        for r in range(args.rounds):
            _train(plain, x, y, spec, spec.seed + r, None)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in range(args.rounds):
            reports.append(_train(private, x, y, spec, spec.seed + r, p))
        t_dp = time.perf_counter() - t0
        ours, opacus = spent(reports, args.delta)
        rows.append(
            {
                "device": i,
                "examples": len(y),
                "positives": int(y.sum()),
                "q": p["q"],
                "steps": sum(r.steps for r in reports),
                "noise_multiplier": p["z"],
                "epsilon": ours,
                "epsilon_opacus": opacus,
                "auc_plain": _auc(plain, d["test"]),
                "auc_dp": _auc(private, d["test"]),
                "seconds_plain": t_plain,
                "seconds_dp": t_dp,
            }
        )
    return rows


def federated(d: dict[str, Any], args: argparse.Namespace, dp: bool) -> dict[str, Any]:
    """In-process FedAvg over every device every round: the final test AUC and each device's epsilon."""
    from shared.zoo import build_model, flatten_parameters, load_flat_parameters

    spec = d["spec"]
    model = build_model(d["arch"], seed=spec.seed)
    plans = [plan(len(y), spec, args) for _, y in d["parts"]] if dp else [None] * len(d["parts"])
    reports: list[list[Any]] = [[] for _ in d["parts"]]
    curve = []
    for r in range(args.rounds):
        start = flatten_parameters(model)
        total, weight = np.zeros_like(start), 0
        for i, (x, y) in enumerate(d["parts"]):
            local = build_model(d["arch"])
            load_flat_parameters(local, start)
            out = _train(local, x, y, spec, spec.seed * 1000 + r * 100 + i, plans[i])
            if dp:
                reports[i].append(out)
            total += len(y) * (flatten_parameters(local) - start)
            weight += len(y)
        load_flat_parameters(model, start + total / weight)
        curve.append(_auc(model, d["test"]))
    eps = [spent(rs, args.delta)[0] for rs in reports] if dp else []
    return {"auc_after_each": curve, "final_auc": curve[-1], "epsilon_per_device": eps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=None, help="override the demo job's (32), both runs")
    ap.add_argument(
        "--learning-rate", type=float, default=None, help="override the demo job's (0.005), both runs"
    )
    ap.add_argument(
        "--optimizer", choices=("sgd", "adam"), default=None, help="override the demo job's (adam)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="override the demo job's (2), both runs")
    ap.add_argument(
        "--model", choices=("mlp", "logreg"), default=None, help="override the demo job's (mlp 64-32)"
    )
    ap.add_argument(
        "--hidden", type=int, nargs="*", default=None, help="mlp hidden sizes (the demo's: 64 32)"
    )
    ap.add_argument("--local", action=argparse.BooleanOptionalAction, default=True, help="each device alone")
    ap.add_argument(
        "--federated", action="store_true", help="also run an in-process FedAvg with and without DP"
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="federated DP runs, each with fresh noise (default 1)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's skipped fractional orders
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = load_devices(args.devices, args.seed, args.rounds, args)
    rows = local_runs(d, args) if args.local else []
    report: dict[str, Any] = {"args": vars(args), "local": rows}
    t = d["spec"].training
    print(
        f"churn demo split: {args.devices} devices, {args.rounds} rounds x {t.epochs} epochs, {d['arch']['zoo']}"
        f" {d['arch']['hidden']}, {t.optimizer} at {t.learning_rate}, batch {t.batch_size};"
        f" target epsilon {args.epsilon} at delta {args.delta}, clip {args.clip}; AUC on {len(d['test'][1])} test rows"
    )
    print(
        "device  examples  q       steps  z      eps(ours)  eps(opacus)  AUC plain  AUC DP   diff    s plain  s DP"
    )
    for r in rows:
        print(
            f"{r['device']:>6}  {r['examples']:>8}  {r['q']:.4f}  {r['steps']:>5}  {r['noise_multiplier']:.3f}"
            f"  {r['epsilon']:>9.3f}  {r['epsilon_opacus']:>11.3f}  {r['auc_plain']:>9.3f}  {r['auc_dp']:>6.3f}"
            f"  {r['auc_dp'] - r['auc_plain']:>+6.3f}  {r['seconds_plain']:>7.1f}  {r['seconds_dp']:>4.1f}"
        )
    if args.federated:
        fed_plain = federated(d, args, False)
        runs = [federated(d, args, True) for _ in range(max(1, args.repeats))]
        report["federated"] = {"plain": fed_plain, "dp": runs}
        print(
            "in-process FedAvg (every device every round, weighted by examples), test AUC after each round:"
        )
        print("  plain:", " ".join(f"{a:.3f}" for a in fed_plain["auc_after_each"]))
        for run in runs:
            print("  DP   :", " ".join(f"{a:.3f}" for a in run["auc_after_each"]))
        finals = np.array([run["final_auc"] for run in runs])
        print(
            f"  final AUC plain {fed_plain['final_auc']:.3f}, DP mean {finals.mean():.3f} over {finals.size} run(s)"
            f" (min {finals.min():.3f}, max {finals.max():.3f}), difference {finals.mean() - fed_plain['final_auc']:+.3f}"
            f" (issue target: within 0.03); epsilon per device max"
            f" {max(max(run['epsilon_per_device']) for run in runs):.3f}"
        )
    print(f"wall {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(json.dumps(report, default=float))


if __name__ == "__main__":
    main()
