"""Flower's federated XGBoost bagging, as its ``xgboost-quickstart`` example runs it, for bench/gbdt.py.

flwr 1.42's ``flwr.serverapp.strategy.FedXgbBagging`` in a ``ServerApp`` and a ``ClientApp`` through
``flwr.simulation.run_simulation`` (the Ray backend, one CPU per client actor), one virtual SuperNode per
device. As in the example: in server round 1 each client trains ``local_rounds`` trees from scratch on its
own rows (``xgboost.train``); in every later round it loads the global model and adds ``local_rounds`` trees
on its own rows (``Booster.update``), and sends back only those new trees; the server appends every
client's new trees to the global model (``aggregate_bagging``). So each server round adds
``devices * local_rounds`` trees, each grown on one device's rows against the margins of all the trees
before it, and the global model is their sum (each tree keeps its own ``eta``). The rows travel in the
clear: Flower's bagging has no secure aggregation of its own (each client's trees are its model).

The test AUC is the final global model's on the held-out rows, computed in the ServerApp (the example
evaluates on the clients' validation rows instead). ``wall_seconds`` is ``run_simulation`` whole (Ray's
start included); ``rounds_seconds`` is ``strategy.start`` alone, inside the ServerApp.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

# Flower reads these at import time; the benchmark must not phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

Rows = tuple[np.ndarray, np.ndarray]


def _apps(
    parts: list[Rows], test: Rows, params: dict[str, Any], rounds: int, local_rounds: int, out: dict[str, Any]
) -> tuple[Any, Any]:
    """The ServerApp and ClientApp (the quickstart's, with the rows handed in); results go into ``out``."""
    import xgboost
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedXgbBagging

    from shared.training import metrics_from_predictions

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        x, y = parts[int(context.node_config["partition-id"])]
        dtrain = xgboost.DMatrix(x, label=y)
        if msg.content["config"]["server-round"] == 1:
            bst = xgboost.train(params, dtrain, num_boost_round=local_rounds)
        else:
            bst = xgboost.Booster(params=params)
            bst.load_model(bytearray(msg.content.array_records["arrays"]["0"].numpy().tobytes()))
            for _ in range(local_rounds):
                bst.update(dtrain, bst.num_boosted_rounds())
            # Bagging: only the trees this client just grew go back.
            bst = bst[bst.num_boosted_rounds() - local_rounds : bst.num_boosted_rounds()]
        model = np.frombuffer(bst.save_raw("json"), dtype=np.uint8)
        content = RecordDict(
            {"arrays": ArrayRecord([model]), "metrics": MetricRecord({"num-examples": len(y)})}
        )
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        n = len(parts)
        strategy = FedXgbBagging(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n,
            min_available_nodes=n,
        )
        t0 = time.perf_counter()
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([np.frombuffer(b"", dtype=np.uint8)]),
            num_rounds=rounds,
        )
        out["rounds_seconds"] = time.perf_counter() - t0
        bst = xgboost.Booster(params=params)
        bst.load_model(bytearray(result.arrays["0"].numpy().tobytes()))
        xt, yt = test
        out["trees"] = bst.num_boosted_rounds()
        out["metrics"] = metrics_from_predictions("binary", yt, bst.predict(xgboost.DMatrix(xt)))

    return server_app, client_app


def run_bagging(
    parts: list[Rows],
    test: Rows,
    params: dict[str, Any],
    rounds: int,
    *,
    local_rounds: int = 1,
    num_cpus: int = 2,
) -> dict[str, Any]:
    """``rounds`` server rounds of FedXgbBagging over ``parts`` in Flower's simulation; AUC on ``test``."""
    from flwr.simulation import run_simulation

    out: dict[str, Any] = {}
    server_app, client_app = _apps(parts, test, params, rounds, local_rounds, out)
    backend_config: Any = {
        "init_args": {
            "num_cpus": num_cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
        },
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    flwr_logger.setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(parts),
            backend_config=backend_config,
        )
    finally:
        _ray_shutdown()
        flwr_logger.setLevel(old_level)
    wall = time.perf_counter() - t0
    if "metrics" not in out:
        raise RuntimeError(f"Flower's FedXgbBagging did not finish its {rounds} rounds")
    return {
        "auc": out["metrics"].get("auc"),
        "trees": out["trees"],
        "wall_seconds": round(wall, 1),
        "rounds_seconds": round(out["rounds_seconds"], 1),
        "flwr": _version("flwr"),
    }


def _ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
