"""``aicfl simulate``: one SecAgg+ round, or with a JOB.toml a whole job, in one process, without HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from server.console import console, fmt
from shared.api_client import CliError

#: Flags that only a whole-job simulation (with a JOB.toml) reads, and only the protocol one reads.
JOB_FLAGS = (
    "--split",
    "--rounds",
    "--cohort",
    "--data",
    "--out",
    "--ray-address",
    "--ray-actors",
    "--processes",
)
PROTOCOL_FLAGS = ("--params", "--drop-after")


def simulate_cmd(
    job: Path | None = typer.Argument(
        None,
        metavar="[JOB.toml]",
        help="A job spec to run whole (statistics, training rounds, evaluation); without it, one SecAgg+ round.",
    ),
    devices: int = typer.Option(10, "--devices", min=2, max=100_000),
    params: int | None = typer.Option(
        None, "--params", min=10, max=50_000_000, help="Without JOB.toml: parameters of the synthetic update."
    ),
    dropout: float = typer.Option(
        0.0,
        "--dropout",
        min=0.0,
        max=0.9,
        help="Share of devices that drop out (of each round, with JOB.toml).",
    ),
    drop_after: str | None = typer.Option(
        None, "--drop-after", help="Without JOB.toml: configure, advertise_keys, share_keys or masked_input."
    ),
    split: str | None = typer.Option(
        None, "--split", help="group[:COLUMN] (default), dirichlet:ALPHA or rows: how rows are dealt."
    ),
    rounds: int | None = typer.Option(None, "--rounds", help="Training rounds (default: the spec's)."),
    cohort: int | None = typer.Option(None, "--cohort", help="Devices per round (default: all of them)."),
    data: str | None = typer.Option(
        None,
        "--data",
        help="A bundled data set (mlc_churn, ames) or a CSV/Parquet file (default: mlc_churn).",
    ),
    out: Path | None = typer.Option(None, "--out", help="Folder for summary.json."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Run the devices on Ray: local (a new cluster here), auto, or an address."
    ),
    ray_actors: int | None = typer.Option(
        None, "--ray-actors", help="Ray actors (default: the cluster's CPUs)."
    ),
    processes: int | None = typer.Option(
        None,
        "--processes",
        min=1,
        max=1024,
        help="Run the devices in N worker processes of this machine (no Ray; default: in this process).",
    ),
    ceiling: bool = typer.Option(True, "--ceiling/--no-ceiling", help="Train the central ceiling too."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """One SecAgg+ round of the real coordinator and device code in one process, without HTTP; with
    a JOB.toml, the whole job with --devices virtual devices (docs/simulation.md)."""
    from server.simulate import SimulationError

    given = {
        "--split": split,
        "--rounds": rounds,
        "--cohort": cohort,
        "--data": data,
        "--out": out,
        "--ray-address": ray_address,
        "--ray-actors": ray_actors,
        "--processes": processes,
        "--params": params,
        "--drop-after": drop_after,
    }
    wrong = PROTOCOL_FLAGS if job is not None else JOB_FLAGS
    for flag in wrong:
        if given[flag] is not None:
            need = "takes no JOB.toml" if job is not None else "needs a JOB.toml"
            raise CliError(
                f"{flag} is for the {'protocol' if job is not None else 'whole-job'} simulation, which {need}"
            )
    try:
        if job is None:
            from server.simulate import simulate

            result = simulate(
                devices=devices,
                params=params or 100_000,
                dropout=dropout,
                drop_after=drop_after or "masked_input",
                seed=seed,
            )
            if as_json:
                print(json.dumps(result))
                return
            for key, value in result.items():
                console.print(f"{key:26} {fmt(value, 5)}")
            return
        summary = _whole_job(
            job,
            devices,
            dropout,
            split,
            rounds,
            cohort,
            data,
            out,
            ray_address,
            ray_actors,
            processes,
            ceiling,
            seed,
        )
    except SimulationError as err:
        raise CliError(str(err)) from None
    if as_json:
        print(json.dumps(summary, default=str))
        return
    _print_summary(summary, out)


def _whole_job(
    job: Path,
    devices: int,
    dropout: float,
    split: str | None,
    rounds: int | None,
    cohort: int | None,
    data: str | None,
    out: Path | None,
    ray_address: str | None,
    ray_actors: int | None,
    processes: int | None,
    ceiling: bool,
    seed: int,
) -> dict[str, Any]:
    from server.simulate import SimulationError
    from server.simulation.splits import parse_split
    from server.simulation.whole_job import SimulationOptions, simulate_job
    from shared.jobspec import JobSpecError, load_spec

    try:
        spec = load_spec(job)
    except JobSpecError as err:
        raise SimulationError(str(err)) from None
    except OSError as err:
        raise SimulationError(f"{job}: {err.strerror or err}") from None
    try:
        parsed = parse_split(split or "group")
    except ValueError as err:
        raise SimulationError(str(err)) from None
    opts = SimulationOptions(
        devices=devices,
        split=parsed,
        dropout=dropout,
        rounds=rounds,
        cohort=cohort,
        seed=seed,
        data=data or "mlc_churn",
        ray_address=ray_address,
        ray_actors=ray_actors,
        processes=processes,
        ceiling=ceiling,
    )
    try:
        return simulate_job(spec, opts, out)
    except OSError as err:
        raise SimulationError(f"--out {out}: {err.strerror or err}") from None


def _print_summary(summary: dict[str, Any], out: Path | None) -> None:
    sim = summary["simulation"]
    head = summary["headline"]
    done = [r for r in summary["rounds"] if r["status"] == "completed"]
    lines: dict[str, Any] = {
        "status": summary["status"],
        "reason": summary["reason"],
        "devices": summary["devices"],
        "engine": sim["engine"],
        "split": sim["split"],
        "rounds completed": f"{len(done)} of {len(summary['rounds'])}",
        f"final {head}": summary["final"].get(head),
        f"ceiling {head}": (summary["ceiling"] or {}).get(head),
        "secagg exact": sim["secagg_exact"],
        "seconds": summary["seconds"],
    }
    for key, value in lines.items():
        console.print(f"{key:26} {fmt(value, 5)}")
    if out is not None:
        console.print(f"summary written to {out / 'summary.json'}", soft_wrap=True)
