"""``aicfl simulate``: one SecAgg+ round in one process, without HTTP."""

from __future__ import annotations

import json

import typer

from server.console import console, fmt
from shared.api_client import CliError


def simulate_cmd(
    devices: int = typer.Option(10, "--devices", min=2, max=10_000),
    params: int = typer.Option(100_000, "--params", min=10, max=50_000_000),
    dropout: float = typer.Option(0.0, "--dropout", min=0.0, max=0.9, help="Share of devices that drop out."),
    drop_after: str = typer.Option(
        "masked_input", "--drop-after", help="configure, advertise_keys, share_keys or masked_input"
    ),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """One SecAgg+ round of the real coordinator and device code in one process, without HTTP."""
    from server.simulate import SimulationError, simulate

    try:
        out = simulate(devices=devices, params=params, dropout=dropout, drop_after=drop_after, seed=seed)
    except SimulationError as err:
        raise CliError(str(err)) from None
    if as_json:
        print(json.dumps(out))
        return
    for key, value in out.items():
        console.print(f"{key:26} {fmt(value, 5)}")
