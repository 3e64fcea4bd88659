"""TensorFlow Federated's side of ``bench/tff_peer.py``; runs in TFF's own virtualenv.

    .venv-tff/bin/python bench/tff_side.py FOLDER

FOLDER holds what ``tff_peer.write_inputs`` wrote: ``config.json``, ``device-<i>.npz`` (each
device's training rows, already preprocessed), ``test.npz`` (the held-out rows) and ``init.npz``
(version 0's weights, Keras layout). This script trains TFF's FedAvg
(``tff.learning.algorithms.build_weighted_fed_avg``, client Adam, server SGD at 1.0) for the
configured rounds, or with ``config["dp"]`` the unweighted FedAvg whose model aggregator is TFF's
distributed DP (``DistributedDpSumFactory`` from ``tensorflow_federated.python.aggregators.
distributed_dp``, which 0.87 does not export; distributed Skellam at a fixed L2 clip, inside
``UnweightedMeanFactory`` with a secure count, as ``tff.learning.ddp_secure_aggregator`` composes
it but without its adaptive clip and zeroing, so that the noise stays what was asked). After
every round the global model is measured on the test rows. It writes ``report.json`` to FOLDER:
per round accuracy, AUC, test loss, the clients' training loss, seconds, and for DP the mechanism's
own parameters (scaled L2 sensitivity, local noise stddev, clients, padded dimension) from which
``tff_peer`` computes ε.

It imports nothing of aicfl (whose dependencies need another numpy). TFF's C++ worker_binary
outlives this process: on the way out this script kills its own child processes, and
``tff_peer`` also kills the process group it started this script in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc; this venv has no psutil)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4, after the command in parentheses, which may itself hold spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def stop_children() -> None:
    """Kill this process's children (TFF's worker_binary), which would otherwise outlive it."""
    for child in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties averaged); NaN when one class is absent."""
    from scipy.stats import rankdata

    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main(folder: Path) -> dict[str, Any]:
    import tensorflow as tf
    import tensorflow_federated as tff

    config = json.loads((folder / "config.json").read_text())
    tf.random.set_seed(config["seed"])
    init = np.load(folder / "init.npz")
    n_layers = len(config["hidden"]) + 1
    initial = [init[f"{kind}{i}"] for i in range(n_layers) for kind in ("w", "b")]
    devices = [np.load(folder / f"device-{i}.npz") for i in range(config["devices"])]
    test = np.load(folder / "test.npz")
    x_test, y_test = test["x"], test["y"]

    def keras_model() -> tf.keras.Model:
        layers: list[tf.keras.layers.Layer] = [tf.keras.Input(shape=(config["input_dim"],))]
        layers += [tf.keras.layers.Dense(h, activation="relu") for h in config["hidden"]]
        layers.append(tf.keras.layers.Dense(1))  # a logit, as aicfl's binary head
        return tf.keras.Sequential(layers)

    input_spec = (
        tf.TensorSpec(shape=(None, config["input_dim"]), dtype=tf.float32),
        tf.TensorSpec(shape=(None, 1), dtype=tf.float32),
    )

    def model_fn() -> Any:
        return tff.learning.models.from_keras_model(
            keras_model(),
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
            input_spec=input_spec,
        )

    if config["optimizer"] == "adam":
        # torch's eps (aicfl trains with torch's Adam); TFF adds it to sqrt(v), not sqrt(v_hat).
        client_opt = tff.learning.optimizers.build_adam(config["learning_rate"], epsilon=1e-8)
    else:
        client_opt = tff.learning.optimizers.build_sgdm(config["learning_rate"])
    server_opt = tff.learning.optimizers.build_sgdm(1.0)
    dp = config["dp"]
    if dp is None:
        process = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn, client_optimizer_fn=client_opt, server_optimizer_fn=server_opt
        )
    else:
        # The local C++ runtime has no secure sum; TFF's test context compiles the secure
        # intrinsics to plain sums (modular where the intrinsic is), as TFF's own DP tests run.
        tff.backends.test.set_sync_test_cpp_execution_context()
        # The nested DP aggregators build computations deeper than the 100 levels protobuf's upb
        # backend parses by default ("DecodeError: Error parsing message"); this lifts the limit.
        from google._upb import _message as upb_message

        upb_message.SetAllowOversizeProtos(True)
        # 0.87 does not export it under tff.aggregators; tff.learning.ddp_secure_aggregator uses it
        # from here (with an adaptive clip and zeroing, which this run leaves out).
        from tensorflow_federated.python.aggregators.distributed_dp import DistributedDpSumFactory

        ddp = DistributedDpSumFactory(
            noise_multiplier=dp["noise_multiplier"],
            expected_clients_per_round=config["devices"],
            bits=dp["bits"],
            l2_clip=dp["clip"],
            mechanism=dp["mechanism"],
            auto_l2_clip=False,
        )
        aggregator = tff.aggregators.UnweightedMeanFactory(
            value_sum_factory=ddp,
            count_sum_factory=tff.aggregators.SecureSumFactory(
                upper_bound_threshold=1, lower_bound_threshold=0
            ),
        )
        process = tff.learning.algorithms.build_unweighted_fed_avg(
            model_fn,
            client_optimizer_fn=client_opt,
            server_optimizer_fn=server_opt,
            model_aggregator=aggregator,
        )

    state = process.initialize()
    state = process.set_model_weights(
        state, tff.learning.models.ModelWeights(trainable=initial, non_trainable=[])
    )
    evaluator = keras_model()
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)

    def measure(weights: Any) -> dict[str, float]:
        weights.assign_weights_to(evaluator)
        logits = evaluator(x_test, training=False).numpy().reshape(-1)
        return {
            "accuracy": float(((logits > 0) == (y_test == 1)).mean()),
            "auc": auc(y_test, logits),
            "loss": float(loss_fn(y_test.reshape(-1, 1), logits.reshape(-1, 1)).numpy()),
        }

    def datasets(round_number: int) -> list[tf.data.Dataset]:
        out = []
        for i, d in enumerate(devices):
            n = len(d["y"])
            ds = tf.data.Dataset.from_tensor_slices((d["x"], d["y"].reshape(-1, 1)))
            # Reshuffled each epoch, batched per epoch, as aicfl's train_local does.
            ds = ds.shuffle(max(1, n), seed=config["seed"] * 1_000_003 + round_number * 10_007 + i)
            out.append(ds.batch(config["batch_size"]).repeat(config["epochs"]))
        return out

    rounds = []
    dp_params: dict[str, Any] | None = None
    t_start = time.perf_counter()
    for r in range(1, config["rounds"] + 1):
        t0 = time.perf_counter()
        output = process.next(state, datasets(r))
        state = output.state
        metrics = output.metrics
        row = {"round": r, **measure(process.get_model_weights(state))}
        row["train_loss"] = float(metrics["client_work"]["train"]["loss"])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rounds.append(row)
        print(json.dumps(row), flush=True)
        if dp is not None:
            agg = metrics["aggregator"]["mean_value"]
            dp_params = {
                "scale_factor": float(agg["scale_factor"]),
                "scaled_inflated_l2": float(agg["scaled_inflated_l2"]),
                "scaled_local_stddev": float(agg["scaled_local_stddev"]),
                "actual_num_clients": int(agg["actual_num_clients"]),
                "padded_dim": int(agg["padded_dim"]),
            }
    return {
        "engine": f"tensorflow-federated {tff.__version__} (tensorflow {tf.__version__})",
        "algorithm": "build_weighted_fed_avg"
        if dp is None
        else "build_unweighted_fed_avg + DistributedDpSumFactory",
        "rounds": rounds,
        "final_auc": rounds[-1]["auc"] if rounds else None,
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "dp_params": dp_params,
        "finite": all(math.isfinite(row["loss"]) and math.isfinite(row["train_loss"]) for row in rounds),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tff_side.py FOLDER")
    where = Path(sys.argv[1])
    try:
        report = main(where)
        (where / "report.json").write_text(json.dumps(report))
    finally:
        stop_children()
