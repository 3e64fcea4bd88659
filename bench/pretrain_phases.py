"""Where a pre-training step's time goes with Horovod on CPU: per-phase times and per-thread CPU of a rank.

The figures behind BENCHMARKS.md's "Where Horovod's time goes on 2 cores". The
same loop and data as ``bench/pretrain.py`` (the zoo's 3-layer MLP on
mlc_churn, ``--batch`` rows per rank per step, one torch thread per rank), in
one invocation, for these configurations (``horovodrun --gloo`` unless DDP):

- ``np1``: one rank, ``hvd.DistributedOptimizer`` (nothing to exchange);
- ``np2-no-allreduce-cycle-<ms>``: two ranks after ``hvd.init()`` training
  with a plain optimiser, no allreduce at all, at Horovod cycle times of 1, 3
  and 50 ms: what Horovod's background coordination alone costs the compute;
- ``np2-horovod-defaults``: ``hvd.DistributedOptimizer`` with Horovod's
  defaults (1 ms cycle, one allreduce per tensor, Horovod's spinning wait);
- ``np2-ranks``: as the pre-training ranks run on CPU (``CPU_CYCLE_TIME_MS``,
  one group, the sleeping wait);
- ``np2-ddp``: ``DistributedDataParallel`` on gloo (its allreduce happens inside
  ``backward()``, so there it is in the forward + backward figure).

Rank 0 reports medians over the timed steps of forward + backward, the wait
for the allreduces and ``step()``, and, over the timed window, read from
``/proc/self/task``: the CPU seconds of its main thread and of all its other
threads (Horovod's background thread, Gloo's), and its main thread's
involuntary context switches (preemptions), per second.

    python bench/pretrain_phases.py [--steps 100] [--batch 2048] [--hidden 512 512] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS: dict[str, dict[str, Any]] = {
    "np1": {"np": 1, "mode": "horovod", "cycle": "1", "groups": 0, "sleep": False},
    "np2-no-allreduce-cycle-1ms": {"np": 2, "mode": "plain", "cycle": "1"},
    "np2-no-allreduce-cycle-3ms": {"np": 2, "mode": "plain", "cycle": "3"},
    "np2-no-allreduce-cycle-50ms": {"np": 2, "mode": "plain", "cycle": "50"},
    "np2-horovod-defaults": {"np": 2, "mode": "horovod", "cycle": "1", "groups": 0, "sleep": False},
    "np2-ranks": {"np": 2, "mode": "horovod", "cycle": None, "groups": 1, "sleep": True},
    "np2-ddp": {"np": 2, "mode": "ddp"},
}


def _threads() -> dict[int, tuple[float, int]]:
    """This process's threads: CPU seconds and involuntary context switches of each."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, int]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        switches = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        out[int(tid)] = ((int(fields[11]) + int(fields[12])) / tick, switches)
    return out


def rank(args: argparse.Namespace) -> None:
    from bench.pretrain import rank_setup
    from shared.training import task_loss

    cfg = CONFIGS[args.config]
    if cfg["mode"] == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        r, size = dist.get_rank(), dist.get_world_size()
    else:
        import horovod.torch as hvd

        hvd.init()
        r, size = hvd.rank(), hvd.size()
    x, y, model, optimizer = rank_setup(args, r, size)
    wait = None
    if cfg["mode"] == "ddp":
        model = DistributedDataParallel(model)
    elif cfg["mode"] == "horovod":
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), groups=cfg["groups"] or None
        )
        if cfg["sleep"]:
            from training_cluster.hvd_worker import wait_for_allreduces

            def wait() -> None:
                wait_for_allreduces(optimizer, hvd.poll)

    batches = x.shape[0] // args.batch
    phases: list[tuple[float, float, float]] = []
    main = threading.get_native_id()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            before, t_start = _threads(), time.perf_counter()
        b = (step % batches) * args.batch
        t0 = time.perf_counter()
        optimizer.zero_grad()
        task_loss(model(x[b : b + args.batch]), y[b : b + args.batch], "binary").backward()
        t1 = time.perf_counter()
        if wait is not None:
            wait()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if step >= args.warmup:
            phases.append((t1 - t0, t2 - t1, t3 - t2))
    after, seconds = _threads(), time.perf_counter() - t_start
    if r == 0:
        ms = 1000 * np.median(np.array(phases), axis=0)
        others = sum(cpu - before.get(tid, (0.0, 0))[0] for tid, (cpu, _) in after.items() if tid != main)
        Path(args.out).write_text(
            json.dumps(
                {
                    "forward_backward_ms": float(ms[0]),
                    "wait_ms": float(ms[1]),
                    "step_ms": float(ms[2]),
                    "total_ms": float(np.median(np.array(phases).sum(axis=1)) * 1000),
                    "main_thread_cpu_share": (after[main][0] - before[main][0]) / seconds,
                    "other_threads_cpu_share": others / seconds,
                    "main_thread_preemptions_per_s": (after[main][1] - before[main][1]) / seconds,
                }
            )
        )


def launch(name: str, args: argparse.Namespace, x: Path, y: Path, out: Path) -> dict[str, float]:
    from bench.pretrain import launch_ranks, loop_args
    from training_cluster.pretrain import CPU_CYCLE_TIME_MS

    cfg = CONFIGS[name]
    script = [str(Path(__file__).resolve()), "--config", name, *loop_args(args, x, y, out)]
    env = {} if cfg["mode"] == "ddp" else {"HOROVOD_CYCLE_TIME": cfg["cycle"] or CPU_CYCLE_TIME_MS}
    return launch_ranks("ddp" if cfg["mode"] == "ddp" else "horovod", cfg["np"], script, env, out, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=100, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=2048, help="rows per rank per step")
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    p.add_argument("--json-out", type=Path)
    p.add_argument("--x", type=Path)
    p.add_argument("--y", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.config:
        return rank(args)

    import horovod
    import torch

    from bench.pretrain import prepare

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="aicfl-bench-phases-") as tmp:
        work = Path(tmp)
        x, y, features = prepare(work, rows=2 * args.batch * 8)
        for name in CONFIGS:
            load = os.getloadavg()[0]
            results[name] = {**launch(name, args, x, y, work / "out.json"), "load": load}
            print(f"  {name}: {results[name]['total_ms']:.1f} ms a step (load {load:.2f})", flush=True)
    print()
    print(
        f"3-layer MLP {features}-{'-'.join(map(str, args.hidden))}-1, batch {args.batch}/rank, {args.steps} steps;"
        f" {os.cpu_count()} CPUs, torch {torch.__version__}, horovod {horovod.__version__}; medians, rank 0"
    )
    print(
        "| configuration | forward+backward ms | wait ms | step() ms | step total ms"
        " | main thread CPU | other threads CPU | main-thread preemptions/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['forward_backward_ms']:.1f} | {r['wait_ms']:.1f} | {r['step_ms']:.1f}"
            f" | {r['total_ms']:.1f} | {r['main_thread_cpu_share']:.0%} | {r['other_threads_cpu_share']:.0%}"
            f" | {r['main_thread_preemptions_per_s']:,.0f} |"
        )
    result = {
        "bench": "pretrain_phases",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "horovod": horovod.__version__},
        "batch_per_rank": args.batch,
        "steps": args.steps,
        "results": results,
    }
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
