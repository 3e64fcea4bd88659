"""A Flower client as an app (shared/apps/flower.py), in process: Flower's PyTorch quickstart
(tests/fixtures/flower_quickstart) and small clients that record or misbehave."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from client_agent.worker import Declined, Worker
from coordinator.apps import describe, initial_vector
from coordinator.errors import Invalid
from shared.apps import AppError, DeviceContext, JobContext, TrainConfig, load_app
from shared.apps.flower import FlowerApp, FlowerAppError, FlowerModel, as_app
from shared.jobspec import JobSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QUICKSTART = "flower_quickstart.client_app:app"
Config = dict[str, bool | float | int | str]
RUN_CONFIG: Config = {"local-epochs": 1, "learning-rate": 0.05, "batch-size": 16}
HERE = __name__  # this module, as pytest imported it

# A model whose arrays are not all float32, as a state_dict with a batch norm's step count has.
MIXED: list[np.ndarray] = [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array([0.5, -1.25], dtype=np.float64),
    np.array(7, dtype=np.int64),
    np.array([True, False]),
]
TWO = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]


@pytest.fixture(autouse=True)
def quickstart_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))


def job(app: str = QUICKSTART, **options: Any) -> JobContext:
    options.setdefault("initial", "flower_quickstart.task:Net")
    options.setdefault("run_config", RUN_CONFIG)
    spec = {"name": "flower", "rounds": 3, "seed": 4, "model": {"app": app, "options": options}}
    return JobContext(JobSpec.model_validate(spec))


def device(ctx: JobContext, partition: int = 0, partitions: int = 3) -> DeviceContext:
    node = {"partition-id": partition, "num-partitions": partitions}
    return DeviceContext(ctx, "/srv/data", f"device-{partition}", node_config=node)


def train_config(round_: int = 1) -> TrainConfig:
    return TrainConfig(round=round_, epochs=1, batch_size=8, learning_rate=0.1, optimizer="sgd", seed=3)


class Recorder(NumPyClient):
    """Records what Flower hands its client; ``fit`` returns the arrays ``answer`` makes."""

    seen: list[tuple[str, Context, dict[str, Any], list[np.ndarray]]] = []
    answer: Any = None
    holdout = 9

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        Recorder.seen.append(("fit", self.context, dict(config), parameters))
        out = Recorder.answer(parameters) if Recorder.answer else [p + 1 for p in parameters]
        return out, 42, {"train_loss": 0.25, "note": "text is not a metric"}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        Recorder.seen.append(("evaluate", self.context, dict(config), parameters))
        return 0.5, Recorder.holdout, {"accuracy": 0.75}


def recording_client_fn(context: Context) -> Any:
    return Recorder(context).to_client()


@pytest.fixture
def recorder() -> Any:
    Recorder.seen, Recorder.answer, Recorder.holdout = [], None, 9
    yield Recorder
    Recorder.seen, Recorder.answer, Recorder.holdout = [], None, 9


def recording_app() -> FlowerApp:
    app = as_app(ClientApp(client_fn=recording_client_fn))
    assert isinstance(app, FlowerApp)
    return app


def test_the_quickstart_client_app_loads_as_an_app_counting_its_own_loaders() -> None:
    app = load_app(QUICKSTART, "0")  # not installed as a distribution: version "0"
    assert isinstance(app, FlowerApp) and app.client_fn.__name__ == "client_fn"
    ctx = job()
    counts = [
        (d.train_examples, d.holdout_examples) for d in (app.load_data(device(ctx, p)) for p in range(3))
    ]
    # 1797 digits in three contiguous shards (599, 599, 599), each split 80/20 as the quickstart does.
    assert counts == [(479, 120)] * 3
    with pytest.raises(AppError, match="is version 0 here; the job needs 1.0.0"):
        load_app(QUICKSTART, "1.0.0")


def test_parameters_round_trip_through_one_float32_vector() -> None:
    import torch
    from flower_quickstart.task import Net, get_weights

    app, ctx = load_app(QUICKSTART), job()
    torch.manual_seed(0)
    model = app.build_model(ctx)
    vector = app.get_parameters(model)
    expected = get_weights(Net())  # the order and sizes the quickstart's server sends
    assert vector.dtype == np.float32 and vector.shape == (sum(a.size for a in expected),)
    other = app.build_model(ctx)  # another random start
    app.set_parameters(other, vector)
    assert all(np.array_equal(a, b) for a, b in zip(model.arrays, other.arrays, strict=True))
    assert [a.shape for a in other.arrays] == [a.shape for a in expected]
    with pytest.raises(FlowerAppError, match="have 5 values; the Flower model's 10 arrays hold 19754"):
        app.set_parameters(other, np.zeros(5, np.float32))


def test_arrays_of_other_dtypes_travel_as_float32_and_come_back_as_they_were() -> None:
    app = recording_app()
    model = app.build_model(job(initial=f"{HERE}:MIXED"))
    vector = app.get_parameters(model)
    assert vector.dtype == np.float32 and vector.size == 6 + 2 + 1 + 2
    averaged = vector - np.float32(0.2)  # an aggregate is no longer a whole number
    app.set_parameters(model, averaged)
    assert [a.dtype for a in model.arrays] == [a.dtype for a in MIXED]
    assert model.arrays[2] == 7 and model.arrays[3].tolist() == [True, False]  # rounded, not cut
    assert np.allclose(model.arrays[1], [0.3, -1.45])


def test_fit_gets_server_round_and_fit_config_and_the_context_flower_would_give(recorder: Any) -> None:
    app = recording_app()
    ctx = job(
        initial=f"{HERE}:TWO",
        run_config={"local-epochs": 2},
        fit_config={"proximal-mu": 0.1, "phase": "warmup"},
        evaluate_config={"batches": 3},
    )
    data = app.load_data(device(ctx, partition=1))
    model = app.build_model(ctx)
    metrics = app.train(model, data, train_config(round_=7))

    kind, context, config, parameters = recorder.seen[-1]
    assert kind == "fit" and config == {"server_round": 7, "proximal-mu": 0.1, "phase": "warmup"}
    assert all(np.array_equal(p, a) for p, a in zip(parameters, TWO, strict=True))
    assert context.node_config == {"partition-id": 1, "num-partitions": 3, "data-path": "/srv/data"}
    assert context.run_config == {"local-epochs": 2} and context.run_id == 0 and context.node_id > 0
    # The fit's count is the update's weight; its loss is its train_loss; strings are not metrics.
    assert metrics == {"train_loss": 0.25, "loss": 0.25, "examples": 42}
    assert all(np.array_equal(a, b + 1) for a, b in zip(model.arrays, TWO, strict=True))

    recorder.holdout = 11  # say its holdout has grown since the data was loaded
    # The client's own count weighs its metrics: the worker reads it from 'examples'.
    assert app.evaluate(model, data) == {"accuracy": 0.75, "loss": 0.5, "examples": 11}
    assert recorder.seen[-1][0] == "evaluate" and recorder.seen[-1][2] == {"batches": 3}


def test_a_client_without_loaders_is_asked_for_its_holdout_count(recorder: Any) -> None:
    app = recording_app()
    data = app.load_data(device(job(initial=f"{HERE}:TWO")))
    assert (data.train_examples, data.holdout_examples) == (1, 9)
    assert [k for k, *_ in recorder.seen] == ["evaluate"]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            lambda ps: [ps[0], np.zeros(3, np.float32)],
            "array 1 as float32 of shape (3,); the model's is float32 of shape (2,)",
        ),
        (
            lambda ps: [ps[0].astype(np.float64), ps[1]],
            "array 0 as float64 of shape (2, 2); the model's is float32 of shape (2, 2)",
        ),
        (lambda ps: ps[:1], "fit returned 1 arrays; the model has 2"),
    ],
)
def test_a_fit_that_returns_other_arrays_is_refused_with_what_differs(
    recorder: Any, answer: Any, message: str
) -> None:
    recorder.answer = answer
    app = recording_app()
    ctx = job(initial=f"{HERE}:TWO")
    data, model = app.load_data(device(ctx)), app.build_model(ctx)
    with pytest.raises(FlowerAppError) as refused:
        app.train(model, data, train_config())
    assert message in str(refused.value)
    # The agent turns it into the reason this device sits the round out.
    with pytest.raises(Declined, match="app train failed: FlowerAppError: the Flower client's fit returned"):
        Worker._call("train", app.train, model, data, train_config())


def test_a_job_without_initial_is_refused_at_submission_saying_what_to_write() -> None:
    app = load_app(QUICKSTART)
    ctx = job(initial=None)
    for build in (initial_vector, describe):
        with pytest.raises(Invalid, match=r"needs \[model.options\] initial = 'package.module:Net'"):
            build(app, ctx)
    with pytest.raises(Invalid, match="initial 'flower_quickstart.task:Nope' does not import here"):
        initial_vector(app, job(initial="flower_quickstart.task:Nope"))
    with pytest.raises(
        Invalid, match=r"run_config.layers = \[1, 2\]: Flower allows only bool, int, float, str"
    ):
        describe(app, job(run_config={"layers": [1, 2]}))


def test_the_quickstart_trains_through_the_adapter_exactly_as_its_own_fit_does() -> None:
    import torch
    from flower_quickstart.client_app import client_fn
    from flwr.common import RecordDict

    app, ctx = load_app(QUICKSTART), job()
    data = app.load_data(device(ctx))
    torch.manual_seed(0)
    model = app.build_model(ctx)
    start = [a.copy() for a in model.arrays]
    torch.manual_seed(1)
    metrics = app.train(model, data, train_config(round_=2))

    # The same client, built and fitted by hand as a Flower SuperNode would, from the same random state.
    node: Config = {"partition-id": 0, "num-partitions": 3, "data-path": "/srv/data"}
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    torch.set_num_threads(1)  # as the agent holds a client to its --threads
    try:
        own = client_fn(Context(0, 1, node, RecordDict(), RUN_CONFIG)).numpy_client
        arrays, examples, fit_metrics = own.fit(start, {"server_round": 2})
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(a, b) for a, b in zip(model.arrays, arrays, strict=True))
    assert metrics["examples"] == examples == 479
    # The quickstart's fit reports val_loss and val_accuracy, no training loss: the round's loss is
    # its evaluate of the trained arrays, which is the same figure.
    assert metrics["val_accuracy"] == fit_metrics["val_accuracy"]
    assert metrics["loss"] == pytest.approx(fit_metrics["val_loss"])
    assert app.evaluate(model, data)["accuracy"] == pytest.approx(fit_metrics["val_accuracy"])


def test_objects_that_are_not_flower_clients_or_cannot_run_here_are_refused() -> None:
    with pytest.raises(AppError, match="is a function, not an aicfl App"):
        load_app("tests.fixtures.toy_app:make_data")
    assert as_app(Recorder) is None and as_app(len) is None and as_app(FlowerModel) is None

    def clip(message: Any, context: Any, call_next: Any) -> Any:
        return call_next(message, context)

    with pytest.raises(FlowerAppError, match=r"has mods \(clip\)"):
        as_app(ClientApp(client_fn=recording_client_fn, mods=[clip]))
    with pytest.raises(FlowerAppError, match="Message API"):
        as_app(ClientApp())


def test_a_client_fn_that_returns_no_client_declines_with_the_reason() -> None:
    app = as_app(broken_client_fn)
    assert isinstance(app, FlowerApp)
    with pytest.raises(FlowerAppError, match="client_fn returned dict, not a flwr Client or NumPyClient"):
        app.load_data(device(job(initial=f"{HERE}:TWO")))


def broken_client_fn(context: Context) -> Any:
    return {"not": "a client"}


def test_an_old_style_client_fn_of_a_cid_runs_and_is_named_by_its_own_module(recorder: Any) -> None:
    # Flower still takes a client_fn(cid) (and logs that it is deprecated).
    app = as_app(ClientApp(client_fn=cid_client_fn))  # type: ignore[arg-type]
    assert isinstance(app, FlowerApp) and app.source == f"{HERE}:cid_client_fn"
    app.load_data(device(job(initial=f"{HERE}:TWO"), partition=2))
    assert recorder.seen[-1][1] == "2"  # Flower passes the partition id as the cid


def cid_client_fn(cid: str) -> Any:
    return Recorder(cid).to_client()  # type: ignore[arg-type]
