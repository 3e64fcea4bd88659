"""A user's Flower client under aicfl-agent, next to the same training written as an aicfl App.

Flower's PyTorch quickstart (``tests/fixtures/flower_quickstart``: its ``ClientApp`` built from
``client_fn``, unchanged, on scikit-learn's 8x8 digits) is trained by a real coordinator (SQLite)
and ``--devices`` real agent processes, enrolled with ``--node-config "partition-id=i
num-partitions=N"``, for ``--rounds`` rounds under SecAgg+, then evaluated once more (the
evaluation round after training). The same job then runs with ``native_app.py``: the same
``Net``, partitions, ``train`` and ``test`` behind the aicfl App interface, with the same
hyperparameters (3 local epochs of SGD, learning rate 0.05, batches of 16). Each variant gets a
fresh coordinator and fresh agents; with ``--repeat`` they alternate.

Printed (one line of JSON per run, then a table of medians):

- ``job_seconds``: from the job's submission to its completion (all rounds and the evaluation).
- ``first_round_seconds``: the first training round, in which each agent imports the app (torch,
  flwr, scikit-learn) and loads its data; ``later_round_seconds``: the mean of the others.
- ``agent_cpu_seconds``: CPU seconds (user + system) of each agent process from start to the
  job's end, mean over the agents (imports included).
- ``accuracy``: federated accuracy of each version, the devices' weighted ``evaluate`` on their
  validation splits (version 0 is the untrained ``Net``; ten classes, so chance is 0.1).
- ``loadavg_1m_before``: the machine's 1-minute load average when the run started.

Then, for each variant, what one agent's work costs in CPU alone, out of the network and the
round's waits (a fresh process: ``process_time``): importing the app, loading the data, and each
round's ``evaluate`` (of the incoming model) and ``train`` through the app interface, as the
agent's worker calls them (``local_*``, one JSON line per variant). On a loaded machine these are
the figures to compare.

    python bench/flower_client.py [--devices 3] [--rounds 3] [--repeat 1] [--only flower|native]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"
EPOCHS, LEARNING_RATE, BATCH_SIZE = 3, 0.05, 16


def spec(variant: str, devices: int, rounds: int) -> dict[str, Any]:
    if variant == "flower":
        model: dict[str, Any] = {
            "app": "flower_quickstart.client_app:app",
            "app_version": "0",
            "options": {
                "initial": "flower_quickstart.task:Net",
                "run_config": {
                    "local-epochs": EPOCHS,
                    "learning-rate": LEARNING_RATE,
                    "batch-size": BATCH_SIZE,
                },
            },
        }
    else:
        model = {"app": "flower_quickstart.native_app:app", "app_version": "0"}
    return {
        "name": f"quickstart-{variant}",
        "rounds": rounds,
        "seed": 1,
        "secure": True,
        "model": model,
        "training": {
            "epochs": EPOCHS,
            "learning_rate": LEARNING_RATE,
            "batch_size": BATCH_SIZE,
            "optimizer": "sgd",
        },
        "cohort": {"target": devices, "minimum": devices, "stage_timeout": 120, "selection_timeout": 10},
        "audit": {"enabled": False},
    }


def _seconds(r: dict[str, Any]) -> float:
    return (datetime.fromisoformat(r["ended_at"]) - datetime.fromisoformat(r["started_at"])).total_seconds()


def run(variant: str, devices: int, rounds: int) -> dict[str, Any]:
    """One job of ``variant`` on a fresh coordinator and fresh agents; its figures."""
    import psutil

    from tests.integration.harness import Coordinator

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="aicfl-flower-bench-") as tmp:
        c = Coordinator(Path(tmp))
        c.bootstrap()
        c.start()
        try:
            homes = [
                c.enroll(
                    Path(tmp), f"node-{i}", ["--node-config", f"partition-id={i} num-partitions={devices}"]
                )
                for i in range(devices)
            ]
            agents = [psutil.Process(c.run_agent(h, {"OMP_NUM_THREADS": "1"}).pid) for h in homes]
            api = c.api()
            t0 = time.perf_counter()
            job = api.json("POST", "/v1/jobs", json=spec(variant, devices, rounds))
            c.wait_job(job["id"], timeout=900)
            job_seconds = time.perf_counter() - t0
            cpu = [sum(p.cpu_times()[:2]) for p in agents]
            train = [r for r in c.rounds(job["id"]) if r["kind"] == "train"]
            versions = api.json("GET", f"/v1/jobs/{job['id']}/models")
        finally:
            c.stop_agents()
            c.stop()
    assert all(r["status"] == "completed" and r["completed_by"] == devices for r in train), train
    return {
        "variant": variant,
        "devices": devices,
        "rounds": rounds,
        "job_seconds": round(job_seconds, 2),
        "first_round_seconds": round(_seconds(train[0]), 2),
        "later_round_seconds": round(statistics.mean(_seconds(r) for r in train[1:]), 2)
        if rounds > 1
        else None,
        "agent_cpu_seconds": round(statistics.mean(cpu), 2),
        "accuracy": [round(v["metrics"]["federated"]["accuracy"], 4) for v in versions],
        "loadavg_1m_before": round(load, 2),
    }


def local(variant: str, rounds: int) -> dict[str, Any]:
    """CPU seconds of one agent's work for ``variant``, in this process (fresh imports)."""
    sys.path.insert(0, str(FIXTURES))
    clock = time.process_time
    t0 = clock()  # nothing of aicfl's or the app's is imported yet
    from shared.apps import DeviceContext, JobContext, TrainConfig, load_app
    from shared.jobspec import JobSpec

    job_spec = spec(variant, 3, rounds)
    t1 = clock()
    app = load_app(job_spec["model"]["app"], "0")
    t2 = clock()
    job = JobContext(JobSpec.model_validate(job_spec))
    data = app.load_data(
        DeviceContext(job, str(FIXTURES), "bench-0", 1, {"partition-id": 0, "num-partitions": 3})
    )
    t3 = clock()
    vector = app.get_parameters(app.build_model(job))
    per_round = []
    for r in range(rounds):
        start = clock()
        model = app.build_model(job)
        app.set_parameters(model, vector)
        app.evaluate(model, data)
        model = app.build_model(job)
        app.set_parameters(model, vector)
        config = TrainConfig(r + 1, EPOCHS, BATCH_SIZE, LEARNING_RATE, "sgd", seed=r)
        app.train(model, data, config)
        vector = app.get_parameters(model)
        per_round.append(clock() - start)
    return {
        "variant": variant,
        "local_import_shared_seconds": round(t1 - t0, 3),
        "local_load_app_seconds": round(t2 - t1, 3),
        "local_load_data_seconds": round(t3 - t2, 3),
        "local_round_seconds": [round(x, 3) for x in per_round],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", choices=("flower", "native"))
    parser.add_argument("--local", choices=("flower", "native"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local:
        print(json.dumps(local(args.local, args.rounds)))
        return

    from tests.integration import harness

    path = [str(FIXTURES), str(ROOT), harness.ENV.get("PYTHONPATH", "")]
    harness.ENV["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    variants = [args.only] if args.only else ["flower", "native"]
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {time.strftime('%Y-%m-%d %H:%M %Z')}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(args.repeat):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            out = run(variant, args.devices, args.rounds)
            results[variant].append(out)
            print(json.dumps(out), flush=True)

    print("\n| variant | job | first round | later rounds | agent CPU | final accuracy |")
    print("|---|---|---|---|---|---|")
    for variant, runs in results.items():

        def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(r[key] for r in runs if r[key] is not None)

        final = statistics.median(r["accuracy"][-1] for r in runs)
        print(
            f"| {variant} | {median('job_seconds'):.1f} s | {median('first_round_seconds'):.1f} s"
            f" | {median('later_round_seconds'):.2f} s | {median('agent_cpu_seconds'):.1f} s | {final:.3f} |"
        )
    print()
    for variant in variants:
        cmd = [sys.executable, __file__, "--local", variant, "--rounds", str(args.rounds)]
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
