"""Horovod pre-training: ranks agree, version 0 carries its provenance and starts the federation,
and every expected failure is one clear error line."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from shared.api_client import CliError
from shared.datasets import load_dataset
from shared.jobspec import DataSchema, ModelSpec
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from shared.training import evaluate
from shared.zoo import architecture, build_model, flatten_parameters, load_flat_parameters
from training_cluster.api import ClusterApi
from training_cluster.hvd_worker import parameter_sha256, scaled_learning_rate, shard_indices
from training_cluster.pretrain import pretrain, train_ranks

from ..integration.harness import ENV, Coordinator, churn_slices, py, small_spec


@functools.cache
def _horovod_problem() -> str | None:
    try:
        import horovod.torch  # noqa: F401
    except ImportError as err:
        return f"horovod.torch is not importable ({err}); install it with scripts/install_horovod.sh"
    return None


@pytest.fixture
def horovod() -> None:
    """Skip (only) where Horovod is not installed; `make setup` installs it."""
    problem = _horovod_problem()
    if problem:
        pytest.skip(problem)


def churn_arrays(rows: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray, Preprocessor]:
    df, schema, _ = load_dataset("mlc_churn")
    df = df.sample(n=rows, random_state=seed)
    data_schema = DataSchema.model_validate(schema)
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(df, data_schema)]), data_schema)
    x, y = pre.transform(df)
    return x, y, pre


def central_churn(path: Path, rows: int = 800) -> Path:
    """Central (proxy) data: mlc_churn rows that the devices of churn_slices() do not hold."""
    df, _, _ = load_dataset("mlc_churn")
    devices = df.sample(n=1800, random_state=3).index  # as churn_slices draws them
    df.drop(index=devices).sample(n=rows, random_state=11).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- pure helpers


def test_shards_of_an_epoch_are_disjoint_equal_and_reshuffled_each_epoch() -> None:
    shards = [shard_indices(103, r, 4, epoch=0, seed=1) for r in range(4)]
    assert [len(s) for s in shards] == [25] * 4
    assert len(set(np.concatenate(shards).tolist())) == 100
    assert not np.array_equal(shard_indices(103, 0, 4, epoch=1, seed=1), shards[0])
    assert np.array_equal(shard_indices(103, 2, 4, epoch=0, seed=1), shards[2])
    with pytest.raises(ValueError, match="cannot be shared"):
        shard_indices(3, 0, 4, epoch=0, seed=1)


def test_learning_rate_warms_up_linearly_to_base_times_world_size() -> None:
    assert scaled_learning_rate(0.01, 4, 0, 10) == pytest.approx(0.01)
    assert scaled_learning_rate(0.01, 4, 5, 10) == pytest.approx(0.025)
    assert scaled_learning_rate(0.01, 4, 10, 10) == pytest.approx(0.04)
    assert scaled_learning_rate(0.01, 4, 99, 10) == pytest.approx(0.04)
    assert scaled_learning_rate(0.01, 1, 0, 0) == pytest.approx(0.01)


# --------------------------------------------------------------------------- horovodrun


@pytest.mark.slow
def test_two_ranks_end_with_identical_parameters_that_moved_from_the_initial_ones(
    horovod: None, tmp_path: Path
) -> None:
    x, y, pre = churn_arrays(600)
    arch = architecture(ModelSpec(hidden=[16]), pre.input_dim, pre.output_dim)
    vector, result = train_ranks(
        x,
        y,
        arch,
        task="binary",
        world=2,
        epochs=2,
        batch_size=32,
        learning_rate=0.01,
        workdir=tmp_path,
        seed=1,
    )

    # Both ranks hash the same final parameters, and rank 0's file is those parameters.
    sha = [(tmp_path / f"rank-{r}.sha256").read_text() for r in (0, 1)]
    assert sha[0] == sha[1] == result["final_sha256"] == parameter_sha256(vector)
    assert result["rank_sha256"] == sha
    initial = flatten_parameters(build_model(arch, seed=1))
    assert (tmp_path / "initial.sha256").read_text() == parameter_sha256(initial)
    assert sha[0] != parameter_sha256(initial) and not np.allclose(vector, initial)

    # Sharded data, scaled learning rate after warm-up, metrics over both ranks' rows.
    assert result["world_size"] == 2 and result["epochs"] == 2
    assert [h["samples"] for h in result["history"]] == [600, 600]
    assert result["learning_rate"] == {"base": 0.01, "scaled": 0.02}
    assert result["history"][-1]["learning_rate"] == pytest.approx(0.02)
    assert result["metrics"]["train_examples"] == 600
    model = build_model(arch)
    load_flat_parameters(model, vector)
    after = evaluate(model, x, y, task="binary")
    assert result["metrics"]["train_loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert result["metrics"]["train_accuracy"] == pytest.approx(after["accuracy"])
    before = evaluate(build_model(arch, seed=1), x, y, task="binary")
    assert after["loss"] < before["loss"]
    assert result["samples_per_second"] > 0

    # Rank 0 checkpointed each epoch: model, optimiser state and epoch.
    checkpoints = sorted((tmp_path / "checkpoints").glob("epoch-*.pt"))
    assert [p.name for p in checkpoints] == ["epoch-001.pt", "epoch-002.pt"]
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["epoch"] == 2 and state["optimizer"]["state"]
    restored = build_model(arch)
    restored.load_state_dict(state["model"])
    assert np.array_equal(flatten_parameters(restored), vector)


@pytest.mark.slow
def test_fp16_compressed_allreduce_keeps_the_ranks_identical(horovod: None, tmp_path: Path) -> None:
    x, y, pre = churn_arrays(300)
    arch = architecture(ModelSpec(hidden=[8]), pre.input_dim, pre.output_dim)
    vector, result = train_ranks(
        x,
        y,
        arch,
        task="binary",
        world=2,
        epochs=1,
        batch_size=50,
        learning_rate=0.01,
        workdir=tmp_path,
        fp16=True,
    )
    assert result["fp16"] is True
    assert result["rank_sha256"][0] == result["rank_sha256"][1] == parameter_sha256(vector)


@pytest.mark.slow
def test_a_failing_rank_gives_one_line_with_the_tail_of_its_traceback(horovod: None, tmp_path: Path) -> None:
    x, y, pre = churn_arrays(200)
    wrong = architecture(ModelSpec(hidden=[8]), pre.input_dim + 3, pre.output_dim)
    with pytest.raises(CliError) as err:
        train_ranks(
            x, y, wrong, task="binary", world=2, epochs=1, batch_size=50, learning_rate=0.01, workdir=tmp_path
        )
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("pre-training failed on rank ")
    assert "mat1 and mat2 shapes cannot be multiplied" in message


# --------------------------------------------------------------------------- with a real coordinator


def submit(coord: Coordinator, spec: dict[str, Any], reference: Path | None = None) -> int:
    api = coord.api()
    job = api.json("POST", "/v1/jobs", json=spec)
    if reference is not None:
        api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference.read_bytes())
    return int(job["id"])


def pretrained_spec(schema: dict[str, Any], **kw: Any) -> dict[str, Any]:
    spec = small_spec(schema, **kw)
    spec["model"] = {**spec["model"], "initial": "pretrained"}
    return spec


@pytest.mark.slow
def test_pretrained_version0_carries_provenance_and_the_first_round_starts_from_it(
    horovod: None, tmp_path: Path
) -> None:
    coord = Coordinator(tmp_path)
    coord.bootstrap()
    coord.start()
    try:
        paths, ref, schema = churn_slices(tmp_path / "data", 2)
        central = central_churn(tmp_path / "central.csv")
        job_id = submit(coord, pretrained_spec(schema, rounds=1, target=2, minimum=2, secure=False), ref)
        for i, p in enumerate(paths):
            coord.run_agent(coord.enroll(p, f"a{i}"))

        lines: list[str] = []
        api = ClusterApi(coord.api())
        summary = pretrain(
            api,
            job_id,
            central,
            np=2,
            epochs=1,
            batch_size=64,
            wait=120,
            workdir=tmp_path / "work",
            log=lines.append,
        )
        data_sha = hashlib.sha256(central.read_bytes()).hexdigest()
        assert summary["version"] == 0 and summary["world_size"] == 2 and summary["epochs"] == 1
        assert summary["data_sha256"] == data_sha and summary["rows"] == 800
        assert summary["samples_per_second"] > 0 and summary["seconds"] > 0
        assert summary["metrics"]["train_loss"] > 0
        assert set(summary["metrics"]["central"]) >= {"loss", "accuracy", "auc", "examples"}
        assert any("version 0 registered" in line for line in lines)

        v0 = api.models(job_id)[0]
        assert v0["version"] == 0 and v0["parent"] is None
        prov = v0["provenance"]
        assert prov["source"] == "pretrain"
        assert prov["world_size"] == 2 and prov["epochs"] == 1 and prov["rows"] == 800
        assert prov["data_sha256"] == data_sha
        assert prov["learning_rate"] == {"base": 0.01, "scaled": 0.02}
        assert prov["horovod_version"] == "0.28.1"
        assert prov["metrics"]["train_loss"] == pytest.approx(summary["metrics"]["train_loss"])
        uploaded = np.load(tmp_path / "work" / "final.npy")
        header, vec0 = api.model(job_id, 0)
        assert np.array_equal(vec0, uploaded)

        job = coord.wait_job(job_id, timeout=180)
        (first,) = [r for r in coord.rounds(job_id) if r["kind"] == "train"]
        assert first["status"] == "completed"
        assert first["model_version_in"] == 0 and first["model_version_out"] == 1
        assert [v["parent"] for v in api.models(job_id)] == [None, 0]
        assert job["current_version"] == 1
        # The round's input is exactly what pre-training uploaded.
        assert (
            parameter_sha256(api.model(job_id, first["model_version_in"])[1]) == summary["parameters_sha256"]
        )
    finally:
        coord.stop_agents()
        coord.stop()


@pytest.fixture(scope="module")
def idle_coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """A coordinator with no devices: jobs stay before their statistics round."""
    c = Coordinator(tmp_path_factory.mktemp("coord"))
    c.bootstrap()
    c.start()
    yield c
    c.stop()


def _churn_schema() -> dict[str, Any]:
    return load_dataset("mlc_churn")[1]


@pytest.mark.slow
def test_pretrain_without_horovodrun_names_it_and_the_install_script(
    idle_coord: Coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(idle_coord, pretrained_spec(_churn_schema(), rounds=1, target=2, minimum=2))
    monkeypatch.setenv("AICFL_HOROVODRUN", "/nonexistent/horovodrun")
    with pytest.raises(CliError) as err:
        pretrain(
            ClusterApi(idle_coord.api()),
            job_id,
            central_churn(tmp_path / "c.csv", 50),
            wait=1,
            log=lambda _: None,
        )
    message = str(err.value)
    assert "\n" not in message
    assert (
        "horovodrun not found at /nonexistent/horovodrun" in message
        and "scripts/install_horovod.sh" in message
    )


@pytest.mark.slow
def test_central_data_missing_a_column_names_the_column(idle_coord: Coordinator, tmp_path: Path) -> None:
    job_id = submit(idle_coord, pretrained_spec(_churn_schema(), rounds=1, target=2, minimum=2))
    bad = tmp_path / "bad.csv"
    pd.read_csv(central_churn(tmp_path / "c.csv", 50)).drop(columns=["total_day_minutes"]).to_csv(
        bad, index=False
    )
    with pytest.raises(CliError) as err:
        pretrain(ClusterApi(idle_coord.api()), job_id, bad, wait=1, log=lambda _: None)
    message = str(err.value)
    assert "\n" not in message
    assert "'total_day_minutes'" in message and "missing" in message and "bad.csv" in message

    with pytest.raises(CliError, match="does not exist"):
        pretrain(ClusterApi(idle_coord.api()), job_id, tmp_path / "nope.csv", wait=1, log=lambda _: None)


@pytest.mark.slow
def test_a_job_that_starts_from_random_weights_is_refused(idle_coord: Coordinator, tmp_path: Path) -> None:
    job_id = submit(idle_coord, small_spec(_churn_schema(), rounds=1, target=2, minimum=2))
    with pytest.raises(CliError, match=r'model.initial = "random"'):
        pretrain(
            ClusterApi(idle_coord.api()),
            job_id,
            central_churn(tmp_path / "c.csv", 50),
            wait=1,
            log=lambda _: None,
        )


@pytest.mark.slow
def test_cli_prints_one_error_line_and_exits_non_zero(idle_coord: Coordinator, tmp_path: Path) -> None:
    job_id = submit(idle_coord, pretrained_spec(_churn_schema(), rounds=1, target=2, minimum=2))
    bad = tmp_path / "bad.csv"
    pd.read_csv(central_churn(tmp_path / "c.csv", 50)).drop(columns=["churn"]).to_csv(bad, index=False)
    env = {**ENV, "AICFL_URL": idle_coord.url, "AICFL_TOKEN": idle_coord.token}
    out = subprocess.run(
        py("server", "cluster", "pretrain", "--job", str(job_id), "--data", str(bad), "--np", "2"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "'churn' (target)" in out.stderr and "missing" in out.stderr
