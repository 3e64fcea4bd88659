"""``aicfl data``: example data for trying a federation by hand."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.api_client import CliError

app = typer.Typer(help="Example data for trying a federation by hand.", no_args_is_help=True)


@app.command("split")
def data_split(
    out: Path = typer.Option(..., "--out", help="Folder for the device files, reference.csv and job.toml."),
    dataset: str = typer.Option("mlc_churn", "--dataset"),
    devices: int = typer.Option(4, "--devices", min=1, max=1000),
    rounds: int = typer.Option(10, "--rounds", min=1),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """Split a bundled dataset naturally across devices, with test rows and a job spec to submit."""
    from server.demo import DemoError, prepare_data

    try:
        data = prepare_data(dataset, devices, seed, out, rounds)
    except DemoError as err:
        raise CliError(str(err)) from None
    for f, part in zip(data["files"], data["parts"], strict=True):
        print(f"{f}  {len(part)} rows")
    print(f"{data['reference']}  {len(data['test'])} test rows")
    print(f"{out / 'job.toml'}")
