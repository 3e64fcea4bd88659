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
    from shared.jobspec import JobSpecError

    if devices < 2:  # the job spec it writes needs a cohort of two at least
        raise CliError(f"--devices {devices}: a federation needs 2 devices at least")
    try:
        data = prepare_data(dataset, devices, seed, out, rounds)
    except (DemoError, JobSpecError) as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"--out {out}: {err.strerror}: {err.filename}") from None
    for f, part in zip(data["files"], data["parts"], strict=True):
        print(f"{f}  {len(part)} rows")
    print(f"{data['reference']}  {len(data['test'])} test rows")
    print(f"{out / 'job.toml'}")
