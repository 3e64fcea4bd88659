"""Federated trees: aicfl's secure and plaintext gbdt jobs against XGBoost, pooled and federated.

One invocation, one job (``examples/churn_gbdt.toml`` or ``--job``), the same rows dealt the same
way (the simulation's ``--devices`` and ``--split`` of the same training rows, the same held-out
test rows), the same ``[gbdt]`` settings and boosting rounds:

- **aicfl, SecAgg+**: ``aicfl simulate`` (the real coordinator engine and the agent's own code, no
  HTTP): the statistics round, the bins round and one level round per tree level, every one summed
  under SecAgg+ (``server.simulation.simulate_job``);
- **aicfl, plaintext**: the same job with ``secure = false`` (each device's histogram checked and
  summed in the clear);
- **XGBoost pooled**: ``xgboost.train(tree_method="hist")`` on every device's rows pooled (the
  summary's ceiling; the issue's lossless reference);
- **XGBoost federated**: XGBoost's own federated mode, its gRPC federated server and one process per
  device training on its own rows (the devices' quantile sketches and histograms allreduced in the
  clear by the server), with the preprocessing the statistics round would fix. It needs the full
  ``xgboost`` wheel: ``xgboost-cpu`` (the dev extra's) is built without the federated plugin, and the
  row says so.

It prints each one's test AUC and wall time, and the secure run's wall over the plaintext one's
(issue 15's target: at most 3x). aicfl's devices train on all their rows here (``[training]
holdout = 0``), as XGBoost's runs do.

    python bench/gbdt.py [--devices 6] [--rounds 20] [--split group] [--job JOB.toml]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "churn_gbdt.toml"


def run_aicfl(spec: Any, args: argparse.Namespace, secure: bool) -> dict[str, Any]:
    from server.simulation.splits import parse_split
    from server.simulation.whole_job import SimulationOptions, simulate_job
    from shared.jobspec import validate_spec

    raw = spec.model_dump(mode="json")
    raw["secure"] = secure
    # Every device row trains, as in XGBoost's runs (a holdout's rows depend on the device ids, new
    # each run): the pooled comparison is then like for like.
    raw["training"] = {**raw["training"], "holdout": 0.0}
    opts = SimulationOptions(
        devices=args.devices,
        split=parse_split(args.split),
        rounds=args.rounds,
        seed=args.seed,
        ceiling=secure,  # once: XGBoost on the pooled rows, reported as its own row
    )
    t0 = time.perf_counter()
    summary = simulate_job(validate_spec(raw), opts)
    wall = time.perf_counter() - t0
    out = {
        "engine": f"aicfl, {'SecAgg+' if secure else 'plaintext'}",
        "status": summary["status"],
        "auc": summary["final"].get("auc"),
        "wall_seconds": round(wall, 1),
        "job_seconds": summary["simulation"]["job_seconds"],
        "tree_rounds": summary["simulation"].get("tree_rounds"),
    }
    if secure and summary.get("ceiling"):
        out["ceiling_auc"] = summary["ceiling"].get("auc")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(
    rank: int, n: int, port: int, params: dict[str, Any], rounds: int, x: Any, y: Any, out: Any
) -> None:
    """One device of XGBoost's federated mode: train on its own rows; rank 0 hands back the model."""
    import xgboost
    from xgboost import collective

    with collective.CommunicatorContext(
        dmlc_communicator="federated",
        federated_server_address=f"127.0.0.1:{port}",
        federated_world_size=n,
        federated_rank=rank,
    ):
        booster = xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=rounds)
        if rank == 0:
            out.put(bytes(booster.save_raw("json")))


def run_xgboost_federated(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    import xgboost

    if not xgboost.build_info().get("USE_FEDERATED"):
        # The xgboost-cpu wheel (the dev extra's) is built without it; the full wheel has it.
        return {
            "engine": "XGBoost federated mode",
            "status": "skipped: this xgboost build has no federated mode"
            " (pip install xgboost: the full wheel)",
        }
    from xgboost import federated

    from server.simulation.data import prepare
    from server.simulation.splits import parse_split
    from shared.gbdt.rounds import xgboost_params
    from shared.tabular import Preprocessor, local_statistics, merge_statistics
    from shared.training import metrics_from_predictions

    schema = spec.tabular
    data = prepare("mlc_churn", schema, parse_split(args.split), args.devices, args.seed)[0]
    # What the statistics round fixes: the preprocessing from the devices' summed statistics.
    pre = Preprocessor.from_statistics(
        merge_statistics([local_statistics(p, schema) for p in data.parts]), schema
    )
    params = xgboost_params(spec, len(pre.classes) if schema.task == "multiclass" else 0, nthread=1)
    rounds = args.rounds or spec.rounds
    spawn = multiprocessing.get_context("spawn")
    port = _free_port()
    t0 = time.perf_counter()
    server = spawn.Process(
        target=federated.run_federated_server,
        kwargs={"n_workers": len(data.parts), "port": port},
        daemon=True,
    )
    server.start()
    out = spawn.Queue()
    ranks = []
    for rank, part in enumerate(data.parts):
        x, y = pre.transform(part)
        p = spawn.Process(target=_rank, args=(rank, len(data.parts), port, params, rounds, x, y, out))
        p.start()
        ranks.append(p)
    model = out.get(timeout=600)
    for p in ranks:
        p.join(timeout=60)
    wall = time.perf_counter() - t0
    server.terminate()
    server.join(timeout=10)
    booster = xgboost.Booster()
    booster.load_model(bytearray(model))
    xt, yt = pre.transform(data.test)
    metrics = metrics_from_predictions(schema.task, yt, booster.predict(xgboost.DMatrix(xt)))
    return {
        "engine": "XGBoost federated mode (plaintext)",
        "status": "completed" if all(p.exitcode == 0 for p in ranks) else "failed",
        "auc": metrics.get("auc"),
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    from shared.jobspec import load_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default=str(JOB))
    p.add_argument("--devices", type=int, default=6)
    p.add_argument("--rounds", type=int, default=None, help="boosting rounds (default: the job's)")
    p.add_argument("--split", default="group")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    spec = load_spec(Path(args.job))
    print(
        json.dumps(
            {"job": Path(args.job).name, "devices": args.devices, "rounds": args.rounds or spec.rounds}
        )
    )
    rows = [run_aicfl(spec, args, secure=True), run_aicfl(spec, args, secure=False)]
    rows.append({"engine": "XGBoost hist, pooled rows", "auc": rows[0].pop("ceiling_auc", None)})
    rows.append(run_xgboost_federated(spec, args))
    for row in rows:
        print(json.dumps(row))
    secure, plain, pooled = rows[0], rows[1], rows[2]
    print(
        json.dumps(
            {
                "secure_over_plaintext_wall": round(secure["wall_seconds"] / plain["wall_seconds"], 2),
                "secure_auc_minus_pooled": None
                if pooled["auc"] is None
                else round(float(np.float64(secure["auc"]) - pooled["auc"]), 4),
                "plaintext_over_xgboost_federated_wall": round(
                    plain["wall_seconds"] / rows[3]["wall_seconds"], 2
                )
                if "wall_seconds" in rows[3]
                else None,
            }
        )
    )


if __name__ == "__main__":
    main()
