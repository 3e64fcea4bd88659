"""The SHAP audit of an app's model (tests/cluster/image_app.py: a CNN on 8x8 digits).

Per-pixel attributions, the top pixels, a PNG of the mean attribution towards each class, drift
against the previous version exactly as for tabular jobs, and the worker's loop over app jobs.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from coordinator import apps as coordinator_apps
from coordinator.audits import PNG_MAGIC, decode_plots
from shared.apps import App, JobContext, LocalData, TrainConfig
from shared.apps.base import AuditInputs
from shared.jobspec import JobSpec, validate_spec
from training_cluster.audit import (
    AuditError,
    FlatInput,
    app_version_importance,
    audit_app_version,
    class_maps,
    explain,
)
from training_cluster.audit_worker import run_worker

from .image_app import CLASSES, PIXELS, DigitsApp, Images, app, digits_frame, model_table

AUDIT = {"rows": 120, "background": 20, "validate_rows": 0, "top": 5}


def digits_spec(audit: dict[str, Any] | None = None, **options: Any) -> JobSpec:
    return validate_spec(
        {"name": "digits", "rounds": 1, "model": model_table(**options), "audit": {**AUDIT, **(audit or {})}}
    )


def header(spec: JobSpec, version: int) -> dict[str, Any]:
    """A version's header as the coordinator writes it: the app's description, the job's setup."""
    return {"version": version, "arch": app.describe(JobContext(spec, {})), "preprocess": {}}


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_MAGIC) and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


@pytest.fixture(scope="module")
def reference() -> Images:
    return app.load_reference(
        digits_frame(np.arange(1400, 1797)).to_csv(index=False).encode(), JobContext(digits_spec(), {})
    )


@pytest.fixture(scope="module")
def versions() -> tuple[np.ndarray, np.ndarray]:
    """Version 0 as the coordinator builds it (the app's model under the job's seed) and version 1:
    that model after four epochs on 1,000 other digits."""
    job = JobContext(digits_spec(), {})
    v0 = coordinator_apps.initial_vector(app, job)
    model = app.build_model(job)
    app.set_parameters(model, v0)
    frame = digits_frame(np.arange(1000))
    train = app.load_reference(frame.to_csv(index=False).encode(), job)
    config = TrainConfig(round=1, epochs=4, batch_size=32, learning_rate=0.05, optimizer="sgd", seed=0)
    app.train(model, LocalData(train, train, len(train), len(train)), config)
    return v0, app.get_parameters(model)


@pytest.fixture(scope="module")
def audits(reference: Images, versions: tuple[np.ndarray, np.ndarray]) -> tuple[Any, Any]:
    """The audits of version 0 and of version 1 (compared with version 0's report)."""
    spec = digits_spec()
    first = audit_app_version(spec, app, header(spec, 0), versions[0], reference, plots=False)
    second = audit_app_version(spec, app, header(spec, 1), versions[1], reference, previous=first.report)
    return first, second


# --------------------------------------------------------------------------- what one audit reports


def test_app_audit_attributes_every_pixel_and_ranks_the_top_pixels(audits: tuple[Any, Any]) -> None:
    _, result = audits
    report = result.report
    assert result.features == PIXELS
    assert result.values.shape == (120, 64, 10)
    assert set(report["importance"]) == set(PIXELS) and set(report["shares"]) == set(PIXELS)
    assert report["explainer"] == "deep" and report["additivity_max_error"] < 1e-4
    assert report["output"] == "logit of each digit (before softmax)"
    assert report["input_shape"] == [1, 8, 8] and report["image_shape"] == [8, 8]
    assert report["rows"] == 120 and report["background"] == 20 and len(report["expected_value"]) == 10

    # Importance is mean |SHAP| per pixel, summed over the ten classes; the top five are the largest.
    mean_abs = np.abs(result.values).mean(axis=0)
    assert report["importance"]["px_3_4"] == pytest.approx(mean_abs[3 * 8 + 4].sum())
    ranked = sorted(PIXELS, key=lambda p: -report["importance"][p])
    assert report["top_features"] == ranked[:5]
    assert set(report["importance_by_class"]) == set(CLASSES)
    assert report["importance_by_class"]["7"]["px_3_4"] == pytest.approx(mean_abs[3 * 8 + 4, 7])
    # The top-left pixel is blank in every digit, as in the background: DeepLIFT gives it nothing.
    assert report["importance"]["px_0_0"] < 1e-6

    assert report["validation"] is None  # validate_rows = 0
    json.dumps(report)  # what the worker sends


@pytest.mark.slow  # shap compiles its permutation explainer's numba code on first use (~10 s)
def test_app_audit_values_agree_with_a_permutation_estimate_of_the_same_shapley_values(
    reference: Images, versions: tuple[np.ndarray, np.ndarray]
) -> None:
    spec = digits_spec(audit={"rows": 10, "validate_rows": 3})
    report = audit_app_version(spec, app, header(spec, 1), versions[1], reference, plots=False).report
    validation = report["validation"]
    assert validation["explainer"] == "permutation" and validation["rows"] == 3
    assert validation["correlation"] > 0.8


def test_class_maps_png_shows_the_mean_attribution_towards_each_class_as_8x8_heatmaps(
    audits: tuple[Any, Any],
) -> None:
    _, result = audits
    assert set(result.plots) == {"importance.png", "beeswarm.png", "class_maps.png"}
    png = result.plots["class_maps.png"]
    # Ten panels of 160 x 180 px in two rows of five, a colour bar strip and a title strip.
    assert png_size(png) == (5 * 160 + 80, 2 * 180 + 40)
    from matplotlib.image import imread

    assert imread(io.BytesIO(png), format="png").shape[:2] == (400, 880)

    # The maps drawn: class j's is the mean of the rows predicted as j, towards j.
    outputs = np.random.default_rng(0).normal(size=(120, 10))
    maps, counts = class_maps(result.values, outputs, (8, 8))
    predicted = outputs.argmax(axis=1)
    assert maps.shape == (10, 8, 8) and sum(counts) == 120
    for j in (0, 7):
        expected = result.values[predicted == j, :, j].mean(axis=0).reshape(8, 8)
        assert counts[j] == int((predicted == j).sum())
        np.testing.assert_allclose(maps[j], expected)

    # The coordinator takes these plots as they are sent.
    sent = {name: base64.b64encode(data).decode() for name, data in result.plots.items()}
    assert decode_plots(sent) == result.plots


# --------------------------------------------------------------------------- drift


def test_app_audit_measures_drift_against_the_previous_version_like_a_tabular_one(
    audits: tuple[Any, Any], reference: Images, versions: tuple[np.ndarray, np.ndarray]
) -> None:
    first, second = audits
    assert first.report["previous_version"] is None and first.report["drift"]["rank_correlation"] is None
    assert first.verdict == "ok"

    drift = second.report["drift"]
    assert second.report["previous_version"] == 0
    before, after = first.report["importance"], second.report["importance"]
    rho = spearmanr([after[p] for p in PIXELS], [before[p] for p in PIXELS]).statistic
    assert drift["rank_correlation"] == pytest.approx(rho)
    moved = {p for p in PIXELS if abs(second.report["shares"][p] - first.report["shares"][p]) > 0.15}
    assert {s["feature"] for s in drift["shifted"]} == moved
    assert second.verdict == ("drift" if rho < 0.7 or moved else "ok")

    # A previous version that ranked the pixels the other way round: drift, with the reason.
    spec = digits_spec()
    reversed_ranks = {p: float(i) for i, p in enumerate(reversed(sorted(PIXELS, key=lambda p: after[p])))}
    turned = audit_app_version(
        spec,
        app,
        header(spec, 2),
        versions[1],
        reference,
        previous={"version": 1, "importance": reversed_ranks},
        plots=False,
    )
    assert turned.verdict == "drift"
    assert turned.report["drift"]["rank_correlation"] < 0
    assert any("rank correlation of feature importances" in r for r in turned.report["reasons"])


def test_a_previous_app_version_without_a_report_gets_the_importances_its_own_audit_reports(
    audits: tuple[Any, Any], reference: Images, versions: tuple[np.ndarray, np.ndarray]
) -> None:
    first, _ = audits
    spec = digits_spec()
    importance = app_version_importance(spec, app, header(spec, 0), versions[0], reference, version=0)
    assert importance.keys() == first.report["importance"].keys()
    np.testing.assert_allclose(
        [importance[p] for p in PIXELS], [first.report["importance"][p] for p in PIXELS], rtol=1e-9
    )


# --------------------------------------------------------------------------- explainers and refusals


def test_a_model_deeplift_has_no_rule_for_is_explained_with_expected_gradients(reference: Images) -> None:
    # Expected gradients cost a few hundred backward passes per row: few rows.
    spec = digits_spec(audit={"rows": 10, "background": 10}, functional=True)
    job = JobContext(spec, {})
    vector = coordinator_apps.initial_vector(app, job)
    result = audit_app_version(spec, app, header(spec, 0), vector, reference, plots=False)
    assert result.report["explainer"] == "gradient"
    # DeepLIFT alone would have been wrong: its attributions do not add up to the outputs.
    forced = audit_app_version(spec, app, header(spec, 0), vector, reference, explainer="deep", plots=False)
    assert forced.report["additivity_max_error"] > 1e-2


def test_explaining_an_app_model_leaves_its_parameters_as_they_were(reference: Images) -> None:
    # shap's DeepLIFT hooks store each leaf's input and output as parameters x and y and remove
    # them only under nn.Sequential; the digits CNN is a module of its own class.
    model = app.build_model(JobContext(digits_spec(), {}))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flat = FlatInput(model, (1, 8, 8))
    x = reference.x.reshape(len(reference), 64)
    assert explain(flat, x[:5], x[5:15], explainer="deep").explainer == "deep"
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())


class NoAuditApp(DigitsApp):
    """The digits app as an app that does not say how its model is audited (App's default)."""

    def audit_inputs(self, reference: Any, job: JobContext) -> AuditInputs | None:
        return App.audit_inputs(self, reference, job)


class FewNamesApp(DigitsApp):
    def audit_inputs(self, reference: Any, job: JobContext) -> AuditInputs:
        return AuditInputs(x=reference.x, features=PIXELS[:60])


def test_an_app_without_audit_inputs_or_with_unfit_ones_cannot_be_audited(
    reference: Images, versions: tuple[np.ndarray, np.ndarray]
) -> None:
    spec = digits_spec()
    with pytest.raises(AuditError, match=r"gives no audit inputs \(App.audit_inputs\)"):
        audit_app_version(spec, NoAuditApp(), header(spec, 0), versions[0], reference)
    with pytest.raises(AuditError, match=r"60 feature names for inputs of shape \(1, 8, 8\) \(64 values\)"):
        audit_app_version(spec, FewNamesApp(), header(spec, 0), versions[0], reference)
    other = digits_spec(channels=4)
    with pytest.raises(
        AuditError, match="was built for .* but app tests.cluster.image_app:app here describes"
    ):
        audit_app_version(spec, app, header(other, 0), versions[0], reference)


# --------------------------------------------------------------------------- the worker


class FakeAppCoordinator:
    """The ClusterApi calls of the audit worker, over one app job whose version 0 has no report."""

    def __init__(self, spec: JobSpec, reference: bytes, vectors: dict[int, np.ndarray]) -> None:
        self.spec = spec.model_dump(mode="json")
        self.reference_bytes = reference
        self.vectors = vectors
        self.queue = [{"id": 101, "job_id": 1, "version": 1, "attempt": 1, "previous_version": 0}]
        self.completed: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.calls: list[str] = []

    def claim_audit(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        return self.queue.pop(0) if self.queue else None

    def job(self, job_id: int) -> dict[str, Any]:
        return {"id": job_id, "spec": self.spec, "preprocess": {}, "status": "running"}

    def reference(self, job_id: int) -> bytes:
        return self.reference_bytes

    def model(self, job_id: int, version: int) -> tuple[dict[str, Any], np.ndarray]:
        self.calls.append(f"model {version}")
        return header(JobSpec.model_validate(self.spec), version), self.vectors[version]

    def audit(self, job_id: int, version: int) -> dict[str, Any] | None:
        return {"status": "failed", "report": None}

    def baseline(self, job_id: int) -> dict[str, Any] | None:
        return None

    def complete_audit(self, audit_id: int, worker: str, **kw: Any) -> dict[str, Any]:
        self.completed.append(kw)
        return {"id": audit_id, "status": "done"}

    def fail_audit(self, audit_id: int, worker: str, error: str) -> dict[str, Any]:
        self.failed.append(error)
        return {"id": audit_id, "status": "queued"}


def test_worker_audits_an_app_job_and_measures_drift_from_a_previous_version_it_audits_itself(
    audits: tuple[Any, Any], versions: tuple[np.ndarray, np.ndarray]
) -> None:
    spec = digits_spec()
    csv = digits_frame(np.arange(1400, 1797)).to_csv(index=False).encode()
    fake = FakeAppCoordinator(spec, csv, {0: versions[0], 1: versions[1]})
    assert run_worker(fake, "w", once=True, poll=0.01, log=lambda _: None) == 1  # type: ignore[arg-type]

    (done,) = fake.completed
    report = done["report"]
    assert fake.calls == ["model 1", "model 0"]  # version 0's importances computed here
    assert report["previous_version"] == 0 and report["drift"]["rank_correlation"] is not None
    assert report["importance"] == pytest.approx(audits[1].report["importance"], rel=1e-9)
    assert report["drift"]["rank_correlation"] == pytest.approx(audits[1].report["drift"]["rank_correlation"])
    assert done["verdict"] == report["verdict"] and set(done["plots"]) >= {"class_maps.png"}


def test_worker_records_an_app_that_does_not_import_as_the_audit_failure_in_one_line(
    versions: tuple[np.ndarray, np.ndarray],
) -> None:
    spec = digits_spec().model_dump(mode="json")
    spec["model"]["app"] = "tests.cluster.no_such_app:app"
    fake = FakeAppCoordinator(JobSpec.model_validate(spec), b"", {1: versions[1]})
    assert run_worker(fake, "w", once=True, poll=0.01, log=lambda _: None) == 0  # type: ignore[arg-type]
    (error,) = fake.failed
    assert "\n" not in error
    assert error.startswith("AppError: app 'tests.cluster.no_such_app:app' does not import here")
