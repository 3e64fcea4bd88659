"""One rank of Horovod data-parallel pre-training; ``horovodrun`` starts one per slot.

    horovodrun -np N -H localhost:N --gloo python -m training_cluster.hvd_worker CONFIG.json

The recipe is Horovod's (Sergeev & Del Balso, 2018, arXiv:1802.05799) with the
large-minibatch rules of Goyal et al. (2017, arXiv:1706.02677):

- ``hvd.init()``; each rank trains on its own shard of every epoch's global
  shuffle (the DistributedSampler scheme, remainder dropped so that every rank
  takes the same number of steps and no allreduce waits for a missing rank);
- ``hvd.DistributedOptimizer`` averages gradients with ring-allreduce, fp16
  compression on request; on CPU all of a step's gradients go in one grouped
  allreduce; the rank sleeps rather than spins while it waits for them
  (:func:`wait_for_allreduces`);
- rank 0's initial parameters and optimiser state are broadcast to all ranks;
- the learning rate is the base rate times the world size, reached by a
  linear per-step warm-up from the base rate;
- metrics are summed across ranks with an allreduce, so they are those of the
  whole data set, not rank 0's shard;
- rank 0 alone writes a checkpoint after each epoch, the final flat parameter
  vector and the result; every rank writes the SHA-256 of its own final
  parameters so that the launcher can check that all ranks agree.

With ``gpus`` each rank pins ``cuda:<local rank>`` and Horovod reduces over
NCCL (it must have been built with ``HOROVOD_GPU_OPERATIONS=NCCL``).

The model is the job's zoo network and the loss the federation's
(:func:`shared.training.task_loss`), so the federation goes on training
exactly this network from where pre-training left it.

A job on an app (``[model] app``) owns its training loop (``App.train``), so
gradients cannot be averaged step by step; :func:`run_app` averages the
models instead, after every epoch (local SGD with periodic averaging: Zhang et
al., 2016, arXiv:1606.07365; Lin et al., ICLR 2020, arXiv:1808.07217). Rank 0's
initial parameters are broadcast; each rank loads its shard of the central
data through the app (``node_config`` ``partition-id`` = rank,
``num-partitions`` = world size, the Flower convention), trains one epoch with
the job's local settings, and the ranks' parameter vectors are averaged,
weighted by their example counts, with one allreduce. It is FedAvg with the
ranks as devices and one epoch per round, so the base learning rate is not
scaled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.apps import JobContext
from shared.training import as_tensors, task_loss
from shared.zoo import build_model, flatten_parameters

CONFIG_FORMAT = "aicfl.pretrain/1"


# --------------------------------------------------------------------------- pure helpers


def shard_indices(n: int, rank: int, size: int, epoch: int, seed: int) -> np.ndarray:
    """Rows rank ``rank`` of ``size`` trains on in ``epoch``: its slice of one global shuffle.

    Every rank draws the same permutation (seeded by ``seed`` and ``epoch``)
    and takes every ``size``-th row from position ``rank``; the last
    ``n % size`` rows of the permutation are dropped so that all shards have
    ``n // size`` rows. The shards of one epoch are disjoint.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a world of size {size}")
    per_rank = n // size
    if per_rank == 0:
        raise ValueError(f"{n} rows cannot be shared among {size} ranks")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[rank : per_rank * size : size]


def scaled_learning_rate(base: float, size: int, step: int, warmup_steps: int) -> float:
    """``base * size`` after a linear warm-up from ``base`` over ``warmup_steps`` steps (Goyal et al.)."""
    target = base * size
    if warmup_steps <= 0 or step >= warmup_steps:
        return target
    return base + (target - base) * step / warmup_steps


def wait_for_allreduces(optimizer: Any, poll: Callable[[int], bool], pause: float = 0.0002) -> None:
    """Sleep until every gradient allreduce that backward started on ``optimizer`` has finished.

    ``hvd.DistributedOptimizer.step()`` waits for them by spinning on
    ``sched_yield``; with as many ranks as cores (np=2 on 2 CPUs), the spinning
    main threads take the CPU from Horovod's own background and Gloo threads,
    which have to run for the allreduce to finish. Sleeping here leaves them
    the cores, and ``step()`` then finds its handles complete.
    """
    pending = [handle for handle, _ in optimizer._handles.values() if isinstance(handle, int)]
    while pending:
        pending = [handle for handle in pending if not poll(handle)]
        if pending:
            time.sleep(pause)


def parameter_sha256(vector: np.ndarray) -> str:
    """SHA-256 of a flat float32 parameter vector's bytes (little-endian), to compare ranks."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").tobytes()).hexdigest()


# --------------------------------------------------------------------------- the rank


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run(config: dict[str, Any]) -> None:
    """Train one rank as ``config`` says (see :func:`training_cluster.pretrain.pretrain`)."""
    import horovod
    import horovod.torch as hvd

    if config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"not a pre-training config (expected format {CONFIG_FORMAT!r})")
    if config.get("app") is not None:
        run_app(config)
        return
    workdir = Path(config["workdir"])
    task = config["task"]
    seed = int(config["seed"])
    epochs = int(config["epochs"])
    batch_size = int(config["batch_size"])
    base_lr = float(config["learning_rate"])
    gpus = bool(config.get("gpus", False))

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    # Horovod's own background thread does the reductions; the rest of the cores go to the math.
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    if gpus:
        if not hvd.nccl_built():
            raise RuntimeError(
                "--gpus needs Horovod built with NCCL (AICFL_HOROVOD_GPU=1 scripts/install_horovod.sh)"
            )
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")

    # Memory-mapped: each rank reads only the rows of its shards.
    x_all = np.load(config["x_path"], mmap_mode="r")
    y_all = np.load(config["y_path"], mmap_mode="r")
    n = int(x_all.shape[0])
    per_rank = n // size
    if per_rank == 0:
        raise ValueError(f"{n} rows cannot be shared among {size} ranks")
    steps_per_epoch = math.ceil(per_rank / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup_steps = (
        min(int(config.get("warmup_epochs", 1)) * steps_per_epoch, total_steps // 2) if size > 1 else 0
    )

    torch.manual_seed(seed * 1000 + rank)  # dropout masks differ per rank, like different workers'
    model = build_model(config["arch"], seed=seed).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if config["optimizer"] == "adam":
        optimizer = torch.optim.Adam(params, lr=base_lr)
    else:
        optimizer = torch.optim.SGD(params, lr=base_lr, momentum=float(config.get("momentum", 0.0)))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if config.get("fp16") else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=compression,
        op=hvd.Average,
        # On CPU, one allreduce of all the gradients once backward is done (as DDP's single bucket):
        # allreducing layer by layer overlaps nothing when every core is computing.
        groups=None if gpus else 1,
    )
    initial_sha = parameter_sha256(flatten_parameters(model))
    if rank == 0:
        _atomic_write(workdir / "initial.sha256", initial_sha.encode())

    checkpoints = workdir / "checkpoints"
    history: list[dict[str, float]] = []
    step = 0
    hvd.barrier()
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        epoch_started = time.perf_counter()
        idx = np.sort(shard_indices(n, rank, size, epoch, seed))
        x_np, y_np = np.asarray(x_all[idx]), np.asarray(y_all[idx])
        inputs, targets = as_tensors(x_np, y_np, task)
        inputs, targets = inputs.to(device), targets.to(device)
        order = torch.randperm(
            per_rank, generator=torch.Generator().manual_seed(seed * 7919 + epoch * 31 + rank)
        )
        order = order.to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for begin in range(0, per_rank, batch_size):
            lr = scaled_learning_rate(base_lr, size, step, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = order[begin : begin + batch_size]
            optimizer.zero_grad()  # Horovod's wrapper takes no set_to_none; None is the default
            loss = task_loss(model(inputs[batch]), targets[batch], task)
            loss.backward()
            wait_for_allreduces(optimizer, hvd.poll)
            optimizer.step()
            loss_sum += loss.detach().to(torch.float64) * batch.numel()
            step += 1
        # The loss of the whole epoch across ranks: the sums, reduced, over all ranks' rows.
        totals = hvd.allreduce(
            torch.stack([loss_sum.cpu(), torch.tensor(float(per_rank), dtype=torch.float64)]),
            op=hvd.Sum,
            name=f"epoch_loss.{epoch}",
        )
        epoch_seconds = hvd.allreduce(
            torch.tensor(time.perf_counter() - epoch_started, dtype=torch.float64),
            op=hvd.Max,
            name=f"epoch_s.{epoch}",
        )
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(totals[0] / totals[1]),
                "seconds": float(epoch_seconds),
                "samples": float(totals[1]),
                "learning_rate": lr,
            }
        )
        if rank == 0:
            checkpoints.mkdir(parents=True, exist_ok=True)
            path = checkpoints / f"epoch-{epoch + 1:03d}.pt"
            state = {
                "format": CONFIG_FORMAT,
                "arch": config["arch"],
                "epoch": epoch + 1,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
            }
            torch.save(state, path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)
    hvd.barrier()
    seconds = time.perf_counter() - started

    final = flatten_parameters(model)
    final_sha = parameter_sha256(final)
    _atomic_write(workdir / f"rank-{rank}.sha256", final_sha.encode())
    metrics = _metrics_across_ranks(
        hvd, model, x_all, y_all, rank, size, task, float(config.get("target_std", 1.0)), device
    )
    if rank == 0:
        np.save(workdir / "final.npy.tmp.npy", final)
        os.replace(workdir / "final.npy.tmp.npy", workdir / "final.npy")
        samples = sum(h["samples"] for h in history)
        result = {
            "world_size": size,
            "epochs": epochs,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "warmup_steps": warmup_steps,
            "learning_rate": {"base": base_lr, "scaled": base_lr * size},
            "fp16": bool(config.get("fp16")),
            "gpus": gpus,
            "device": str(device),
            "nccl": bool(hvd.nccl_built()),
            "horovod_version": horovod.__version__,
            "seconds": seconds,
            "samples_per_second": samples / seconds if seconds > 0 else None,
            "history": history,
            "metrics": metrics,
            "initial_sha256": initial_sha,
            "final_sha256": final_sha,
        }
        _atomic_write(workdir / "result.json", json.dumps(result, indent=2).encode())


def _metrics_across_ranks(
    hvd: Any,
    model: torch.nn.Module,
    x_all: np.ndarray,
    y_all: np.ndarray,
    rank: int,
    size: int,
    task: str,
    target_std: float,
    device: torch.device,
) -> dict[str, float]:
    """Train loss (and accuracy or RMSE) of the final model over all rows: each rank evaluates
    every ``size``-th row, and the sums are reduced across ranks."""
    idx = np.arange(rank, x_all.shape[0], size)
    inputs, targets = as_tensors(np.asarray(x_all[idx]), np.asarray(y_all[idx]), task)  # type: ignore[arg-type]
    model.eval()
    with torch.no_grad():
        out = model(inputs.to(device)).cpu()
    loss = float(task_loss(out, targets, task)) * len(idx)  # type: ignore[arg-type]
    if task == "binary":
        extra = float(((out.reshape(-1) >= 0) == (targets >= 0.5)).sum())
    elif task == "multiclass":
        extra = float((out.argmax(dim=1) == targets).sum())
    else:
        extra = float(((out.reshape(-1) - targets) ** 2).sum())
    sums = hvd.allreduce(
        torch.tensor([loss, extra, float(len(idx))], dtype=torch.float64), op=hvd.Sum, name="final_metrics"
    )
    count = float(sums[2])
    metrics = {"train_loss": float(sums[0]) / count, "train_examples": count}
    if task == "regression":
        metrics["train_rmse"] = math.sqrt(float(sums[1]) / count) * abs(target_std)
    else:
        metrics["train_accuracy"] = float(sums[1]) / count
    return metrics


# --------------------------------------------------------------------------- an app's rank


def _reduce_sum(hvd: Any, values: np.ndarray, name: str) -> np.ndarray:
    """The float64 sum of ``values`` over all ranks; the rank sleeps while it waits (see
    :func:`wait_for_allreduces`: a rank that finished its epoch first must not spin on the core of
    one still training). Every rank gets the very same bytes back."""
    handle = hvd.allreduce_async(
        torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)), op=hvd.Sum, name=name
    )
    while not hvd.poll(handle):
        time.sleep(0.0005)
    return np.asarray(hvd.synchronize(handle).numpy(), dtype=np.float64)


def weighted_average(weighted_sum: np.ndarray, count: float) -> np.ndarray:
    """The ranks' example-weighted mean parameters, ``sum_r(n_r * v_r) / sum_r(n_r)``, as float32,
    from the two reduced sums (FedAvg's rule, the ranks as devices)."""
    if count <= 0:
        raise ValueError("no rank trained on any example")
    return (np.asarray(weighted_sum, dtype=np.float64) / float(count)).astype(np.float32)


def central_job(job: JobContext) -> JobContext:
    """``job`` for central pre-training: no examples held out (``training.holdout`` 0), since the
    central data is not a device's and the model is measured on the job's reference data."""
    training = job.spec.training.model_copy(update={"holdout": 0.0})
    return JobContext(job.spec.model_copy(update={"training": training}), job.setup)


def rank_train_seed(seed: int, epoch: int, rank: int) -> int:
    """The ``TrainConfig.seed`` of ``rank`` in ``epoch``: distinct shuffles per rank and epoch,
    reproducible from the job's seed."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def run_app(config: dict[str, Any]) -> None:
    """Train one rank of an app job's pre-training by periodic model averaging (module docstring).

    ``config["app"]``: ``ref``, ``version``, ``spec`` (the job spec as JSON), ``setup`` (the
    job's), ``data_path``. Writes what :func:`run` writes: ``initial.sha256``, a checkpoint per
    epoch, ``rank-R.sha256``, and on rank 0 ``final.npy`` and ``result.json``.
    """
    import horovod
    import horovod.torch as hvd

    from shared.apps import DeviceContext, LocalData, TrainConfig, checked_metrics, load_app
    from shared.jobspec import JobSpec

    app_config = config["app"]
    workdir = Path(config["workdir"])
    seed = int(config["seed"])
    epochs = int(config["epochs"])
    batch_size = int(config["batch_size"])
    learning_rate = float(config["learning_rate"])
    threads = max(1, int(config.get("threads", 1)))

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    torch.set_num_threads(threads)
    app = load_app(str(app_config["ref"]), app_config.get("version"))
    spec = JobSpec.model_validate(app_config["spec"])
    job = JobContext(spec, app_config.get("setup"))
    device = DeviceContext(
        central_job(job),
        str(app_config["data_path"]),
        device_id=f"central-rank-{rank}",
        threads=threads,
        node_config={"partition-id": rank, "num-partitions": size},
    )
    data = app.load_data(device)
    if not isinstance(data, LocalData):
        raise TypeError(f"app load_data returned {type(data).__name__}, not a LocalData")

    # The model as the coordinator builds a version 0: under the job's seed (coordinator/apps.py).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np_state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            model = app.build_model(job)
        finally:
            np.random.set_state(np_state)
    torch.manual_seed(seed * 1000 + rank)  # dropout masks differ per rank, like different devices'
    initial = np.asarray(app.get_parameters(model), dtype=np.float32)
    # Rank 0's parameters for everyone (bit for bit, whatever each rank's build gave).
    initial = hvd.broadcast(torch.from_numpy(initial.copy()), root_rank=0, name="initial").numpy()
    app.set_parameters(model, initial)
    initial_sha = parameter_sha256(np.asarray(app.get_parameters(model), dtype=np.float32))
    if rank == 0:
        _atomic_write(workdir / "initial.sha256", initial_sha.encode())

    # How many examples each rank holds: a one-hot sum, so that rank 0 can report the shards.
    one_hot = np.zeros(size)
    one_hot[rank] = data.train_examples
    examples_per_rank = [int(v) for v in _reduce_sum(hvd, one_hot, "examples_per_rank")]
    if sum(examples_per_rank) == 0:
        raise ValueError(f"the central data at {device.data_path} gave no training examples")

    checkpoints = workdir / "checkpoints"
    history: list[dict[str, float]] = []
    hvd.barrier()
    started = time.perf_counter()
    for epoch in range(epochs):
        epoch_started = time.perf_counter()
        train_config = TrainConfig(
            round=epoch + 1,
            epochs=1,
            batch_size=batch_size,
            learning_rate=learning_rate,
            optimizer=str(config.get("optimizer", spec.training.optimizer)),
            seed=rank_train_seed(seed, epoch, rank),
            threads=threads,
            options=spec.model.options,
        )
        metrics: dict[str, float] = {"loss": 0.0}
        examples = data.train_examples
        if examples > 0:
            metrics = checked_metrics(app.train(model, data, train_config), "app train")
            if "loss" not in metrics:
                raise ValueError("app train returned no 'loss' metric")
            examples = int(metrics.pop("examples", examples))
        local = np.asarray(app.get_parameters(model), dtype=np.float64)
        # One allreduce: the example-weighted parameters, the example count and the loss sum.
        sums = _reduce_sum(
            hvd,
            np.concatenate([local * examples, [examples, metrics["loss"] * examples]]),
            f"average.{epoch}",
        )
        count = float(sums[-2])
        averaged = weighted_average(sums[:-2], count)
        app.set_parameters(model, averaged)
        # The slowest rank's time: a one-hot sum gives every rank's.
        own_seconds = np.zeros(size)
        own_seconds[rank] = time.perf_counter() - epoch_started
        seconds = _reduce_sum(hvd, own_seconds, f"epoch_s.{epoch}")
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(sums[-1]) / count,
                "seconds": float(seconds.max()),
                "samples": count,
                "learning_rate": learning_rate,
            }
        )
        if rank == 0:
            checkpoints.mkdir(parents=True, exist_ok=True)
            path = checkpoints / f"epoch-{epoch + 1:03d}.pt"
            state: dict[str, Any] = {
                "format": CONFIG_FORMAT,
                "app": app_config["ref"],
                "epoch": epoch + 1,
                "vector": torch.from_numpy(averaged.copy()),
                "history": history,
            }
            if isinstance(model, torch.nn.Module):
                state["model"] = model.state_dict()
            torch.save(state, path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)
    hvd.barrier()
    seconds_total = time.perf_counter() - started

    final = np.asarray(app.get_parameters(model), dtype=np.float32)
    final_sha = parameter_sha256(final)
    _atomic_write(workdir / f"rank-{rank}.sha256", final_sha.encode())
    metrics_all = _app_metrics_across_ranks(hvd, app, model, data)
    if rank == 0:
        np.save(workdir / "final.npy.tmp.npy", final)
        os.replace(workdir / "final.npy.tmp.npy", workdir / "final.npy")
        samples = sum(h["samples"] for h in history)
        result = {
            "scheme": "model averaging after each epoch",
            "app": app_config["ref"],
            "world_size": size,
            "epochs": epochs,
            "batch_size": batch_size,
            "examples_per_rank": examples_per_rank,
            "warmup_steps": 0,
            "learning_rate": {"base": learning_rate, "scaled": learning_rate},
            "fp16": False,
            "gpus": False,
            "device": "cpu",
            "nccl": bool(hvd.nccl_built()),
            "horovod_version": horovod.__version__,
            "seconds": seconds_total,
            "samples_per_second": samples / seconds_total if seconds_total > 0 else None,
            "history": history,
            "metrics": metrics_all,
            "initial_sha256": initial_sha,
            "final_sha256": final_sha,
        }
        _atomic_write(workdir / "result.json", json.dumps(result, indent=2).encode())


def _app_metrics_across_ranks(hvd: Any, app: Any, model: Any, data: Any) -> dict[str, float]:
    """The app's metrics (``App.evaluate``) of the final model on every rank's training examples,
    averaged over all ranks weighted by their counts, each prefixed ``train_``; ``train_examples``
    is the total."""
    from shared.apps import LocalData, checked_metrics

    n = int(data.train_examples)
    own: dict[str, float] = {}
    if n > 0:
        on_train = LocalData(train=data.train, holdout=data.train, train_examples=n, holdout_examples=n)
        own = checked_metrics(app.evaluate(model, on_train), "app evaluate")
        own.pop("examples", None)
    # The names of rank 0 (or of the first rank with examples, should rank 0 have none) for all.
    names = sorted(own)
    offers = hvd.allgather_object(names, name="metric_names")
    names = next((offer for offer in offers if offer), [])
    missing = [name for name in names if n > 0 and name not in own]
    if missing:
        raise ValueError(f"app evaluate returned no {', '.join(missing)} on rank {hvd.rank()}")
    sums = _reduce_sum(hvd, np.array([own.get(k, 0.0) * n for k in names] + [n], dtype=np.float64), "final")
    count = float(sums[-1])
    metrics = {f"train_{k}": float(v) / count for k, v in zip(names, sums[:-1], strict=True)}
    metrics["train_examples"] = count
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training_cluster.hvd_worker CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    rank = os.environ.get("HOROVOD_RANK", "0")
    try:
        run(config)
    except Exception:
        # The launcher reports the tail of this file as the rank's error.
        text = traceback.format_exc()
        try:
            _atomic_write(Path(config["workdir"]) / f"rank-{rank}.err", text.encode())
        finally:
            print(text, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
