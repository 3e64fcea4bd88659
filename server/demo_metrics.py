"""What a demo's final model is judged by: its metrics on the held-out rows, and the ceiling,
the same model trained centrally on every device's rows pooled, measured on the same rows."""

from __future__ import annotations

from typing import Any

from server.demo_data import digits_app
from server.demo_errors import DemoError
from shared.apps import JobContext, LocalData, TrainConfig, load_app
from shared.jobspec import JobSpec
from shared.tabular import Preprocessor, local_statistics
from shared.training import evaluate, train_local
from shared.zoo import architecture, build_model


def headline(spec: JobSpec) -> str:
    """The metric a demo's final model is judged on next to its ceiling: ROC AUC for a tabular
    classifier, RMSE for a regression, accuracy for the digits app."""
    if spec.data is None:
        return "accuracy"
    return "rmse" if spec.data.task == "regression" else "auc"


def ceiling_metrics(spec: JobSpec, train_rows: Any, test_rows: Any, epochs: int) -> dict[str, float]:
    """The same architecture trained centrally on the pooled training rows (a gbdt job: XGBoost's own
    ``hist`` on them, :func:`xgboost_ceiling`)."""
    schema = spec.tabular
    pre = Preprocessor.from_statistics(local_statistics(train_rows, schema), schema)
    if spec.model.zoo == "gbdt":
        return xgboost_ceiling(spec, pre, train_rows, test_rows)
    model = build_model(architecture(spec.model, pre.input_dim, pre.output_dim), seed=spec.seed)
    x, y = pre.transform(train_rows)
    train_local(
        model,
        x,
        y,
        task=schema.task,
        epochs=epochs,
        batch_size=spec.training.batch_size,
        learning_rate=spec.training.learning_rate,
        optimizer=spec.training.optimizer,
        seed=spec.seed,
        threads=2,
    )
    xt, yt = pre.transform(test_rows)
    return evaluate(model, xt, yt, task=schema.task, target_mean=pre.target_mean, target_std=pre.target_std)


def xgboost_ceiling(spec: JobSpec, pre: Preprocessor, train_rows: Any, test_rows: Any) -> dict[str, float]:
    """XGBoost's ``hist`` trees, trained on the pooled rows with the job's ``[gbdt]`` settings and rounds,
    on the same features (the preprocessing of the pooled rows), measured on the test rows."""
    try:
        import xgboost
    except ImportError:
        raise DemoError(
            "the ceiling of a gbdt job is XGBoost on the pooled rows: pip install xgboost"
        ) from None
    from shared.gbdt.rounds import xgboost_params
    from shared.training import metrics_from_predictions

    task = spec.tabular.task
    params = xgboost_params(spec, len(pre.classes) if task == "multiclass" else 0, nthread=2)
    x, y = pre.transform(train_rows)
    booster = xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=spec.rounds)
    xt, yt = pre.transform(test_rows)
    predictions = booster.predict(xgboost.DMatrix(xt))
    if task == "regression":
        predictions = pre.inverse_target(predictions)
    return metrics_from_predictions(
        task, yt, predictions, target_mean=pre.target_mean, target_std=pre.target_std
    )


def digits_ceiling(spec: JobSpec, data: Any, reference: bytes, epochs: int) -> dict[str, float]:
    """The same CNN, from the same seeded start, trained centrally on every device's images pooled
    (``data``: the demo's ``digits_cnn.data.Split``), measured on the same test images."""
    import torch
    from digits_cnn.cnn import Digits
    from digits_cnn.data import pixel_scale

    app = digits_app()
    job = JobContext(spec, {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # as the coordinator builds version 0
        model = app.build_model(job)
    images, labels = data.pooled
    pooled = Digits(images, labels, pixel_scale(images))
    config = TrainConfig(
        round=0,
        epochs=epochs,
        batch_size=spec.training.batch_size,
        learning_rate=spec.training.learning_rate,
        optimizer=spec.training.optimizer,
        seed=spec.seed,
        threads=2,
    )
    app.train(model, LocalData(pooled, None, len(pooled), 0), config)
    metrics = app.evaluate_central(model, app.load_reference(reference, job), job)
    assert metrics is not None  # the digits app always evaluates centrally
    return {k: float(v) for k, v in metrics.items()}


def final_metrics(spec: JobSpec, header: dict[str, Any], vector: Any, reference: bytes) -> dict[str, float]:
    """A version's metrics on the test rows, computed as the coordinator's central evaluation
    computes them: by the job's app, on the reference bytes, under the version's signed setup."""
    app = load_app(spec.app_ref, spec.model.app_version)
    job = JobContext(spec, header.get("preprocess"))
    model = app.build_model(job)
    app.set_parameters(model, vector)
    metrics = app.evaluate_central(model, app.load_reference(reference, job), job)
    if metrics is None:
        raise DemoError(f"app {spec.app_ref} has no central evaluation to measure the final model with")
    return {k: float(v) for k, v in metrics.items()}
