"""Apps: the user's model, data and training code behind one small interface (``base``).

``load_app`` imports the object a job spec names; the built-in tabular app (``tabular``) is the
first app, and the default of a job that names none.
"""

from __future__ import annotations

import importlib
import re

from shared.apps.base import (
    DP_METRICS,
    App,
    AuditInputs,
    DataError,
    DeviceContext,
    DpSgdConfig,
    JobContext,
    LocalData,
    Metrics,
    Statistics,
    TrainConfig,
    checked_metrics,
)

__all__ = [
    "BUILTIN",
    "DP_METRICS",
    "App",
    "AppError",
    "AuditInputs",
    "DataError",
    "DeviceContext",
    "DpSgdConfig",
    "JobContext",
    "LocalData",
    "Metrics",
    "Statistics",
    "TrainConfig",
    "checked_metrics",
    "load_app",
    "preload",
]

#: The app of a job spec that names none: the zoo models on a CSV/Parquet table.
BUILTIN = "shared.apps.tabular:app"
APP_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class AppError(Exception):
    """The app a job names cannot be used here: not installed, not an app, or another version."""


def _import(ref: str) -> object:
    if not APP_REF.match(ref):
        raise AppError(f"app {ref!r} is not of the form 'package.module:attribute'")
    module_name, _, attr = ref.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as err:  # an app's own import error is the user's to read, whatever it is
        raise AppError(f"app {ref!r} does not import here: {type(err).__name__}: {err}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"app {ref!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def preload(ref: str) -> None:
    """Import the module of app ``ref`` now (and the libraries it imports, torch most of all), so that
    the first round that needs it does not spend its stage deadline importing. Raises :class:`AppError`."""
    _import(ref)


def load_app(ref: str, version: str | None = None) -> App:
    """The app object ``ref`` names (``module:attribute``), checked to be an :class:`App` of
    ``version`` when one is asked for; a Flower ``ClientApp`` or ``client_fn`` is adapted into one
    (``shared.apps.flower``). Raises :class:`AppError` with the reason."""
    obj = _import(ref)
    if not isinstance(obj, App):
        # A Flower ClientApp or client_fn runs as it is (shared.apps.flower, which imports flwr).
        from shared.apps.flower import as_app

        try:
            adapted = as_app(obj)
        except Exception as err:  # the user's Flower object, whatever it does wrong, is one reason
            raise AppError(f"app {ref!r}: {err}") from None
        if adapted is None:
            raise AppError(
                f"app {ref!r} is a {type(obj).__name__}, not an aicfl App (shared.apps.App)"
                " nor a Flower ClientApp or client_fn"
            )
        obj = adapted
    if version is not None and str(obj.version) != version:
        raise AppError(f"app {ref!r} is version {obj.version} here; the job needs {version}")
    return obj
