"""One pre-training rank on its own (no horovodrun, world of 1): what it writes, and how it fails.

``python -m training_cluster.hvd_worker CONFIG`` runs as the launcher would
start each rank; Horovod makes a world of one. The two-rank runs are in
test_pretrain.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.jobspec import Task
from shared.training import as_tensors, task_loss
from shared.zoo import build_model, load_flat_parameters
from training_cluster.hvd_worker import CONFIG_FORMAT, main, parameter_sha256, shard_indices


def config(workdir: Path, task: Task, **extra: Any) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    if task == "regression":
        y = (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
    else:
        y = np.argmax(x, axis=1).astype(np.int64)  # three classes
    np.save(workdir / "x.npy", x)
    np.save(workdir / "y.npy", y)
    out_dim = 1 if task == "regression" else 3
    cfg = {
        "format": CONFIG_FORMAT,
        "arch": {"zoo": "mlp", "input_dim": 3, "output_dim": out_dim, "hidden": [8], "dropout": 0.0},
        "task": task,
        "seed": 1,
        "x_path": str(workdir / "x.npy"),
        "y_path": str(workdir / "y.npy"),
        "epochs": 2,
        "batch_size": 8,
        "learning_rate": 0.05,
        "threads": 1,
        "workdir": str(workdir),
        **extra,
    }
    path = workdir / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("task", "optimizer", "metric"),
    [("regression", "sgd", "train_rmse"), ("multiclass", "adam", "train_accuracy")],
)
def test_a_single_rank_trains_and_reports_metrics_of_its_final_model(
    task: Task, optimizer: str, metric: str, tmp_path: Path
) -> None:
    path = config(tmp_path, task, optimizer=optimizer, target_std=2.0)
    proc = subprocess.run(
        [sys.executable, "-m", "training_cluster.hvd_worker", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["world_size"], result["warmup_steps"], result["epochs"]) == (1, 0, 2)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt"]

    final = np.load(tmp_path / "final.npy")
    assert parameter_sha256(final) == result["final_sha256"] == (tmp_path / "rank-0.sha256").read_text()
    assert result["initial_sha256"] != result["final_sha256"]

    # The metrics are those of the final parameters on all rows, in the target's units.
    cfg = json.loads(path.read_text())
    model = build_model(cfg["arch"])
    load_flat_parameters(model, final)
    model.eval()
    inputs, targets = as_tensors(np.load(tmp_path / "x.npy"), np.load(tmp_path / "y.npy"), task)
    with torch.no_grad():
        out = model(inputs)
    metrics = result["metrics"]
    assert metrics["train_examples"] == 24
    assert metrics["train_loss"] == pytest.approx(float(task_loss(out, targets, task)), rel=1e-5)
    if task == "regression":
        rmse = float(torch.sqrt(((out.reshape(-1) - targets) ** 2).mean())) * 2.0
        assert metrics[metric] == pytest.approx(rmse, rel=1e-5)
    else:
        assert metrics[metric] == pytest.approx(float((out.argmax(dim=1) == targets).float().mean()))


def test_a_rank_started_without_exactly_one_config_prints_its_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    assert main(["a.json", "b.json"]) == 2
    assert capsys.readouterr().err == "usage: python -m training_cluster.hvd_worker CONFIG.json\n" * 2


def test_a_config_of_another_format_fails_the_rank_with_its_traceback_for_the_launcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "regression", format="aicfl.pretrain/0")
    assert main([str(path)]) == 1
    err = (tmp_path / "rank-0.err").read_text()
    assert err.startswith("Traceback") and err.rstrip().endswith(
        "ValueError: not a pre-training config (expected format 'aicfl.pretrain/1')"
    )
    assert capsys.readouterr().err.strip() == err.strip()


@pytest.mark.parametrize(("rank", "size"), [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_its_world_has_no_shard(rank: int, size: int) -> None:
    with pytest.raises(ValueError, match=f"^rank {rank} is not in a world of size {size}$"):
        shard_indices(10, rank, size, epoch=0, seed=0)
