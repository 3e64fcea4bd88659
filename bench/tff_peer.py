"""TensorFlow Federated beside aicfl: the same job, devices, preprocessing, network and rounds.

Both sides, in one invocation, run ``examples/churn.toml``'s job (``--job``) over the same devices:

- **data**: ``server.simulation.data.prepare`` (the bundled ``mlc_churn`` rows, a fifth held out
  stratified by the target, the rest dealt by ``--split``, seeded by ``--seed``), the preprocessing
  fitted on the pooled training rows (``shared.tabular``: what aicfl's statistics round computes
  from the devices' sums), and each device's holdout rows set aside as aicfl's
  ``DeviceContext.holdout_split`` does (with device ids ``tff-<i>``, so the held-aside rows are
  drawn alike but are not the very rows aicfl's enrolled devices keep).
- **network**: the job's MLP (``shared.zoo``), Linear-ReLU blocks and a logit output, rebuilt in
  Keras with version 0's weights copied from aicfl's seeded model, so both start from the same point.
- **local training**: the job's epochs, batch size, optimiser and learning rate (Adam with torch's
  defaults, eps 1e-8), every device every round; FedAvg weighted by training examples.
- **measure**: accuracy and ROC AUC of every round's global model on the held-out test rows.

**aicfl** runs the job through ``server.simulation.simulate_job`` (the engine and the agent's
worker per device, SecAgg+ when the job is secure; ``--plain`` sets ``secure = false``). Its
``--aicfl-dp`` runs aicfl's own device-level DP (distributed Skellam under SecAgg+) at the ε
TFF's DP run spent (``--dp``; or ``--epsilon`` with ``--aicfl-only``), same δ and clip, the noise
multiplier calibrated by aicfl's coordinator for that ε over the rounds.

**TensorFlow Federated** 0.87 runs in its own virtualenv (``scripts/install_tff.sh``), as
``bench/tff_side.py`` in a child process of its own process group, over the arrays this script
writes to a temporary folder (``device-<i>.npz``, ``test.npz``, ``init.npz``, ``config.json``):
``tff.learning.algorithms.build_weighted_fed_avg`` with TFF's own Adam on the devices and SGD(1.0)
on the server. With ``--dp`` it runs TFF's distributed DP instead: the unweighted FedAvg with
TFF's ``DistributedDpSumFactory`` (distributed Skellam, the mechanism aicfl's
``shared.privacy.skellam`` implements) at ``--noise-multiplier`` and ``--clip``, and this script
reports that run's ε at ``--delta`` from ``shared.privacy.accounting`` (every device every round:
no sampling amplification), so that aicfl's DP run can be set at the same ε once it exists.
TFF's C++ ``worker_binary`` outlives the Python process that started it: the whole process group
is killed afterwards, and the report says whether any was left.

Wall time is each side's whole run, data already split; TFF's includes starting TensorFlow and
tracing its computations, aicfl's includes enrolling the devices and its statistics and federated
evaluation rounds.

    python bench/tff_peer.py [--devices 50] [--rounds 10] [--split group] [--plain]
                             [--dp --noise-multiplier 1.0 --clip 0.5] [--tff-only | --aicfl-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "churn.toml"
TFF_PYTHON = ROOT / ".venv-tff" / "bin" / "python"
TFF_SIDE = ROOT / "bench" / "tff_side.py"


class TffSideError(RuntimeError):
    """TFF's side failed or left a worker_binary behind; the message says which and why."""


def write_inputs(spec: Any, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Deal the job's devices and write what TFF's side reads; returns ``config.json``'s content."""
    import torch

    from server.simulation.data import prepare
    from server.simulation.splits import parse_split
    from shared.apps import DeviceContext, JobContext
    from shared.tabular import Preprocessor, local_statistics
    from shared.zoo import architecture, build_model

    schema = spec.tabular
    if schema.task != "binary":
        raise SystemExit(f"tff_peer: only binary jobs are compared (AUC); {args.job} is {schema.task}")
    data, described = prepare(args.data, schema, parse_split(args.split), args.devices, args.seed)
    pre = Preprocessor.from_statistics(local_statistics(data.train, schema), schema)
    arch = architecture(spec.model, pre.input_dim, pre.output_dim)
    if arch["dropout"]:
        raise SystemExit("tff_peer: the Keras copy has no dropout layers; use a job without [model] dropout")
    job = JobContext(spec, pre.to_dict())
    examples = []
    for i, part in enumerate(data.parts):
        train_idx, _ = DeviceContext(job, "", f"tff-{i}").holdout_split(len(part))
        x, y = pre.transform(part.iloc[train_idx])
        np.savez(folder / f"device-{i}.npz", x=x, y=y)
        examples.append(len(y))
    x_test, y_test = pre.transform(data.test)
    np.savez(folder / "test.npz", x=x_test, y=y_test)
    # Version 0 as aicfl builds it; torch's Linear holds (out, in), Keras's Dense (in, out).
    with torch.random.fork_rng(devices=[]):
        model = build_model(arch, seed=spec.seed)
    state = [t.detach().numpy() for t in model.state_dict().values()]
    layers = {
        f"w{i // 2}" if i % 2 == 0 else f"b{i // 2}": t.T if i % 2 == 0 else t for i, t in enumerate(state)
    }
    np.savez(folder / "init.npz", **layers)
    training = spec.training
    config = {
        "devices": args.devices,
        "rounds": args.rounds,
        "seed": args.seed,
        "hidden": arch["hidden"],
        "input_dim": arch["input_dim"],
        "epochs": training.epochs,
        "batch_size": training.batch_size,
        "learning_rate": training.learning_rate,
        "optimizer": training.optimizer,
        "dp": None,
        "split": described["split"],
        "train_examples": examples,
    }
    if args.dp:
        config["dp"] = {
            "noise_multiplier": args.noise_multiplier,
            "clip": args.clip,
            "bits": args.bits,
            "mechanism": "distributed_skellam",
        }
    (folder / "config.json").write_text(json.dumps(config))
    return config


def worker_binaries() -> list[int]:
    """Process ids of TFF's C++ worker_binary processes of this user, however they were started."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline", "uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            cmd = proc.info["cmdline"] or []
            if proc.info["name"] == "worker_binary" or (cmd and Path(cmd[0]).name == "worker_binary"):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def run_tff_side(folder: Path, python: Path, timeout: float) -> dict[str, Any]:
    """Run ``tff_side.py`` over ``folder`` in its own process group, kill the group afterwards.

    Returns the side's JSON report with ``leftover_worker_binaries``: the worker_binary processes of
    its group still alive after the group was killed (none expected)."""
    if not python.exists():
        raise TffSideError(f"no TFF virtualenv at {python.parent.parent}: run scripts/install_tff.sh")
    before = set(worker_binaries())
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [str(python), str(TFF_SIDE), str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, which the worker_binary joins
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TffSideError(f"TFF's side took more than {timeout:.0f} s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    left = sorted(set(worker_binaries()) - before)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = sorted(set(worker_binaries()) - before)
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise TffSideError(f"TFF's side exited with {proc.returncode}:\n{tail}")
    report: dict[str, Any] = json.loads((folder / "report.json").read_text())
    report["leftover_worker_binaries"] = left
    return report


def tff_epsilon(dp_params: dict[str, Any], rounds: int, delta: float) -> list[float]:
    """ε at ``delta`` after each of TFF's DP rounds, from the parameters its mechanism reported.

    TFF's distributed Skellam (``tfp.DistributedSkellamSumQuery`` inside
    ``DistributedDpSumFactory``) adds Skellam noise of variance ``scaled_local_stddev²`` per
    client in the scaled integer domain, with the L2 sensitivity ``scaled_inflated_l2`` (the clip,
    inflated for the rounding, times the scale) and the L1 bound its code uses,
    ``ceil(D2 · min(√padded_dim, D2))``. The same bound as aicfl's (Agarwal et al. 2021,
    Theorem 3.5, ``shared.privacy.accounting``), every device every round: no sampling
    amplification. TFF leaves this accounting to its user.
    """
    from shared.privacy.accounting import RoundCost, epsilon_after_each

    l2 = dp_params["scaled_inflated_l2"]
    l1 = math.ceil(l2 * min(math.sqrt(dp_params["padded_dim"]), l2))
    variance = dp_params["actual_num_clients"] * dp_params["scaled_local_stddev"] ** 2
    cost = RoundCost(math.sqrt(variance) / l2, "none", skellam=(l2, l1, variance))
    return epsilon_after_each([cost] * rounds, delta)


def run_tff(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aicfl-tff-peer-") as tmp:
        folder = Path(tmp)
        config = write_inputs(spec, args, folder)
        t0 = time.perf_counter()
        report = run_tff_side(folder, Path(args.tff_python), args.timeout)
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if config["dp"] and report.get("dp_params"):
        eps = tff_epsilon(report["dp_params"], len(report["rounds"]), args.delta)
        report["dp"] = {**config["dp"], "delta": args.delta, "epsilon_after_each": [round(e, 3) for e in eps]}
    return report


def dp_spec(spec: Any, args: argparse.Namespace, epsilon: float) -> Any:
    """The job with aicfl's device-level DP at ``epsilon`` (δ and clip as TFF's): distributed Skellam
    under SecAgg+, the noise multiplier calibrated by the coordinator to spend ``epsilon`` over the rounds,
    every device's share sized for the whole cohort."""
    from shared.jobspec import validate_spec

    data = spec.model_dump(mode="json", exclude_none=True)
    data["secure"] = True
    # Each device's noise share is sized for cohort.minimum contributors: all of them, as TFF's
    # aggregator sizes its shares for the clients of the round (no dropout in either run).
    data["cohort"] = {**data["cohort"], "target": args.devices, "minimum": args.devices}
    data["evaluation"] = {**data.get("evaluation", {}), "federated": False}
    data["privacy"] = {"level": "device", "target_epsilon": epsilon, "delta": args.delta, "clip": args.clip}
    return validate_spec(data)


def run_aicfl(spec: Any, args: argparse.Namespace, epsilon: float | None = None) -> dict[str, Any]:
    from server.simulation.splits import parse_split
    from server.simulation.whole_job import SimulationOptions, simulate_job

    if args.aicfl_dp:
        spec = dp_spec(spec, args, epsilon)
    opts = SimulationOptions(
        devices=args.devices,
        split=parse_split(args.split),
        rounds=args.rounds,
        seed=args.seed,
        data=args.data,
        ceiling=False,
    )
    t0 = time.perf_counter()
    summary = simulate_job(spec, opts, None)
    wall = time.perf_counter() - t0
    curve = [
        {
            "round": r["round"],
            "accuracy": r["central"].get("accuracy"),
            "auc": r["central"].get("auc"),
            "loss": r["central"].get("loss"),
        }
        for r in summary["rounds"]
        if r["status"] == "completed"
    ]
    return {
        "engine": f"aicfl ({summary['simulation']['engine']})",
        "secure": summary["secure"],
        "privacy": summary.get("privacy"),
        "status": summary["status"],
        "rounds": curve,
        "final_auc": summary["final"].get("auc"),
        "wall_seconds": round(wall, 1),
    }


def _fmt(v: float | None) -> str:
    return "    -" if v is None else f"{v:.3f}"


def side_by_side(tff: dict[str, Any] | None, aicfl: dict[str, Any] | None) -> str:
    """The two curves as a table: accuracy and AUC on the held-out rows per round."""
    t_rows = {r["round"]: r for r in (tff or {}).get("rounds", [])}
    a_rows = {r["round"]: r for r in (aicfl or {}).get("rounds", [])}
    lines = ["round   tff acc  tff auc   aicfl acc  aicfl auc"]
    for n in sorted(set(t_rows) | set(a_rows)):
        t, a = t_rows.get(n, {}), a_rows.get(n, {})
        lines.append(
            f"{n:5d}   {_fmt(t.get('accuracy'))}    {_fmt(t.get('auc'))}     "
            f"{_fmt(a.get('accuracy'))}      {_fmt(a.get('auc'))}"
        )
    if tff:
        lines.append(f"tff: {tff['wall_seconds']} s wall, {tff['engine']}")
    if aicfl:
        lines.append(f"aicfl: {aicfl['wall_seconds']} s wall, {aicfl['engine']}, secure={aicfl['secure']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default=str(JOB))
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--split", default="group")
    p.add_argument("--data", default="mlc_churn")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--plain", action="store_true", help="aicfl with secure = false, as TFF's FedAvg")
    p.add_argument("--dp", action="store_true", help="TFF with its distributed DP aggregator (Skellam)")
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=0.5, help="L2 clip of each device's update")
    p.add_argument(
        "--bits", type=int, default=20, help="bits of TFF's secure sum (its ddp_secure_aggregator's default)"
    )
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument(
        "--aicfl-dp",
        action="store_true",
        help="aicfl's own device-level DP run at TFF's ε (with --dp; with --aicfl-only give --epsilon)",
    )
    p.add_argument("--epsilon", type=float, default=None, help="ε for --aicfl-dp without TFF's run")
    p.add_argument("--tff-python", default=str(TFF_PYTHON))
    p.add_argument("--timeout", type=float, default=900, help="seconds TFF's side may take")
    p.add_argument("--json", action="store_true", help="also print both reports as JSON")
    side = p.add_mutually_exclusive_group()
    side.add_argument("--tff-only", action="store_true")
    side.add_argument("--aicfl-only", action="store_true")
    args = p.parse_args()

    from shared.jobspec import load_spec

    spec = load_spec(args.job)
    if args.plain:
        spec = spec.model_copy(update={"secure": False})
    print(
        json.dumps(
            {
                "job": Path(args.job).name,
                "devices": args.devices,
                "rounds": args.rounds,
                "split": args.split,
                "seed": args.seed,
                "dp": args.dp,
                "cpus": os.cpu_count(),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )
    tff = aicfl = None
    if not args.aicfl_only:
        try:
            tff = run_tff(spec, args)
        except TffSideError as err:
            print(f"tff_peer: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        if tff["leftover_worker_binaries"]:
            print(f"tff_peer: worker_binary left running: {tff['leftover_worker_binaries']}", file=sys.stderr)
    epsilon = args.epsilon
    if args.aicfl_dp and epsilon is None:
        if not (tff and tff.get("dp")):
            p.error("--aicfl-dp needs TFF's DP run (--dp) or --epsilon")
        epsilon = float(tff["dp"]["epsilon_after_each"][-1])
    if args.aicfl_dp and not (epsilon is not None and epsilon > 0):
        p.error(f"--epsilon must be positive, got {epsilon}")
    if not args.tff_only:
        aicfl = run_aicfl(spec, args, epsilon)
    if args.json:
        print(json.dumps({"tff": tff, "aicfl": aicfl}))
    print(side_by_side(tff, aicfl))
    if tff and tff.get("dp"):
        eps = tff["dp"]["epsilon_after_each"]
        print(
            f"tff DP: distributed Skellam, noise multiplier {tff['dp']['noise_multiplier']}, "
            f"clip {tff['dp']['clip']}: ε = {eps[-1]} at δ = {args.delta} after {len(eps)} rounds"
        )
    if aicfl and aicfl.get("privacy"):
        priv = aicfl["privacy"]
        print(
            f"aicfl DP: device level (Skellam under SecAgg+), noise multiplier {priv.get('noise_multiplier')}, "
            f"clip {priv.get('clip')}: ε = {priv.get('epsilon')} of {priv.get('target_epsilon')} at δ = {args.delta}"
        )


if __name__ == "__main__":
    main()
