"""What the agent's worker answers for a stage: declines it can explain, and rounds without holdout rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_agent.transport import SignedClient
from client_agent.worker import Worker
from shared import codec
from shared.jobspec import validate_spec
from shared.signing import b64e, model_message, public_key_bytes, sha256_hex
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from shared.wire import ModelRef, RoundKind, Stage, Task
from shared.zoo import architecture, build_model, flatten_parameters

COORDINATOR = Ed25519PrivateKey.generate()


def spec(**training: Any) -> dict[str, Any]:
    return {
        "name": "t",
        "rounds": 1,
        "secure": False,
        "data": {
            "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical"}],
            "target": "y",
            "task": "binary",
        },
        "model": {"hidden": [4]},
        "training": {"batch_size": 4, **training},
    }


def rows(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "a": np.arange(n, dtype=float),
            "b": ["x", "z"] * (n // 2) + ["x"] * (n % 2),
            "y": ["no", "yes"] * (n // 2) + ["no"] * (n % 2),
        }
    )


def signed_model(
    job_id: int, version: int, header_job: int, header_version: int, raw: dict[str, Any]
) -> tuple[bytes, ModelRef]:
    """A model blob whose header says (header_job, header_version), signed for (job_id, version)."""
    js = validate_spec(raw)
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(rows(10), js.data)]), js.data)
    arch = architecture(js.model, pre.input_dim, pre.output_dim)
    header = {
        "kind": "model",
        "job_id": header_job,
        "version": header_version,
        "arch": arch,
        "preprocess": pre.to_dict(),
    }
    blob = codec.encode(header, flatten_parameters(build_model(arch, seed=0)))
    sha = sha256_hex(blob)
    signature = b64e(COORDINATOR.sign(model_message(job_id, version, sha)))
    return blob, ModelRef(version=version, sha256=sha, signature=signature, size=len(blob))


def worker(url: str, tmp_path: Path, n_rows: int) -> Worker:
    data = tmp_path / "data.csv"
    rows(n_rows).to_csv(data, index=False)
    client = SignedClient(url, "dev-1", Ed25519PrivateKey.generate())
    return Worker(client, str(data), b64e(public_key_bytes(COORDINATOR)), "dev-1")


def task(kind: RoundKind, stage: Stage, raw: dict[str, Any], model: ModelRef | None) -> Task:
    return Task(
        round_id=3, job_id=1, round=1, kind=kind, stage=stage, deadline=0, seed=5, spec=raw, model=model
    )


def test_a_training_task_that_names_no_model_is_declined(scripted_coordinator, tmp_path: Path) -> None:
    w = worker(scripted_coordinator.url, tmp_path, 10)
    msg = w.configure(task("train", "configure", spec(), None))
    assert (msg.accepted, msg.reason) == (False, "the task names no model")
    assert scripted_coordinator.received == []


def test_a_signed_model_whose_header_names_another_job_is_declined(
    scripted_coordinator, tmp_path: Path
) -> None:
    # The signature is right for job 1 v0, but the blob says it is job 2's: a coordinator (or a
    # store) serving one job's model for another must not get it trained on.
    blob, ref = signed_model(1, 0, header_job=2, header_version=0, raw=spec())
    scripted_coordinator.reply("GET", "/v1/device/jobs/1/models/0", 200, raw=blob)
    w = worker(scripted_coordinator.url, tmp_path, 10)
    msg = w.configure(task("train", "configure", spec(), ref))
    assert (msg.accepted, msg.reason) == (False, "model refused: its header names another job or version")


@pytest.mark.parametrize(("holdout", "n_rows"), [(0.0, 10), (0.5, 4)], ids=["holdout-0", "fewer-than-5-rows"])
def test_without_holdout_rows_every_row_trains_and_no_holdout_metrics_are_sent(
    holdout: float, n_rows: int, scripted_coordinator, tmp_path: Path
) -> None:
    raw = spec(holdout=holdout)
    blob, ref = signed_model(1, 0, header_job=1, header_version=0, raw=raw)
    scripted_coordinator.reply("GET", "/v1/device/jobs/1/models/0", 200, raw=blob)
    w = worker(scripted_coordinator.url, tmp_path, n_rows)

    assert w.evaluate(task("evaluate", "input", raw, ref)).model_dump() == {"metrics": {}, "examples": 0}
    header, update = codec.decode(w.train(task("train", "input", raw, ref)))
    assert header["num_examples"] == n_rows and header["holdout_examples"] == 0
    assert header["metrics"] == {} and np.isfinite(header["train_loss"])
    assert update.shape == codec.decode(blob)[1].shape and np.abs(update).sum() > 0
    # The model is fetched and verified once, then kept for the round's later stages.
    assert len(scripted_coordinator.requests_to("GET", "/v1/device/jobs/1/models/0")) == 1


def test_the_data_is_checked_once_per_job_and_again_when_it_changes(
    scripted_coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.apps.tabular import TabularApp

    checks: list[int] = []
    original = TabularApp.check_data

    def counted(self: TabularApp, data: Any, job: Any) -> None:
        checks.append(1)
        original(self, data, job)

    monkeypatch.setattr(TabularApp, "check_data", counted)
    raw = spec()
    blob, ref = signed_model(1, 0, header_job=1, header_version=0, raw=raw)
    scripted_coordinator.reply("GET", "/v1/device/jobs/1/models/0", 200, raw=blob)
    w = worker(scripted_coordinator.url, tmp_path, 10)
    for _ in range(3):  # three rounds' configure stages of one job, on unchanged rows
        assert w.configure(task("train", "configure", raw, ref)).accepted
    assert len(checks) == 1

    # New rows (a later modification time) are checked again: here they break the schema.
    bad = rows(10).assign(a=["not a number"] * 10)
    path = tmp_path / "data.csv"
    bad.to_csv(path, index=False)
    stamp = path.stat().st_mtime + 5

    os.utime(path, (stamp, stamp))
    msg = w.configure(task("train", "configure", raw, ref))
    assert len(checks) == 2 and not msg.accepted and "schema" in (msg.reason or ""), msg
