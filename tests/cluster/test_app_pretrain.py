"""Horovod pre-training of an app's model (tests/cluster/image_app.py: a CNN on 8x8 digits).

The app owns its training loop, so the ranks average their models after every epoch; version 0
must be the app's model as the coordinator describes it, better than its random start, and
auditable by the audit worker through the coordinator.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coordinator import apps as coordinator_apps
from shared.api_client import CliError
from shared.apps import JobContext, LocalData, TrainConfig
from shared.jobspec import JobSpec, validate_spec
from training_cluster.api import ClusterApi
from training_cluster.audit_worker import run_worker
from training_cluster.hvd_worker import CONFIG_FORMAT, parameter_sha256, rank_train_seed, weighted_average
from training_cluster.pretrain import _import_root, pretrain

from ..integration.harness import Coordinator
from .image_app import app, digits_csv, model_table
from .test_pretrain import _horovod_problem
from .test_pretrain_refusals import JobApi, fake_horovodrun

REPO = Path(__file__).resolve().parents[2]


def app_spec(**extra: Any) -> dict[str, Any]:
    return {
        "name": "digits",
        "rounds": 1,
        "model": {**model_table(), "initial": "pretrained"},
        "training": {"batch_size": 32, "learning_rate": 0.05, "optimizer": "sgd"},
        "audit": {"rows": 60, "background": 20, "validate_rows": 0},
        **extra,
    }


# --------------------------------------------------------------------------- pure helpers


def test_ranks_average_their_models_weighted_by_their_examples() -> None:
    models = np.array([[1.0, 2.0], [3.0, 6.0], [0.5, -1.0]], dtype=np.float32)
    counts = np.array([10, 30, 0])
    averaged = weighted_average((models.astype(np.float64) * counts[:, None]).sum(axis=0), counts.sum())
    assert averaged.dtype == np.float32
    np.testing.assert_allclose(averaged, [2.5, 5.0])
    with pytest.raises(ValueError, match="no rank trained on any example"):
        weighted_average(np.zeros(2), 0)


def test_each_rank_shuffles_each_epoch_with_its_own_reproducible_seed() -> None:
    seeds = {(e, r): rank_train_seed(7, e, r) for e in range(3) for r in range(4)}
    assert len(set(seeds.values())) == 12
    assert rank_train_seed(7, 2, 3) == seeds[(2, 3)] and rank_train_seed(8, 2, 3) != seeds[(2, 3)]


def test_ranks_are_told_where_this_process_imported_the_app_from() -> None:
    assert _import_root("tests.cluster.image_app:app") == str(REPO)
    assert _import_root("numpy:ndarray") is None  # installed: every rank's Python has it
    assert _import_root("not_imported_here:app") is None


# --------------------------------------------------------------------------- one rank on its own


def test_a_single_app_rank_trains_epoch_by_epoch_exactly_as_the_app_would(tmp_path: Path) -> None:
    data = digits_csv(tmp_path / "central.csv", np.arange(300))
    spec = validate_spec(app_spec())
    config = {
        "format": CONFIG_FORMAT,
        "app": {
            "ref": spec.app_ref,
            "version": "1",
            "spec": spec.model_dump(mode="json"),
            "setup": {},
            "data_path": str(data),
        },
        "seed": 3,
        "epochs": 2,
        "batch_size": 32,
        "learning_rate": 0.05,
        "optimizer": "sgd",
        "threads": 1,
        "workdir": str(tmp_path),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "training_cluster.hvd_worker", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["scheme"] == "model averaging after each epoch"
    assert (result["world_size"], result["epochs"], result["examples_per_rank"]) == (1, 2, [300])
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert [h["samples"] for h in result["history"]] == [300, 300]

    # The rank started from the coordinator's own version 0 of a job with this seed...
    job = JobContext(spec.model_copy(update={"seed": 3}), {})
    initial = coordinator_apps.initial_vector(app, job)
    assert (tmp_path / "initial.sha256").read_text() == result["initial_sha256"] == parameter_sha256(initial)
    # ... and trained one epoch at a time with the app's own loop on every central example.
    model = app.build_model(job)
    app.set_parameters(model, initial)
    rows = app.load_reference(data.read_bytes(), job)
    everything = LocalData(rows, rows, len(rows), len(rows))
    for epoch in range(2):
        train = TrainConfig(
            round=epoch + 1,
            epochs=1,
            batch_size=32,
            learning_rate=0.05,
            optimizer="sgd",
            seed=rank_train_seed(3, epoch, 0),
            threads=1,
            options=spec.model.options,
        )
        app.train(model, everything, train)
    final = np.load(tmp_path / "final.npy")
    np.testing.assert_allclose(final, app.get_parameters(model), rtol=1e-5, atol=1e-6)
    assert parameter_sha256(final) == result["final_sha256"] == (tmp_path / "rank-0.sha256").read_text()
    assert not np.allclose(final, initial)

    # Metrics of the final model on the examples it trained on, through the app's evaluate.
    app.set_parameters(model, final)
    measured = app.evaluate(model, everything)
    assert result["metrics"]["train_examples"] == 300
    assert result["metrics"]["train_loss"] == pytest.approx(measured["loss"], rel=1e-5)
    assert result["metrics"]["train_accuracy"] == pytest.approx(measured["accuracy"])

    checkpoints = sorted((tmp_path / "checkpoints").glob("epoch-*.pt"))
    assert [p.name for p in checkpoints] == ["epoch-001.pt", "epoch-002.pt"]
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["epoch"] == 2 and state["app"] == spec.app_ref
    assert np.array_equal(state["vector"].numpy(), final)


# --------------------------------------------------------------------------- refusals, before any rank


def app_job_api(tmp_path: Path, **spec: Any) -> JobApi:
    return JobApi({"id": 1, "spec": app_spec(**spec), "current_version": None}, preprocess={})


@pytest.mark.parametrize("option", ["gpus", "fp16"])
def test_gpus_and_fp16_are_refused_for_an_app_job(option: str, tmp_path: Path) -> None:
    data = digits_csv(tmp_path / "central.csv", np.arange(10))
    with pytest.raises(CliError) as err:
        pretrain(app_job_api(tmp_path), 1, data, **{option: True})  # type: ignore[arg-type]
    assert str(err.value) == (
        f"--{option} applies to the built-in tabular app's gradient allreduce; job 1's app"
        " (tests.cluster.image_app:app) trains in its own loop on CPU ranks"
    )


def test_an_app_that_does_not_import_or_is_another_version_is_one_line(tmp_path: Path) -> None:
    data = digits_csv(tmp_path / "central.csv", np.arange(10))
    api = app_job_api(tmp_path, model={**model_table(), "app_version": "2", "initial": "pretrained"})
    with pytest.raises(
        CliError, match="^app 'tests.cluster.image_app:app' is version 1 here; the job needs 2$"
    ):
        pretrain(api, 1, data)  # type: ignore[arg-type]
    api = app_job_api(tmp_path, model={**model_table(), "app": "tests.nowhere:app", "initial": "pretrained"})
    with pytest.raises(CliError, match="^app 'tests.nowhere:app' does not import here: ModuleNotFoundError"):
        pretrain(api, 1, data)  # type: ignore[arg-type]


def test_central_data_the_app_cannot_use_is_one_line_before_any_rank_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICFL_HOROVODRUN", str(fake_horovodrun(tmp_path, "exit 99\n")))
    api = app_job_api(tmp_path)
    with pytest.raises(CliError, match=f"^central data {tmp_path / 'none.csv'} does not exist$"):
        pretrain(api, 1, tmp_path / "none.csv")  # type: ignore[arg-type]

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(CliError) as err:
        pretrain(api, 1, bad, workdir=tmp_path / "work")  # type: ignore[arg-type]
    assert str(err.value) == f"central data {bad}: missing columns: px_0_0, px_0_1, px_0_2..."

    few = digits_csv(tmp_path / "few.csv", np.arange(3))
    with pytest.raises(CliError, match=f"^central data {few} has 3 examples, fewer than the 4 ranks$"):
        pretrain(api, 1, few, np=4, workdir=tmp_path / "work")  # type: ignore[arg-type]
    assert not (tmp_path / "work").exists()  # nothing was launched


# --------------------------------------------------------------------------- two ranks, a real coordinator


@dataclass
class PretrainedJob:
    coord: Coordinator
    job_id: int
    summary: dict[str, Any]
    spec: JobSpec
    work: Path
    reference: Path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PretrainedJob]:
    """An app job pre-trained by two Horovod ranks on 1,000 digits, against a real coordinator."""
    problem = _horovod_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("app-pretrain")
    order = np.random.default_rng(0).permutation(1797)
    central = digits_csv(root / "central.csv", order[:1000])
    reference = digits_csv(root / "reference.csv", order[1500:])
    coord = Coordinator(root)
    coord.bootstrap()
    coord.start()
    try:
        api = coord.api()
        job = api.json("POST", "/v1/jobs", json=app_spec())
        api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference.read_bytes())
        summary = pretrain(
            ClusterApi(api),
            int(job["id"]),
            central,
            np=2,
            epochs=3,
            workdir=root / "work",
            log=lambda _: None,
        )
        yield PretrainedJob(
            coord, int(job["id"]), summary, JobSpec.model_validate(job["spec"]), root / "work", reference
        )
    finally:
        coord.stop()


@pytest.mark.slow
def test_two_ranks_pretrain_an_app_model_into_a_version0_the_coordinator_accepts(
    pretrained: PretrainedJob,
) -> None:
    api = ClusterApi(pretrained.coord.api())
    summary = pretrained.summary
    assert summary["version"] == 0 and summary["world_size"] == 2 and summary["rows"] == 1000
    assert summary["app"] == "tests.cluster.image_app:app" and summary["metrics"]["train_examples"] == 1000

    (v0,) = api.models(pretrained.job_id)
    prov = v0["provenance"]
    assert prov["source"] == "pretrain" and prov["scheme"] == "model averaging after each epoch"
    assert prov["examples_per_rank"] == [500, 500]  # each rank loaded its partition through the app
    assert (prov["app"], prov["app_version"], prov["epochs"]) == ("tests.cluster.image_app:app", "1", 3)
    assert prov["learning_rate"] == {"base": 0.05, "scaled": 0.05}

    # The version is the app's model as the coordinator describes it, from its own initial weights.
    header, vector = api.model(pretrained.job_id, 0)
    job = JobContext(pretrained.spec, {})
    assert header["arch"] == app.describe(job)
    initial = coordinator_apps.initial_vector(app, job)
    assert vector.size == initial.size
    assert (pretrained.work / "initial.sha256").read_text() == parameter_sha256(initial)
    ranks = [(pretrained.work / f"rank-{r}.sha256").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1] == parameter_sha256(vector) == summary["parameters_sha256"]
    assert api.job(pretrained.job_id)["current_version"] == 0


@pytest.mark.slow
def test_pretrained_app_model_beats_its_random_initialisation_on_the_reference_data(
    pretrained: PretrainedJob,
) -> None:
    (v0,) = ClusterApi(pretrained.coord.api()).models(pretrained.job_id)
    central = v0["metrics"]["central"]  # measured by the coordinator itself, through the app
    assert central["examples"] == 297
    assert pretrained.summary["metrics"]["central"] == pytest.approx(central)

    job = JobContext(pretrained.spec, {})
    reference = app.load_reference(pretrained.reference.read_bytes(), job)
    untrained = coordinator_apps.evaluate_central(
        app, job, reference, coordinator_apps.initial_vector(app, job)
    )
    assert untrained is not None
    assert central["accuracy"] > 0.7 and central["accuracy"] > untrained["accuracy"] + 0.3
    assert central["loss"] < untrained["loss"]


@pytest.mark.slow
def test_audit_worker_audits_the_pretrained_app_version_through_the_coordinator(
    pretrained: PretrainedJob,
) -> None:
    api = ClusterApi(pretrained.coord.api())
    assert run_worker(api, "w", once=True, poll=0.1, log=lambda _: None) == 1
    audit = api.audit(pretrained.job_id, 0)
    assert audit is not None and audit["status"] == "done" and audit["verdict"] == "ok"
    report = audit["report"]
    assert len(report["importance"]) == 64 and all(f.startswith("px_") for f in report["top_features"])
    assert report["input_shape"] == [1, 8, 8] and report["rows"] == 60
    assert audit["plots"] == ["beeswarm.png", "class_maps.png", "importance.png"]
    png = api.client.request("GET", f"/v1/jobs/{pretrained.job_id}/audits/0/plots/class_maps.png").content
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (880, 400)
