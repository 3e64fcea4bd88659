"""A gbdt job (docs/gbdt.md) over real HTTP on loopback, with real agent processes and SecAgg+."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from shared import codec
from shared.gbdt import predict
from shared.gbdt.model import from_bytes
from shared.jobspec import JobSpec
from shared.signing import load_public_key, verify_model
from shared.tabular import Preprocessor, read_table_bytes

from .harness import ENV, Coordinator, churn_slices, py, small_spec

pytestmark = pytest.mark.slow


def test_gbdt_job_with_real_agents_registers_signed_ensembles_that_export_to_xgboost(
    coord: Coordinator, tmp_path: Path
) -> None:
    paths, ref, schema = churn_slices(tmp_path / "data", 3)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    spec = small_spec(schema, rounds=1, target=3, minimum=2)
    spec["model"] = {"zoo": "gbdt"}
    spec["gbdt"] = {"max_depth": 2, "bins": 16}
    spec["audit"] = {"enabled": False}
    api = coord.api()
    job_id = int(api.json("POST", "/v1/jobs", json=spec)["id"])
    api.request("PUT", f"/v1/jobs/{job_id}/reference", content=ref.read_bytes())
    job = coord.wait_job(job_id)

    kinds = [(r["kind"], r["status"]) for r in coord.rounds(job_id)]
    assert kinds[:2] == [("stats", "completed"), ("bins", "completed")]
    assert {k for k, _ in kinds[2:-1]} == {"level"} and kinds[-1] == ("evaluate", "completed")
    assert all(r["metrics"]["secure"] for r in coord.rounds(job_id) if r["kind"] in ("bins", "level"))
    assert job["rounds_completed"] == 1

    versions = api.json("GET", f"/v1/jobs/{job_id}/models")
    assert [v["version"] for v in versions] == [0, 1]
    assert all(0.5 < v["metrics"]["central"]["auc"] <= 1.0 for v in versions[1:])
    key = load_public_key(api.json("GET", "/v1/coordinator/key")["public_key"])
    for v in versions:
        blob = api.request("GET", f"/v1/jobs/{job_id}/models/{v['version']}/blob").content
        verify_model(key, job_id, v["version"], blob, v["sha256"], v["signature"])

    env = {**ENV, "AICFL_URL": coord.url, "AICFL_TOKEN": coord.token}
    target = tmp_path / "model.json"
    out = subprocess.run(
        py("server", "models", "export", str(job_id), "--format", "xgboost", "--out", str(target)),
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    refused = subprocess.run(
        py("server", "models", "export", str(job_id), "--format", "onnx", "--out", str(tmp_path / "m.onnx")),
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode != 0 and "exports as xgboost" in refused.stderr
    # The learning curve draws the boosting round (its last level round made version 1).
    png = tmp_path / "curve.png"
    plotted = subprocess.run(
        py("server", "rounds", "plot", str(job_id), "--out", str(png)),
        capture_output=True,
        text=True,
        env=env,
    )
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    xgboost = pytest.importorskip("xgboost")
    booster = xgboost.Booster(model_file=str(target))
    header, vector = codec.decode(
        api.request("GET", f"/v1/jobs/{job_id}/models/1/blob").content, dtype="uint8"
    )
    assert header["arch"]["format"] == "aicfl-gbdt-v1"
    pre = Preprocessor.from_dict(header["preprocess"])
    x, _ = pre.transform(read_table_bytes(ref.read_bytes(), JobSpec.model_validate(job["spec"]).tabular))
    np.testing.assert_allclose(
        booster.predict(xgboost.DMatrix(x)), predict(from_bytes(vector).ensemble, x), rtol=0, atol=1e-6
    )
