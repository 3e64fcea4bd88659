"""H2O AutoML baseline at fixed budgets, on the demo's test rows, next to the federated model.

mlc_churn split as ``aicfl demo`` splits it (80/20, stratified on the target,
the demo's seed): AutoML trains on the pooled 80% (what the devices hold
between them) and its leader is scored on the 20% test rows, the demo's
reference rows, with the federation's own metric functions. Each budget starts
its own local JVM (training_cluster.automl, the code `aicfl cluster automl`
runs); "wall" includes the JVM start, "AutoML" is the training alone.

    python bench/automl.py [--budgets 30,60] [--federated-summary demo-out/summary.json]

``--federated-summary``: a demo's summary.json (same dataset and seed); its
``final`` metrics (the last federated version on the same test rows) are
printed next to the leader. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.api_client import CliError
from shared.datasets import load_dataset, test_split
from shared.jobspec import DataSchema
from training_cluster.automl import baseline_from_frames, load_central, load_reference

DEMO_SEED = 7  # `aicfl demo`'s default --seed: the split its summary.json was measured on


def run_budget(dataset: str, seed: int, budget: int, automl_seed: int, nthreads: int) -> dict[str, Any]:
    df, schema_dict, _ = load_dataset(dataset)
    schema = DataSchema.model_validate(schema_dict)
    stratify = schema.target if schema.task != "regression" else None
    train, test = test_split(df, 0.2, seed, stratify_column=stratify)  # as server/demo.py prepare_data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "central.csv"
        train.to_csv(path, index=False)
        central = load_central(path, schema)
    reference = load_reference(test.to_csv(index=False).encode(), schema)
    t0 = time.monotonic()
    baseline = baseline_from_frames(
        central,
        reference,
        schema,
        max_runtime_secs=budget,
        seed=automl_seed,
        nthreads=nthreads,
        project=f"bench_{dataset}",
        log=lambda line: print(f"  {line}", file=sys.stderr),
    )
    wall = time.monotonic() - t0
    return {
        "budget": budget,
        "leader": baseline["leader"],
        "algorithm": baseline["algorithm"],
        "models": baseline["provenance"]["models"],
        "metrics": baseline["metrics"],
        "automl_seconds": baseline["provenance"]["automl_seconds"],
        "wall_seconds": round(wall, 1),
        "shap_model": baseline["contributions"].get("model"),
        "leaderboard_top": baseline["leaderboard"][:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mlc_churn")
    ap.add_argument("--budgets", default="60", help="comma-separated AutoML budgets in seconds")
    ap.add_argument("--seed", type=int, default=DEMO_SEED, help="the train/test split's seed (the demo's)")
    ap.add_argument("--automl-seed", type=int, default=1)
    ap.add_argument("--nthreads", type=int, default=-1, help="the JVM's threads (-1: all cores)")
    ap.add_argument("--federated-summary", type=Path, help="a demo's summary.json, for its final metrics")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    federated = None
    if args.federated_summary:
        summary = json.loads(args.federated_summary.read_text())
        if summary.get("dataset", args.dataset) != args.dataset:
            raise SystemExit(f"{args.federated_summary} is a {summary['dataset']} demo, not {args.dataset}")
        federated = summary["final"]

    print(f"machine: {platform.node()} ({os.cpu_count()} cpus), python {platform.python_version()}")
    print(f"{args.dataset}: 80/20 stratified split, seed {args.seed}; AutoML seed {args.automl_seed}")
    runs = []
    for budget in budgets:
        try:
            runs.append(run_budget(args.dataset, args.seed, budget, args.automl_seed, args.nthreads))
        except CliError as err:
            raise SystemExit(f"AutoML with a {budget} s budget failed: {err}") from None
    names = [n for n in runs[0]["metrics"] if n != "examples"]
    header = f"{'model':44s} {'algorithm':16s}" + "".join(f" {n:>9s}" for n in names)
    print(header + f" {'models':>6s} {'AutoML s':>8s} {'wall s':>7s}")
    for r in runs:
        label = f"AutoML {r['budget']} s: {r['leader']}"[:44]
        cells = "".join(f" {r['metrics'][n]:9.4f}" for n in names)
        print(
            f"{label:44s} {r['algorithm']:16s}{cells} {r['models']:6d} {r['automl_seconds']:8.1f} {r['wall_seconds']:7.1f}"
        )
    if federated is not None:
        cells = "".join(f" {federated[n]:9.4f}" if n in federated else f" {'-':>9s}" for n in names)
        print(f"{'federated (demo final version)':44s} {'MLP, FedAvg':16s}{cells}")
    print(json.dumps({"dataset": args.dataset, "seed": args.seed, "runs": runs, "federated": federated}))


if __name__ == "__main__":
    main()
