"""The agent under differential privacy (docs/privacy.md): weight 1, and nothing data-dependent beside the update."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared import codec
from tests.unit.test_agent_worker import signed_model, spec, task, worker

CENTRAL = {"level": "central", "target_epsilon": 4.0, "delta": 1e-5, "clip": 0.5, "noise_multiplier": 1.0}


def test_a_central_dp_update_has_weight_one_and_no_loss_metrics_or_row_count(
    scripted_coordinator, tmp_path: Path
) -> None:
    plain = spec(holdout=0.5)
    private = {**plain, "privacy": CENTRAL, "evaluation": {"federated": False}}
    blob, ref = signed_model(1, 0, header_job=1, header_version=0, raw=plain)
    scripted_coordinator.reply("GET", "/v1/device/jobs/1/models/0", 200, raw=blob)
    w = worker(scripted_coordinator.url, tmp_path, 10)

    assert w.configure(task("train", "configure", private, ref)).rows == 0
    assert w.configure(task("train", "configure", plain, ref)).rows == 5
    header, update = codec.decode(w.train(task("train", "input", private, ref)))
    assert {k: v for k, v in header.items() if k not in ("dtype", "numel")} == {
        "kind": "update",
        "round_id": 3,
        "num_examples": 1,
    }
    # The same training (same seed) without privacy sends the delta times its 5 training rows.
    weighted_header, weighted = codec.decode(w.train(task("train", "input", plain, ref)))
    assert weighted_header["num_examples"] == 5 and "train_loss" in weighted_header
    np.testing.assert_allclose(update * 5, weighted, rtol=1e-5, atol=1e-7)
    assert np.abs(update).sum() > 0
