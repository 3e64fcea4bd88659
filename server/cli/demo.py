"""``aicfl demo``: a whole federation on this machine (the work is done by server.demo)."""

from __future__ import annotations

from pathlib import Path

import click
import typer

from server.console import console, fmt, metrics_text
from shared.api_client import CliError


def demo_cmd(
    devices: int = typer.Option(6, "--devices", min=2, max=64),
    rounds: int | None = typer.Option(
        None, "--rounds", min=1, max=1000, help="Training rounds (default: 10; 30 for digits)."
    ),
    dataset: str = typer.Option(
        "mlc_churn",
        "--dataset",
        help="mlc_churn (tabular, split by state) or digits (the examples/digits_cnn app, label skew).",
    ),
    model: str = typer.Option(
        "mlp",
        "--model",
        click_type=click.Choice(["mlp", "gbdt"]),
        help="mlp (the zoo network, FedAvg) or gbdt (gradient-boosted trees from SecAgg+ histograms, docs/gbdt.md);"
        " tabular sets only.",
    ),
    out: Path = typer.Option(Path("demo-out"), "--out"),
    seed: int = typer.Option(7, "--seed"),
    pretrain: bool | None = typer.Option(
        None,
        "--pretrain/--no-pretrain",
        help="Horovod pre-training of version 0 on pooled central rows (default: on; tabular sets only).",
        show_default=False,
    ),
    automl: bool | None = typer.Option(
        None,
        "--automl/--no-automl",
        help="An H2O AutoML baseline on the central rows (default: on; tabular sets only).",
        show_default=False,
    ),
    audit: bool | None = typer.Option(
        None,
        "--audit/--no-audit",
        help="A SHAP audit worker beside the rounds (default: on; off for digits).",
        show_default=False,
    ),
    automl_secs: int = typer.Option(30, "--automl-secs", min=5, max=3600, help="AutoML's time budget."),
    pretrain_np: int = typer.Option(2, "--pretrain-np", min=1, max=64),
    pretrain_epochs: int = typer.Option(10, "--pretrain-epochs", min=1, max=1000),
    central_share: float = typer.Option(
        0.1,
        "--central-share",
        min=0.01,
        max=0.9,
        help="Share of the training rows pooled as central (public/proxy) data; no device holds them.",
    ),
) -> None:
    """Run a whole federation on this machine: server, real agent processes, a real dataset."""
    from server.demo import DemoError, run_demo

    try:
        summary = run_demo(
            devices=devices,
            rounds=rounds,
            dataset=dataset,
            out=out,
            seed=seed,
            pretrain=pretrain,
            automl=automl,
            audit=audit,
            automl_seconds=automl_secs,
            pretrain_np=pretrain_np,
            pretrain_epochs=pretrain_epochs,
            central_share=central_share,
            model=model,
            console=console,
        )
    except DemoError as err:
        raise CliError(str(err)) from None
    console.print(f"summary written to {out / 'summary.json'}")
    final, ceiling = summary["final"], summary["ceiling"]
    console.print(f"final:   {metrics_text(final)}")
    console.print(f"ceiling: {metrics_text(ceiling)}")
    name = summary["headline"]
    if name in final and name in ceiling:
        console.print(
            f"{name}: final {fmt(final[name])} against the ceiling's {fmt(ceiling[name])}"
            f" (gap {final[name] - ceiling[name]:+.4f})"
        )
    if summary.get("gbdt"):
        g = summary["gbdt"]
        console.print(
            f"trees:   {g['trees']} ({g['boosting_rounds']} boosting rounds, depth {g['max_depth']},"
            f" {g['leaves']} leaves)"
        )
    if summary.get("baseline"):
        b = summary["baseline"]
        console.print(f"AutoML:  {b['leader']}  {metrics_text(b['metrics'])}")
        if b.get("federated_beats_leader") is not None:
            verdict = "beats" if b["federated_beats_leader"] else "does not beat"
            console.print(
                f"the federated {summary.get('model', 'model')} {verdict} the AutoML leader on {name}"
                f" (gap {b['gap_to_leader']:+.4f})"
            )
    if summary.get("pretrain"):
        console.print(f"version 0 pre-trained: {metrics_text(summary['pretrain']['metrics'].get('central'))}")
    verdicts = [a["verdict"] for a in summary.get("audits", [])]
    if verdicts:
        console.print(
            f"audits:  {len(verdicts)} versions, {verdicts.count('ok')} ok, {verdicts.count('drift')} drift"
            + (f", {verdicts.count('failed')} failed" if "failed" in verdicts else "")
        )
    for step, why in summary.get("skipped", {}).items():
        console.print(f"skipped {step}: {why}")
