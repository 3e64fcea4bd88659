"""The demo's data on disk: one slice per device, the held-out reference rows and the job spec.

Churn (and the other bundled tabular sets): a natural split by a grouping
column, optionally a pooled central share for the cluster's steps; the job is
an MLP (:func:`demo_spec`) or, with ``--model gbdt``, gradient-boosted trees
(:func:`gbdt_spec`). Digits: the example app's images dealt with Dirichlet
label skew.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.demo_errors import DemoError
from shared.apps import App, AppError, load_app
from shared.datasets import load_dataset, natural_split, test_split
from shared.jobspec import validate_spec

DIGITS = "digits"
DIGITS_APP = "digits_cnn:app"
DIGITS_ALPHA = 0.5
#: The models ``aicfl demo --model`` trains on a tabular set: the zoo's MLP, or XGBoost-style trees.
MLP, GBDT = "mlp", "gbdt"
MODELS = (MLP, GBDT)
#: The demo's trees: those of examples/churn_gbdt.toml (docs/gbdt.md measured them on churn).
GBDT_SETTINGS: dict[str, Any] = {
    "max_depth": 4,
    "eta": 0.3,
    "bins": 64,
    "min_child_weight": 1.0,
    "reg_lambda": 1.0,
    "gamma": 0.0,
}


def check_model(dataset: str, model: str) -> None:
    """``DemoError`` unless ``model`` is one the demo trains on ``dataset``: the trees grow on a
    tabular set's rows (the built-in app's), which the digits app's images are not."""
    if model not in MODELS:
        raise DemoError(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
    if model == GBDT and dataset == DIGITS:
        raise DemoError(
            f"--model {GBDT} grows trees on a tabular set's rows (the built-in app's);"
            f" --dataset {DIGITS} is an app's images: use --dataset mlc_churn"
        )


def _cohort(devices: int) -> dict[str, Any]:
    """Every device in every round; a round goes on with half of them (at least two)."""
    return {
        "target": devices,
        "minimum": max(2, (devices + 1) // 2),
        "stage_timeout": 120,
        "selection_timeout": 5,
    }


def _training(*, learning_rate: float) -> dict[str, Any]:
    """Two local epochs of Adam per round, a fifth of each device's rows held out."""
    return {
        "epochs": 2,
        "batch_size": 32,
        "learning_rate": learning_rate,
        "optimizer": "adam",
        "holdout": 0.2,
    }


def demo_spec(
    schema: dict[str, Any], *, rounds: int, devices: int, seed: int, reference: str
) -> dict[str, Any]:
    """The job the demo runs: an MLP, FedAvg, every device in every round."""
    return {
        "name": "demo",
        "rounds": rounds,
        "seed": seed,
        "data": schema,
        "model": {"zoo": "mlp", "hidden": [64, 32]},
        "cohort": _cohort(devices),
        "training": _training(learning_rate=0.005),
        "strategy": {"name": "fedavg"},
        "evaluation": {"reference": reference},
    }


def gbdt_spec(
    schema: dict[str, Any], *, rounds: int, devices: int, seed: int, reference: str
) -> dict[str, Any]:
    """The demo's trees: ``rounds`` boosting rounds of :data:`GBDT_SETTINGS`, every device in every
    round, each level's histograms summed under SecAgg+ (docs/gbdt.md); a fifth of each device's
    rows held out for the federated evaluation, as in :func:`demo_spec`."""
    return {
        "name": "demo-gbdt",
        "rounds": rounds,
        "seed": seed,
        "data": schema,
        "model": {"zoo": GBDT},
        "gbdt": dict(GBDT_SETTINGS),
        "cohort": _cohort(devices),
        "training": {"holdout": 0.2},
        "evaluation": {"reference": reference},
    }


def digits_spec(*, rounds: int, devices: int, seed: int, app_version: str, reference: str) -> dict[str, Any]:
    """The digits job: the example app's CNN, 2 local epochs of Adam at 0.002 per round, FedAvg with
    server momentum, every device in every round.

    Server momentum 0.5 (FedAvgM; Hsu, Qi and Brown 2019, who also propose the Dirichlet split)
    carries the mean update across rounds, which the label-skewed devices pull apart.
    """
    return {
        "name": "digits",
        "rounds": rounds,
        "seed": seed,
        "model": {"app": DIGITS_APP, "app_version": app_version},
        "cohort": _cohort(devices),
        "training": _training(learning_rate=0.002),
        "strategy": {"name": "fedavgm", "server_learning_rate": 1.0, "server_momentum": 0.5},
        "evaluation": {"reference": reference},
    }


def digits_app() -> App:
    """The installed example app, or ``DemoError`` saying how to install it."""
    try:
        return load_app(DIGITS_APP)
    except AppError as err:
        raise DemoError(
            f"the digits demo needs the example app: pip install -e examples/digits_cnn ({err})"
        ) from None


def prepare_digits(devices: int, seed: int, out: Path, rounds: int, audit: bool = True) -> dict[str, Any]:
    """The digits on disk: ``devices/device-NN/data.npz`` (Dirichlet label skew, ``seed``),
    ``reference.npz`` (the stratified test images) and ``job.toml``."""
    import tomli_w

    app = digits_app()
    from digits_cnn.data import split, write_split

    try:
        data = split(devices, alpha=DIGITS_ALPHA, seed=seed)
    except ValueError as err:
        raise DemoError(f"--devices {devices}: {err}") from None
    except ImportError as err:
        raise DemoError(f"the digits split needs scikit-learn's bundled data: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    files, reference = write_split(data, out)
    spec_dict = digits_spec(
        rounds=rounds, devices=devices, seed=seed, app_version=app.version, reference=reference.name
    )
    spec_dict["audit"] = {"enabled": audit}
    validate_spec(spec_dict)
    (out / "job.toml").write_text(tomli_w.dumps(spec_dict))
    return {
        "rows": sum(len(labels) for _, labels in data.devices) + len(data.test[1]),
        "split": data,
        "parts": [labels for _, labels in data.devices],
        "test": data.test[1],
        "group": f"label skew, Dirichlet alpha={DIGITS_ALPHA}",
        "files": files,
        "reference": reference,
        "central": None,
        "spec": spec_dict,
    }


def prepare_data(
    dataset: str,
    devices: int,
    seed: int,
    out: Path,
    rounds: int = 10,
    central_share: float = 0.0,
    pretrained: bool = False,
    audit: bool = True,
    model: str = MLP,
) -> dict[str, Any]:
    """Split a bundled dataset into held-out test rows and one slice per device, on disk.

    Tabular sets: writes ``devices/device-NN/data.csv`` (one natural slice each),
    ``reference.csv`` (the test rows) and ``job.toml``; with ``central_share``,
    that share of the training rows is pooled in ``central.csv`` (the public or
    proxy data the central cluster pre-trains and runs AutoML on) and never
    reaches a device. ``model``: :data:`MLP` (:func:`demo_spec`) or :data:`GBDT`
    (:func:`gbdt_spec`). ``digits``: see :func:`prepare_digits`. Returns what the
    caller needs: ``files``, ``parts`` and ``test`` (sized by ``len``),
    ``reference``, ``central``, ``spec``.
    """
    import tomli_w

    check_model(dataset, model)
    if dataset == DIGITS:
        return prepare_digits(devices, seed, out, rounds, audit=audit)
    try:
        df, schema, group = load_dataset(dataset)
    except ValueError as err:
        raise DemoError(str(err)) from None
    stratify = schema["target"] if schema["task"] != "regression" else None
    train_df, test_df = test_split(df, 0.2, seed, stratify_column=stratify)
    device_df, central_df = train_df, None
    if central_share > 0:
        device_df, central_df = test_split(train_df, central_share, seed + 1, stratify_column=stratify)
    try:
        parts = natural_split(device_df, group, devices, seed)
    except ValueError as err:
        raise DemoError(f"--devices {devices}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, part in enumerate(parts):
        d = out / "devices" / f"device-{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        part.to_csv(d / "data.csv", index=False)
        files.append(d / "data.csv")
    reference = out / "reference.csv"
    test_df.to_csv(reference, index=False)
    central = None
    if central_df is not None:
        central = out / "central.csv"
        central_df.to_csv(central, index=False)
    make_spec = gbdt_spec if model == GBDT else demo_spec
    spec_dict = make_spec(schema, rounds=rounds, devices=devices, seed=seed, reference="reference.csv")
    if pretrained:
        spec_dict["model"]["initial"] = "pretrained"
    if not audit:
        spec_dict["audit"] = {"enabled": False}
    validate_spec(spec_dict)
    (out / "job.toml").write_text(tomli_w.dumps(spec_dict))
    return {
        "rows": len(df),
        "df": df,
        "train": train_df,
        "test": test_df,
        "parts": parts,
        "group": group,
        "files": files,
        "reference": reference,
        "central": central,
        "spec": spec_dict,
        "schema": schema,
    }
