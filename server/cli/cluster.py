"""``aicfl cluster``: the central cluster's Horovod pre-training and H2O AutoML baseline of a job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from server.console import JSON_OPT, cluster_api, console, emit_json, metrics_text

if TYPE_CHECKING:
    from training_cluster.api import ClusterApi

app = typer.Typer(
    help="The central cluster: Horovod pre-training and H2O AutoML baselines.", no_args_is_help=True
)


def _with_cluster_api(run: Callable[[ClusterApi, Callable[[str], None]], Any], quiet: bool) -> Any:
    """Run a cluster command against the coordinator API; its progress lines go to the console unless quiet."""
    api = cluster_api()
    try:
        return run(api, lambda line: None if quiet else console.print(line))
    finally:
        api.close()


@app.command("pretrain")
def cluster_pretrain(
    job: int = typer.Option(..., "--job", help="The job whose version 0 to pre-train."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Central (public or proxy) data: a CSV or Parquet table, or for an app's job what its load_data reads.",
    ),
    np_: int = typer.Option(2, "--np", min=1, max=1024, help="Horovod processes (horovodrun -np)."),
    epochs: int = typer.Option(5, "--epochs", min=1, max=10_000),
    gpus: bool = typer.Option(
        False, "--gpus", help="One GPU per rank, NCCL (default: CPU, Gloo); built-in tabular app only."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Per rank; default: the job's."),
    learning_rate: float | None = typer.Option(
        None, "--learning-rate", min=0.0, help="Base rate before scaling by the world size."
    ),
    fp16: bool = typer.Option(
        False, "--fp16", help="fp16 compression of the allreduced gradients; built-in tabular app only."
    ),
    wait: float = typer.Option(
        600.0, "--wait", min=0.0, help="Seconds to wait for the job's statistics round (its preprocessing)."
    ),
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        help="Shards and checkpoints here (shared by the ranks' hosts); default: a temporary folder.",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Horovod data-parallel pre-training of the job's model (the zoo network, or its app's); uploaded as
    its version 0."""
    from training_cluster.pretrain import pretrain

    out = _with_cluster_api(
        lambda api, log: pretrain(
            api,
            job,
            data,
            np=np_,
            epochs=epochs,
            gpus=gpus,
            batch_size=batch_size,
            learning_rate=learning_rate,
            fp16=fp16,
            wait=wait,
            workdir=workdir,
            log=log,
        ),
        as_json,
    )
    if as_json:
        return emit_json(out)
    console.print(
        f"version 0 of job {job}: world size {out['world_size']}, {out['epochs']} epochs, "
        f"{out['samples_per_second']:.0f} samples/s  {metrics_text(out['metrics'].get('central') or out['metrics'])}"
    )


@app.command("automl")
def cluster_automl(
    job: int = typer.Option(..., "--job", help="The job to measure a baseline for."),
    data: Path = typer.Option(..., "--data", help="Central (public or proxy) data, CSV or Parquet."),
    max_runtime_secs: int = typer.Option(60, "--max-runtime-secs", min=5, max=86_400),
    h2o_url: str | None = typer.Option(
        None,
        "--h2o-url",
        envvar="AICFL_H2O_URL",
        help="An existing H2O cluster (default: start a local JVM).",
    ),
    seed: int = typer.Option(1, "--seed"),
    max_models: int | None = typer.Option(None, "--max-models", min=1),
    as_json: bool = JSON_OPT,
) -> None:
    """H2O AutoML on the central data; the leader, measured on the job's reference rows, is its baseline."""
    from training_cluster.automl import automl

    out = _with_cluster_api(
        lambda api, log: automl(
            api,
            job,
            data,
            max_runtime_secs=max_runtime_secs,
            h2o_url=h2o_url,
            seed=seed,
            max_models=max_models,
            log=log,
        ),
        as_json,
    )
    if as_json:
        return emit_json(out)
    console.print(
        f"baseline of job {job}: {out['leader']} ({out.get('algorithm', '')})  {metrics_text(out['metrics'])}"
    )
