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
