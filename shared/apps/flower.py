"""Flower clients as apps: a user's ``ClientApp`` (or its ``client_fn``) runs under ``aicfl-agent`` unchanged.

A job names the Flower object as it names any app, ``[model] app = "pytorchexample.client_app:app"``,
and ``load_app`` wraps it in :class:`FlowerApp`. Each stage then does what a Flower SuperNode does
with the matching message: it builds the client with ``client_fn(context)`` and calls its ``fit``
or ``evaluate`` through Flower's own ``Client`` interface, which checks what they return as Flower
does. What travels is the client's list of ndarrays, flattened to the one float32 vector that
SecAgg+ masks like any other app's.

What a Flower project keeps elsewhere comes from the job spec's ``[model.options]``:

- ``initial = "pytorchexample.task:Net"``: version 0. Flower's ``server_app`` starts from
  ``get_weights(Net())``; here the callable's ``state_dict`` values, in order, are the initial
  ndarrays (or the callable returns the list of ndarrays itself). Required: a job without it is
  refused at submission.
- ``run_config``: the table the client reads as ``context.run_config`` (Flower reads it from the
  project's ``[tool.flwr.app.config]``).
- ``fit_config`` and ``evaluate_config``: the ``config`` dicts ``fit`` and ``evaluate`` receive,
  as a strategy's ``on_fit_config_fn`` and ``on_evaluate_config_fn`` would send them. ``fit``'s
  also carries ``server_round`` (the round's number); ``evaluate``'s does not, since an app's
  ``evaluate`` is not told the round.

The ``Context`` a device's client is built with: ``run_id`` 0, a ``node_id`` derived from the
device id, ``node_config`` as the owner enrolled it (``aicfl-agent enroll --node-config
"partition-id=0 num-partitions=4"``) with ``data-path`` (``--data``) added, and one ``state``
that lives as long as the agent keeps the job's data loaded. The client splits its own data:
aicfl's ``[training]`` settings (epochs, learning rate, ``holdout``) do not apply; the client
reads its own from ``run_config``.

flwr is imported only when a Flower object is adapted; it is there, since the user's app imports it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.apps.base import App, DeviceContext, JobContext, LocalData, Metrics, TrainConfig

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
# The kinds of value Flower allows in a config dict (``flwr.common.Scalar``) and in a run config.
_SCALAR = (bool, bytes, int, float, str)
_USER_VALUE = (bool, int, float, str)
# Names a Flower client gives the loaders of its training and evaluation splits.
_TRAIN_NAMES = ("train",)
_HOLDOUT_NAMES = ("val", "test", "eval")


class FlowerAppError(ValueError):
    """A Flower object that cannot run here, or a client that answered in a way Flower refuses."""


@dataclass
class FlowerModel:
    """The model as a Flower server holds it: the list of ndarrays the client's ``fit`` receives."""

    arrays: list[np.ndarray]

    @property
    def layout(self) -> list[tuple[tuple[int, ...], np.dtype[Any]]]:
        """Each array's shape and dtype, in order."""
        return [(a.shape, a.dtype) for a in self.arrays]


@dataclass
class FlowerNode:
    """What a device's Flower client is built from: the ``client_fn`` and the node's ``Context``.

    As on a Flower SuperNode, every call builds a fresh client with ``client_fn(context)``; what a
    client keeps between rounds, it keeps in ``context.state``.
    """

    client_fn: Callable[[Any], Any]
    context: Any  # flwr.app.Context
    options: Mapping[str, Any]
    threads: int = 1

    def client(self) -> Any:
        """A ``flwr.client.Client`` from ``client_fn`` (a ``NumPyClient`` is wrapped, as Flower does)."""
        from flwr.client import Client, NumPyClient

        client = self.client_fn(self.context)
        if isinstance(client, NumPyClient):
            client = client.to_client()
        if not isinstance(client, Client):
            raise FlowerAppError(
                f"client_fn returned {type(client).__name__}, not a flwr Client or NumPyClient"
            )
        return client

    def fit(self, client: Any, arrays: list[np.ndarray], config: dict[str, Any], threads: int) -> Any:
        """The client's ``FitRes`` for ``arrays`` and ``config``, as Flower's message handler gets it."""
        from flwr.common import Code, FitIns, ndarrays_to_parameters
        from flwr.compat.client.client import maybe_call_fit

        with _torch_threads(threads):
            res = maybe_call_fit(client, FitIns(ndarrays_to_parameters(arrays), config))
        if res.status.code != Code.OK:
            raise FlowerAppError(f"the Flower client's fit: {res.status.message}")
        return res

    def evaluate(self, client: Any, arrays: list[np.ndarray], config: dict[str, Any]) -> Any:
        """The client's ``EvaluateRes``, or ``None`` when it does not implement ``evaluate``."""
        from flwr.common import Code, EvaluateIns, ndarrays_to_parameters
        from flwr.compat.client.client import has_evaluate, maybe_call_evaluate

        if not has_evaluate(client):
            return None
        with _torch_threads(self.threads):
            res = maybe_call_evaluate(client, EvaluateIns(ndarrays_to_parameters(arrays), config))
        if res.status.code != Code.OK:
            raise FlowerAppError(f"the Flower client's evaluate: {res.status.message}")
        return res


class FlowerApp(App):
    """A Flower ``client_fn`` behind the app interface: ``fit`` trains, ``evaluate`` evaluates.

    ``version`` is the installed version of the distribution that holds the client's package
    (``importlib.metadata``), or ``"0"`` when it is not installed as one (a folder on
    ``PYTHONPATH``): the job spec's ``app_version`` then matches ``"0"``.
    """

    def __init__(self, client_fn: Callable[[Any], Any]) -> None:
        self.client_fn = client_fn
        user_fn = _users_function(client_fn)
        module = getattr(user_fn, "__module__", "") or ""
        self.source = f"{module}:{getattr(user_fn, '__qualname__', type(user_fn).__name__)}"
        self.name = f"flower:{self.source}"
        self.version = _distribution_version(module)

    # -- the model -----------------------------------------------------------

    def build_model(self, job: JobContext) -> FlowerModel:
        """The ndarrays of ``[model.options] initial`` (the coordinator seeds this call for version 0)."""
        return FlowerModel(initial_arrays(job.options))

    def get_parameters(self, model: FlowerModel) -> np.ndarray:
        """The ndarrays, each cast to float32, flattened in order into one vector."""
        if not model.arrays:
            return np.zeros(0, np.float32)
        return np.concatenate([np.asarray(a, np.float32).ravel() for a in model.arrays])

    def set_parameters(self, model: FlowerModel, vector: np.ndarray) -> None:
        """Split ``vector`` back into the model's arrays, each cast back to its dtype (integer arrays,
        such as a batch norm's step count, are rounded; float64 arrays travel as float32)."""
        layout = model.layout
        sizes = [math.prod(shape) for shape, _ in layout]
        vector = np.asarray(vector).ravel()
        if vector.size != sum(sizes):
            raise FlowerAppError(
                f"the parameters have {vector.size} values; the Flower model's {len(layout)} arrays"
                f" hold {sum(sizes)}"
            )
        arrays: list[np.ndarray] = []
        for part, (shape, dtype) in zip(np.split(vector, np.cumsum(sizes)[:-1]), layout, strict=True):
            arrays.append(_cast(part.reshape(shape), dtype))
        model.arrays = arrays

    def describe(self, job: JobContext) -> dict[str, Any]:
        """The client_fn, the options and the shape and dtype of each array: the signed header's model."""
        config = _configs(job.options)
        arrays = initial_arrays(job.options)
        return {
            "app": job.spec.app_ref,
            "app_version": self.version,
            "options": dict(job.options),
            "flower": {
                "client_fn": self.source,
                "run_config": config["run_config"],
                "arrays": [[list(a.shape), a.dtype.str] for a in arrays],
            },
        }

    # -- the device ----------------------------------------------------------

    def load_data(self, device: DeviceContext) -> LocalData:
        """The node the device's client is built from; its example counts read from the client.

        The counts are the sizes of the datasets behind the client's loaders, as the quickstart's
        ``len(self.trainloader.dataset)``: an attribute named ``train…`` counts training examples,
        ``val…``, ``test…`` or ``eval…`` holdout examples. A client that holds no such loader is
        asked once: its ``evaluate`` of the initial model reports the holdout count; the training
        count is then unknown until ``fit`` reports it (1 until then). ``fit`` and ``evaluate``
        report their own counts each round, and those weigh the update and the metrics.
        """
        from flwr.app import Context, RecordDict

        options = device.job.options
        configs = _configs(options)
        context = Context(
            run_id=0,
            node_id=_node_id(device.device_id),
            node_config={**device.node_config, "data-path": device.data_path},
            state=RecordDict(),
            run_config=configs["run_config"],
        )
        node = FlowerNode(self.client_fn, context, options, device.threads)
        client = node.client()
        train_n, holdout_n = _loader_counts(client)
        if holdout_n is None:
            res = node.evaluate(client, initial_arrays(options), configs["evaluate_config"])
            holdout_n = 0 if res is None else int(res.num_examples)
        if train_n is None:
            from flwr.compat.client.client import has_fit

            train_n = 1 if has_fit(client) else 0
        return LocalData(train=node, holdout=node, train_examples=train_n, holdout_examples=holdout_n)

    def train(self, model: FlowerModel, data: LocalData, config: TrainConfig) -> Metrics:
        """The client's ``fit`` from the model's arrays, with ``{"server_round": round, **fit_config}``.

        Returns the fit's numeric metrics, its example count as ``examples`` (the update's weight)
        and ``loss``: the fit's ``loss`` or ``train_loss`` metric when it reports one; otherwise (the
        quickstart reports ``val_loss``) the loss its ``evaluate`` gives the trained arrays.
        """
        from flwr.common import parameters_to_ndarrays

        node: FlowerNode = data.train
        fit_config = {"server_round": config.round, **_configs(node.options)["fit_config"]}
        client = node.client()
        res = node.fit(client, model.arrays, fit_config, config.threads)
        model.arrays = _checked_arrays(parameters_to_ndarrays(res.parameters), model.layout)
        metrics = _numbers(res.metrics)
        loss = metrics.get("loss", metrics.get("train_loss"))
        if loss is None:
            evaluated = node.evaluate(client, model.arrays, _configs(node.options)["evaluate_config"])
            if evaluated is None:
                raise FlowerAppError(
                    "the Flower client's fit reports no 'loss' or 'train_loss' metric and it has no"
                    " evaluate to measure one"
                )
            loss = float(evaluated.loss)
        data.train_examples = int(res.num_examples)
        return {**metrics, "loss": loss, "examples": int(res.num_examples)}

    def evaluate(self, model: FlowerModel, data: LocalData) -> Metrics:
        """The client's ``evaluate`` of the model's arrays with ``evaluate_config``: its loss and its
        numeric metrics. The example count it reports is the ``examples`` metric, the weight of the
        others (the worker reads it as the holdout count)."""
        node: FlowerNode = data.holdout
        res = node.evaluate(node.client(), model.arrays, _configs(node.options)["evaluate_config"])
        if res is None:
            raise FlowerAppError("the Flower client has no evaluate")
        return {**_numbers(res.metrics), "loss": float(res.loss), "examples": int(res.num_examples)}


def as_app(obj: object) -> App | None:
    """``obj`` as an app when it is a Flower ``ClientApp`` built from a ``client_fn``, or a
    ``client_fn`` itself (one parameter, ``context`` or annotated ``Context``); ``None`` when it is
    neither. Raises :class:`FlowerAppError` for a ``ClientApp`` that cannot run here."""
    if "flwr" in sys.modules:  # a ClientApp exists only once flwr is loaded: never load it here for nothing
        from flwr.clientapp import ClientApp

        if isinstance(obj, ClientApp):
            return FlowerApp(_stored_client_fn(obj))
    if _is_client_fn(obj):
        assert callable(obj)
        return FlowerApp(obj)
    return None


def initial_arrays(options: Mapping[str, Any]) -> list[np.ndarray]:
    """The ndarrays ``[model.options] initial`` names: a callable returning a torch module (its
    ``state_dict`` values, as the quickstart's ``get_weights(Net())``) or a list of ndarrays."""
    ref = options.get("initial")
    if not isinstance(ref, str) or not _REF.match(ref):
        raise FlowerAppError(
            "a Flower app needs [model.options] initial = 'package.module:Net': the callable whose"
            " weights the ServerApp starts from, as in its get_weights(Net())"
            + ("" if ref is None else f" (got {ref!r})")
        )
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise FlowerAppError(f"[model.options] initial {ref!r} does not import here: {err}") from None
    made = obj() if callable(obj) else obj
    if hasattr(made, "state_dict"):
        arrays = [np.array(v.detach().cpu().numpy()) for v in made.state_dict().values()]
    elif isinstance(made, list | tuple):
        arrays = [np.array(a) for a in made]
    else:
        raise FlowerAppError(
            f"[model.options] initial {ref!r} gave {type(made).__name__}; it must give a torch module"
            " or a list of ndarrays"
        )
    if not arrays or any(a.dtype.kind not in "biuf" for a in arrays):
        raise FlowerAppError(
            f"[model.options] initial {ref!r} gave no arrays, or arrays that are not numbers"
        )
    return arrays


# -- helpers -------------------------------------------------------------------


def _stored_client_fn(app: Any) -> Callable[[Any], Any]:
    """The ``client_fn`` a ``ClientApp(client_fn=...)`` keeps (flwr 1.42: in the closure of ``_call``)."""
    mods = list(getattr(app, "_mods", []) or [])
    if mods:
        names = ", ".join(getattr(m, "__name__", type(m).__name__) for m in mods)
        raise FlowerAppError(
            f"this ClientApp has mods ({names}); aicfl runs its client_fn without them (SecAgg+ is"
            " aicfl's own): build the ClientApp without mods"
        )
    call = getattr(app, "_call", None)
    if call is None:
        raise FlowerAppError(
            "this ClientApp registers functions (@app.train, @app.evaluate: Flower's Message API);"
            " aicfl runs a ClientApp built from a client_fn, ClientApp(client_fn=...)"
        )
    cells = dict(zip(call.__code__.co_freevars, call.__closure__ or (), strict=True))
    cell = cells.get("client_fn")
    fn = cell.cell_contents if cell is not None else None
    if not callable(fn):
        import flwr

        raise FlowerAppError(f"cannot find this ClientApp's client_fn (flwr {flwr.__version__})")
    return fn  # type: ignore[no-any-return]


def _users_function(client_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The user's function behind ``client_fn``: a ClientApp wraps an old ``client_fn(cid)`` in
    one of flwr's own, which names neither the user's module nor its version."""
    if not getattr(client_fn, "__module__", "").startswith("flwr."):
        return client_fn
    cells = dict(zip(client_fn.__code__.co_freevars, client_fn.__closure__ or (), strict=True))
    inner = cells["client_fn"].cell_contents if "client_fn" in cells else None
    return inner if callable(inner) else client_fn


def _is_client_fn(obj: object) -> bool:
    if not inspect.isfunction(obj):
        return False
    params = list(inspect.signature(obj).parameters.values())
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return False
    annotation = params[0].annotation
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return params[0].name == "context" or name.rsplit(".", 1)[-1] == "Context"


def _distribution_version(module: str) -> str:
    top = module.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0"


def _node_id(device_id: str) -> int:
    """A Flower node id (a positive 63-bit integer) fixed by the device id."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") >> 1


def _configs(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``run_config``, ``fit_config`` and ``evaluate_config`` of ``[model.options]``, checked to hold
    only the values Flower allows there."""
    out: dict[str, dict[str, Any]] = {}
    for key, kinds in (("run_config", _USER_VALUE), ("fit_config", _SCALAR), ("evaluate_config", _SCALAR)):
        table = options.get(key, {})
        if not isinstance(table, Mapping):
            raise FlowerAppError(f"[model.options] {key} must be a table, not {type(table).__name__}")
        for name, value in table.items():
            if not isinstance(value, kinds):
                raise FlowerAppError(
                    f"[model.options] {key}.{name} = {value!r}: Flower allows only"
                    f" {', '.join(k.__name__ for k in kinds)} there"
                )
        out[key] = dict(table)
    return out


def _loader_counts(client: Any) -> tuple[int | None, int | None]:
    """The sizes of the datasets behind the loaders a client holds, named as Flower's examples name them."""
    holder = getattr(client, "numpy_client", client)
    found: dict[str, list[int]] = {"train": [], "holdout": []}
    for name, value in getattr(holder, "__dict__", {}).items():
        dataset = getattr(value, "dataset", None)
        if not hasattr(value, "__iter__") or isinstance(dataset, str | bytes):
            continue  # a loader iterates over its dataset; a name of a dataset is not one
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            continue
        lowered = name.lower()
        if any(k in lowered for k in _TRAIN_NAMES):
            found["train"].append(n)
        elif any(k in lowered for k in _HOLDOUT_NAMES):
            found["holdout"].append(n)
    # Two loaders of one kind: which one the client uses is unknown, so neither counts.
    train, holdout = (v[0] if len(v) == 1 else None for v in (found["train"], found["holdout"]))
    return train, holdout


def _checked_arrays(
    arrays: Sequence[Any], layout: Sequence[tuple[tuple[int, ...], np.dtype[Any]]]
) -> list[np.ndarray]:
    """The arrays ``fit`` returned, refused unless they have the model's shapes and dtypes."""
    if len(arrays) != len(layout):
        raise FlowerAppError(
            f"the Flower client's fit returned {len(arrays)} arrays; the model has {len(layout)}"
        )
    out = []
    for i, (array, (shape, dtype)) in enumerate(zip(arrays, layout, strict=True)):
        a = np.asarray(array)
        if a.shape != shape or a.dtype != dtype:
            raise FlowerAppError(
                f"the Flower client's fit returned array {i} as {a.dtype} of shape {a.shape}; the"
                f" model's is {dtype} of shape {shape}"
            )
        out.append(a)
    return out


def _numbers(metrics: Mapping[str, Any]) -> Metrics:
    """The numeric entries of a Flower metrics dict (Flower also allows strings, bytes and booleans)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_)
    }


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Hold a torch client to the agent's ``--threads``, as the built-in app's training is held."""
    torch = sys.modules.get("torch")  # a client that does not use torch is left alone
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cast(values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    if dtype.kind == "b":
        return values > 0.5
    if dtype.kind in "iu":
        return np.rint(values).astype(dtype)
    return values.astype(dtype)
