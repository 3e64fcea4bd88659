"""The SHAP audit of a gbdt version (training_cluster/audit_trees.py) on real data sets and federated trees.

Ensembles are grown by the federated protocol in one process (``shared.gbdt.train_in_memory``, the
engine's grid) on the job's real preprocessing. What is proved: the attributions add up to the
margin that XGBoost's own predictor gives for the exported model; they are the interventional
Shapley values over the background (a closed form for a stump whose covers disagree with the
background, shap's Exact explainer on aicfl's predictor for binary, multiclass with unequal
per-class base scores, and regression); the report has the tabular audit's fields, its drift
against the previous version and the AutoML baseline, and its verdict; a version without trees
attributes nothing and is not compared with; the audit worker picks the tree audit for a gbdt job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shared.apps import JobContext
from shared.apps.tabular import app as tabular_app
from shared.datasets import load_dataset, test_split
from shared.gbdt import BoostConfig, Ensemble, Tree, train_in_memory
from shared.gbdt.model import BoostedModel, to_vector
from shared.gbdt.rounds import boost_setup
from shared.jobspec import JobSpec, validate_spec
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from training_cluster.audit import AuditError, draw_rows, spearman
from training_cluster.audit_tabular import feature_groups
from training_cluster.audit_trees import (
    audit_tree_version,
    booster_of,
    explain_trees,
    load_boosted,
    tree_version_importance,
)
from training_cluster.audit_worker import run_worker

xgboost = pytest.importorskip("xgboost")

REPORT_FIELDS = {
    "version",
    "previous_version",
    "explainer",
    "output",
    "rows",
    "background",
    "expected_value",
    "importance",
    "importance_by_class",
    "shares",
    "top_features",
    "additivity_max_error",
    "validation",
    "drift",
    "baseline",
    "verdict",
    "reasons",
    "seconds",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHURN_FEATURES = {
    "total_day_minutes",
    "number_customer_service_calls",
    "international_plan",
    "voice_mail_plan",
    "area_code",
}


class Job:
    """A gbdt job on real rows: its spec, preprocessing, reference rows and ensembles after 0..rounds rounds."""

    def __init__(self, frame: pd.DataFrame, schema: dict[str, Any], rounds: int, audit: dict[str, Any]):
        train, self.reference = test_split(frame, 0.3, seed=0, stratify_column=None)
        self.spec: JobSpec = validate_spec(
            {
                "name": "trees",
                "rounds": rounds,
                "seed": 7,
                "data": schema,
                "model": {"zoo": "gbdt"},
                "gbdt": {"max_depth": 3, "bins": 32},
                "audit": audit,
            }
        )
        self.pre = Preprocessor.from_statistics(
            merge_statistics([local_statistics(train, self.spec.data)]), self.spec.data
        )
        setup = boost_setup(self.spec, self.pre.to_dict())
        halves = [self.pre.transform(part) for part in (train.iloc[::2], train.iloc[1::2])]
        config = BoostConfig(
            objective=setup.objective, num_class=setup.num_class, rounds=rounds, bins=32, tree=setup.tree
        )
        ensemble, trace = train_in_memory(halves, config, grid=setup.grid())
        per_round = ensemble.outputs
        self.models = [
            BoostedModel(
                trace.edges,
                Ensemble(
                    objective=ensemble.objective,
                    base_score=ensemble.base_score,
                    num_feature=ensemble.num_feature,
                    num_class=ensemble.num_class,
                    trees=ensemble.trees[: k * per_round],
                    tree_class=ensemble.tree_class[: k * per_round],
                ),
            )
            for k in range(rounds + 1)
        ]
        self.arch = tabular_app.describe(JobContext(self.spec, self.pre.to_dict()))

    def header(self, version: int) -> dict[str, Any]:
        return {"kind": "model", "version": version, "arch": self.arch, "preprocess": self.pre.to_dict()}

    def vector(self, version: int) -> np.ndarray:
        # As the worker's API hands a version over: its bytes, uint8.
        return to_vector(self.models[version])

    def audit(self, version: int, **kw: Any):
        return audit_tree_version(self.spec, self.header(version), self.vector(version), self.reference, **kw)

    def rows(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        x = self.pre.transform_features(self.reference)
        rows, background = draw_rows(len(x), self.spec.audit, self.spec.seed, version)
        return x[rows], x[background]


def _churn(rounds: int = 4, audit: dict[str, Any] | None = None, every_feature: bool = False) -> Job:
    df, schema, _ = load_dataset("mlc_churn")
    if not every_feature:  # 9 input columns: few enough for the exact explainer
        schema = {**schema, "features": [f for f in schema["features"] if f["name"] in CHURN_FEATURES]}
    audit = audit or {"rows": 200, "background": 40, "validate_rows": 0}
    return Job(df.sample(n=1500, random_state=1), schema, rounds, audit)


@pytest.fixture(scope="module")
def churn() -> Job:
    return _churn()


@pytest.fixture(scope="module")
def iris() -> Job:
    """Iris with a third of the virginica rows: unequal classes, so unequal per-class base scores."""
    from sklearn.datasets import load_iris

    bunch = load_iris(as_frame=True)
    frame = bunch.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["species"] = [str(bunch.target_names[t]) for t in frame.pop("target")]
    frame = pd.concat([frame[frame.species != "virginica"], frame[frame.species == "virginica"].iloc[:17]])
    features = [{"name": c, "type": "numeric"} for c in frame.columns if c != "species"]
    schema = {"features": features, "target": "species", "task": "multiclass"}
    return Job(frame, schema, 3, {"rows": 40, "background": 20, "validate_rows": 5})


@pytest.fixture(scope="module")
def diabetes() -> Job:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame.drop(columns=["s4", "s6"])
    frame["sex"] = frame["sex"].astype(int).astype(str)  # 1 or 2: a category, one-hot encoded
    features = [
        {"name": c, "type": "categorical" if c == "sex" else "numeric"} for c in frame if c != "target"
    ]
    schema = {"features": features, "target": "target", "task": "regression"}
    return Job(frame, schema, 3, {"rows": 60, "background": 20, "validate_rows": 0})


def _xgboost_margins(model: BoostedModel, x: np.ndarray) -> np.ndarray:
    booster = booster_of(model.ensemble)
    return np.asarray(booster.predict(xgboost.DMatrix(x), output_margin=True), dtype=np.float64).reshape(
        len(x), -1
    )


def _exact_shapley(
    model: BoostedModel, x: np.ndarray, background: np.ndarray, groups: np.ndarray
) -> np.ndarray:
    """Interventional Shapley values over the background by enumeration (shap's Exact explainer) on
    aicfl's own predictor, summed into features: ``(rows, features, outputs)``."""
    import shap

    from shared.gbdt import predict_margin

    def f(batch: np.ndarray) -> np.ndarray:
        return predict_margin(model.ensemble, batch).astype(np.float64)

    masker = shap.maskers.Independent(background, max_samples=len(background))
    values = np.asarray(shap.explainers.Exact(f, masker)(x, silent=True).values, dtype=np.float64)
    return np.einsum("ncj,cf->nfj", values.reshape(len(x), x.shape[1], -1), groups)


# --------------------------------------------------------------------------- the values


@pytest.mark.parametrize("name", ["churn", "iris", "diabetes"])
def test_tree_attributions_add_up_to_the_margin_and_are_the_exact_interventional_shapley_values(
    name: str, request: pytest.FixtureRequest
) -> None:
    job: Job = request.getfixturevalue(name)
    version = len(job.models) - 1
    result = job.audit(version, plots=False)

    report = result.report
    xr, xb = job.rows(version)
    model = job.models[version]
    outputs = model.ensemble.outputs
    assert report["explainer"] == "tree"
    assert result.values.shape == (len(xr), len(job.spec.data.features), outputs)
    # Additivity, against XGBoost's own predictor of the exported model.
    margin = _xgboost_margins(model, xr)
    fitted = np.asarray(report["expected_value"])[None, :] + result.values.sum(axis=1)
    np.testing.assert_allclose(fitted, margin, rtol=0, atol=1e-5)
    assert report["additivity_max_error"] < 1e-5
    np.testing.assert_allclose(report["expected_value"], _xgboost_margins(model, xb).mean(axis=0), atol=1e-5)
    # The values themselves: Shapley values of aicfl's predictor by enumeration, over the same background.
    _, groups = feature_groups(job.pre)
    k = 8
    np.testing.assert_allclose(
        result.values[:k], _exact_shapley(model, xr[:k], xb, groups), rtol=0, atol=1e-5
    )
    assert np.abs(result.values).max() > 0.01  # the trees do split: not all values are trivially 0


def test_multiclass_report_is_per_class_and_validated_exactly(iris: Job) -> None:
    assert len(set(iris.models[-1].ensemble.base_score)) == 3  # shap alone would read only the first
    result = iris.audit(3)

    report = result.report
    assert report["output"] == "logit of each class of species (before softmax)"
    assert set(report["importance_by_class"]) == {"setosa", "versicolor", "virginica"}
    for feature, total in report["importance"].items():
        assert total == pytest.approx(sum(c[feature] for c in report["importance_by_class"].values()))
    validation = report["validation"]
    assert validation["explainer"] == "exact" and validation["rows"] == 5  # 4 input columns
    assert validation["correlation"] > 0.9999 and validation["max_abs_diff"] < 1e-5
    assert set(result.plots) == {"importance.png", "beeswarm.png"}
    assert all(png.startswith(PNG_MAGIC) for png in result.plots.values())


def test_a_stump_is_explained_against_the_background_not_its_covers() -> None:
    # One split on column 0 at 0.5: leaf -1 left, +1 right. Its covers say 90 % of the training rows
    # went left; half of the background does. Interventional SHAP: f(x) - mean over the background
    # (path-dependent TreeSHAP would subtract the cover-weighted mean, -0.8).
    stump = Tree(
        left=np.array([1, -1, -1], dtype=np.int32),
        right=np.array([2, -1, -1], dtype=np.int32),
        parent=np.array([-1, 0, 0], dtype=np.int32),
        feature=np.array([0, 0, 0], dtype=np.int32),
        split_bin=np.array([0, -1, -1], dtype=np.int32),
        threshold=np.array([0.5, -1.0, 1.0], dtype=np.float32),
        default_left=np.array([True, False, False]),
        base_weight=np.array([0.0, -1.0, 1.0], dtype=np.float32),
        loss_change=np.array([1.0, 0.0, 0.0], dtype=np.float32),
        sum_hessian=np.array([100.0, 90.0, 10.0], dtype=np.float32),
    )
    ensemble = Ensemble("reg:squarederror", (0.25,), 2, 0, (stump,), (0,))
    background = np.array([[0.0, 5.0], [1.0, -5.0], [0.2, 0.0], [0.9, 1.0]], dtype=np.float32)
    x = np.array([[0.0, 3.0], [1.0, 3.0], [0.5, -1.0]], dtype=np.float32)

    found = explain_trees(ensemble, booster_of(ensemble), x, background)

    leaf = np.where(x[:, 0] < 0.5, -1.0, 1.0)  # x < threshold goes left, as XGBoost splits
    np.testing.assert_allclose(found.values[:, 0, 0], leaf, atol=1e-6)  # background mean of the leaves: 0
    np.testing.assert_allclose(found.values[:, 1, 0], 0.0, atol=1e-9)  # never split on
    assert found.expected[0] == pytest.approx(0.25)
    np.testing.assert_allclose(found.outputs[:, 0], 0.25 + leaf, atol=1e-6)


# --------------------------------------------------------------------------- report, drift, verdict


def test_report_has_the_tabular_fields_drift_and_baseline(churn: Job) -> None:
    first = churn.audit(3, plots=False).report
    baseline = {
        "leader": "GBM_1",
        "contributions": {
            "model": "GBM_1",
            "features": {name: 1.0 + i for i, name in enumerate(sorted(CHURN_FEATURES))},
        },
    }

    result = churn.audit(4, previous=first, baseline=baseline)

    report = result.report
    assert set(report) == REPORT_FIELDS
    assert report["output"] == "logit of P(churn = yes)"
    assert (report["version"], report["previous_version"], report["rows"], report["background"]) == (
        4,
        3,
        200,
        40,
    )
    assert set(report["importance"]) == CHURN_FEATURES
    assert report["importance_by_class"] is None
    assert sum(report["shares"].values()) == pytest.approx(1.0)
    assert report["top_features"][0] == max(report["importance"], key=report["importance"].get)
    drift = report["drift"]
    assert drift["rank_correlation"] == pytest.approx(
        spearman([report["importance"][n] for n in first["importance"]], list(first["importance"].values()))
    )
    assert set(drift["thresholds"]) == {"min_rank_correlation", "max_share_shift"}
    assert report["baseline"]["model"] == "GBM_1" and report["baseline"]["features"] == len(CHURN_FEATURES)
    assert report["baseline"]["rank_correlation"] is not None
    assert report["verdict"] == result.verdict == ("drift" if report["reasons"] else "ok")
    assert report["validation"] is None  # validate_rows = 0
    assert set(result.plots) == {"importance.png", "beeswarm.png"}
    assert all(png.startswith(PNG_MAGIC) for png in result.plots.values())


def test_reversed_importances_are_drift(churn: Job) -> None:
    now = churn.audit(4, plots=False).report["importance"]
    ranked = sorted(now, key=now.get)
    reversed_previous = {
        "version": 3,
        "importance": {name: float(i) for i, name in enumerate(reversed(ranked))},
    }

    result = churn.audit(4, previous=reversed_previous, plots=False)

    assert result.verdict == "drift"
    assert result.report["drift"]["rank_correlation"] < 0
    assert any("rank correlation" in reason for reason in result.report["reasons"])


def test_a_version_without_trees_attributes_nothing_and_is_not_compared_with(churn: Job) -> None:
    zero = churn.audit(0)

    report = zero.report
    base = churn.models[0].ensemble.base_score[0]  # the positive rate: the margin is its logit
    assert report["explainer"] == "tree" and not zero.values.any()
    assert report["additivity_max_error"] < 1e-6 and set(report["importance"].values()) == {0.0}
    assert report["expected_value"] == pytest.approx([np.log(base / (1 - base))], abs=1e-6)
    assert report["verdict"] == "ok" and set(zero.plots) == {"importance.png", "beeswarm.png"}

    after = churn.audit(1, previous=report, previous_version=0, plots=False).report
    assert after["previous_version"] is None and after["drift"]["rank_correlation"] is None
    assert after["drift"]["shifted"] == [] and after["verdict"] == "ok"


def test_importances_without_a_report_are_those_the_audit_reports(churn: Job) -> None:
    audited = churn.audit(2, plots=False).report["importance"]
    computed = tree_version_importance(
        churn.spec, churn.header(2), churn.vector(2), churn.reference, version=2
    )
    assert computed == pytest.approx(audited)


def test_validation_of_many_columns_uses_permutations_and_agrees() -> None:
    job = _churn(rounds=3, audit={"rows": 100, "background": 30, "validate_rows": 4}, every_feature=True)

    validation = job.audit(3, plots=False).report["validation"]

    assert validation["explainer"] == "permutation" and validation["rows"] == 4  # 22 input columns
    assert validation["correlation"] > 0.95


def test_what_is_not_a_boosted_version_fails_in_one_clear_line(churn: Job) -> None:
    header = churn.header(1)
    as_floats = load_boosted(header, churn.vector(1).astype(np.float32))  # the same bytes, read as float32
    assert (
        len(as_floats.ensemble.trees) == 1
        and as_floats.ensemble.base_score == churn.models[1].ensemble.base_score
    )
    with pytest.raises(AuditError, match="is not a boosted ensemble"):
        load_boosted({**header, "arch": {"zoo": "mlp"}}, churn.vector(1))
    with pytest.raises(AuditError, match="not byte values"):
        load_boosted(header, np.full(4, 300.0, dtype=np.float32))
    with pytest.raises(AuditError, match="cannot load the boosted model: not a boosted model"):
        load_boosted(header, np.frombuffer(b'{"format": "x"}', dtype=np.uint8))
    other = _churn(rounds=1, every_feature=True)  # 22 input columns against the job's 9
    with pytest.raises(AuditError, match="the preprocessing makes 9 input columns, the ensemble splits 22"):
        audit_tree_version(churn.spec, header, other.vector(1), churn.reference)


def test_a_worker_without_xgboost_or_with_an_old_shap_says_what_to_install(
    churn: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import shap

    monkeypatch.setattr(shap, "__version__", "0.46.0")
    with pytest.raises(AuditError, match=r"needs shap >= 0.50 \(this worker has 0.46.0\)"):
        churn.audit(1, plots=False)
    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost: ImportError
    with pytest.raises(AuditError, match=r"install xgboost \(pip install 'xgboost-cpu>=3.0'\)"):
        churn.audit(1, plots=False)


# --------------------------------------------------------------------------- the worker


class TreeCoordinator:
    """The ClusterApi methods the audit worker calls, for one gbdt job's queued versions."""

    def __init__(self, job: Job, versions: list[int]):
        self.job_ = job
        self.queue = [
            {"id": 100 + v, "job_id": 1, "version": v, "attempt": 1, "previous_version": v - 1 if v else None}
            for v in versions
        ]
        self.audits: dict[int, dict[str, Any]] = {}
        self.completed: list[dict[str, Any]] = []
        self.failed: list[tuple[int, str]] = []
        self.models: list[int] = []

    def claim_audit(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        return self.queue.pop(0) if self.queue else None

    def job(self, job_id: int) -> dict[str, Any]:
        spec = self.job_.spec.model_dump(mode="json")
        return {"id": job_id, "spec": spec, "preprocess": self.job_.pre.to_dict(), "status": "running"}

    def reference(self, job_id: int) -> bytes:
        return self.job_.reference.to_csv(index=False).encode()

    def model(self, job_id: int, version: int) -> tuple[dict[str, Any], np.ndarray]:
        self.models.append(version)
        return self.job_.header(version), self.job_.vector(version)

    def audit(self, job_id: int, version: int) -> dict[str, Any] | None:
        return self.audits.get(version)

    def baseline(self, job_id: int) -> dict[str, Any] | None:
        return None

    def complete_audit(self, audit_id: int, worker: str, **kw: Any) -> dict[str, Any]:
        self.completed.append({"id": audit_id, **kw})
        self.audits[audit_id - 100] = {"status": "done", "verdict": kw["verdict"], "report": kw["report"]}
        return {"id": audit_id, "status": "done"}

    def fail_audit(self, audit_id: int, worker: str, error: str) -> dict[str, Any]:
        self.failed.append((audit_id, error))
        return {"id": audit_id, "status": "queued"}


def test_the_worker_audits_a_gbdt_jobs_versions_as_trees(churn: Job) -> None:
    coordinator = TreeCoordinator(churn, [0, 1, 2])

    done = run_worker(coordinator, "w", once=True, poll=0.01, log=lambda _: None)  # type: ignore[arg-type]

    assert done == 3 and coordinator.failed == []
    reports = [c["report"] for c in coordinator.completed]
    assert [r["explainer"] for r in reports] == ["tree"] * 3
    assert reports[1]["previous_version"] is None  # version 0 has no trees: nothing to compare with
    assert reports[2]["previous_version"] == 1 and reports[2]["drift"]["rank_correlation"] is not None
    assert reports[2]["importance"] == pytest.approx(churn.audit(2, plots=False).report["importance"])


def test_the_worker_computes_a_missing_previous_gbdt_report_from_its_trees(churn: Job) -> None:
    coordinator = TreeCoordinator(churn, [3])  # version 2 was never audited

    assert run_worker(coordinator, "w", once=True, poll=0.01, log=lambda _: None) == 1  # type: ignore[arg-type]

    report = coordinator.completed[0]["report"]
    before = tree_version_importance(churn.spec, churn.header(2), churn.vector(2), churn.reference, version=2)
    assert coordinator.models == [3, 2] and report["previous_version"] == 2
    assert report["drift"]["rank_correlation"] == pytest.approx(
        spearman([report["importance"][n] for n in before], list(before.values()))
    )


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_gbdt_jobs_versions_are_audited_end_to_end_over_http(coord: Any, tmp_path: Path) -> None:
    """A real coordinator and two agent processes grow a gbdt job; the audit worker (in this process,
    over HTTP on loopback) takes the versions' audits the coordinator queued and returns tree reports.
    (The validation is left to the tests above: it would add shap's numba compilation here.)"""
    from shared.tabular import read_table_bytes
    from tests.integration.harness import churn_slices, small_spec
    from training_cluster.api import ClusterApi

    paths, ref, schema = churn_slices(tmp_path / "data", 2)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    spec = small_spec(schema, rounds=2, target=2, minimum=2, secure=False)
    spec.update(model={"zoo": "gbdt"}, gbdt={"max_depth": 2, "bins": 16})
    spec["audit"] = {"rows": 200, "background": 30, "validate_rows": 0}
    api = coord.api()
    job_id = int(api.json("POST", "/v1/jobs", json=spec)["id"])
    api.request("PUT", f"/v1/jobs/{job_id}/reference", content=ref.read_bytes())
    job = coord.wait_job(job_id)

    cluster = ClusterApi.connect(coord.url, coord.token)
    lines: list[str] = []
    try:
        done = run_worker(cluster, "trees", once=True, poll=0.1, log=lines.append)
    finally:
        cluster.close()

    assert done == 3, lines
    audits = api.json("GET", f"/v1/jobs/{job_id}/audits")
    assert [(a["version"], a["status"], a["attempts"]) for a in audits] == [(v, "done", 1) for v in (0, 1, 2)]
    assert all(a["plots"] == ["beeswarm.png", "importance.png"] for a in audits)
    reports = [api.json("GET", f"/v1/jobs/{job_id}/audits/{v}")["report"] for v in (0, 1, 2)]
    assert all(set(r) == REPORT_FIELDS and r["explainer"] == "tree" for r in reports)
    assert set(reports[0]["importance"].values()) == {0.0}  # version 0: the base score alone
    assert reports[1]["previous_version"] is None and reports[2]["previous_version"] == 1
    last = reports[2]
    assert set(last["importance"]) == {f["name"] for f in schema["features"]}
    assert last["drift"]["rank_correlation"] is not None and last["verdict"] in ("ok", "drift")
    assert last["additivity_max_error"] < 1e-5
    # The expected value is the mean margin, by XGBoost, of the model users export, over the rows
    # the audit drew from the reference data.
    exported = api.request("GET", f"/v1/jobs/{job_id}/models/2/export", params={"format": "xgboost"}).content
    booster = xgboost.Booster()
    booster.load_model(bytearray(exported))
    job_spec = JobSpec.model_validate(job["spec"])
    x = Preprocessor.from_dict(job["preprocess"]).transform_features(
        read_table_bytes(ref.read_bytes(), job_spec.tabular)
    )
    _, background = draw_rows(len(x), job_spec.audit, job_spec.seed, 2)
    margin = booster.predict(xgboost.DMatrix(x[background]), output_margin=True)
    assert last["expected_value"] == pytest.approx([float(np.mean(margin))], abs=1e-5)
