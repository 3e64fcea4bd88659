"""H2O AutoML baselines: what a central model reaches on the rows the federation is tested on.

``aicfl cluster automl`` runs H2O AutoML (LeDell & Poirier, "H2O AutoML:
Scalable Automatic Machine Learning", AutoML workshop at ICML 2020) on central
data that follows the job's schema, then stores the job's baseline through the
coordinator API: the leaderboard, the leader's metrics on the job's reference
rows (computed with the federation's own metric functions, not H2O's, so the
two numbers compare), and the mean absolute TreeSHAP contribution of each
feature (Lundberg et al., "Consistent Individualized Feature Attribution for
Tree Ensembles", 2018) for the audit to compare the federated model's
attributions with.

H2O runs either as a local JVM that this module starts and always stops (on
success, on error, on Ctrl-C or SIGTERM), or as an existing cluster reached by
URL, which it never stops.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pandas as pd

from shared.api_client import CliError
from shared.jobspec import DataSchema
from shared.signing import file_sha256
from shared.tabular import (
    DataSchemaError,
    Preprocessor,
    category_strings,
    load_table,
    local_statistics,
    merge_statistics,
    read_table_bytes,
    validate_table,
)
from shared.training import metrics_from_predictions
from training_cluster.api import ClusterApi

Log = Callable[[str], None]

# Heap of a JVM this module starts: enough for AutoML on tens of thousands of
# rows, small enough to share a laptop or a 2-core CI runner.
LOCAL_MAX_MEM_BYTES = 2 << 30
LEADERBOARD_ROWS = 20
# The models whose predict_contributions is exact TreeSHAP and needs no background frame.
TREE_ALGORITHMS = ("gbm", "xgboost", "drf")
_SORT_METRIC = {"binary": "AUC", "multiclass": "logloss", "regression": "RMSE"}
# DeepLearning is left out: on a few cores its share of a 20-120 s budget gives
# a network well behind the tree models on tabular data, the time is better
# spent on more GBM/XGBoost models, and it has no TreeSHAP for the audit.
_EXCLUDED_ALGORITHMS = ["DeepLearning"]
_STOP_SECONDS = 10
INTERRUPTED = "AutoML was interrupted; no baseline stored"


def automl(
    api: ClusterApi,
    job_id: int,
    data: Path,
    *,
    max_runtime_secs: int = 60,
    h2o_url: str | None = None,
    seed: int = 1,
    max_models: int | None = None,
    nthreads: int = -1,
    log: Log = print,
) -> dict[str, Any]:
    """Run AutoML on the central file ``data`` for job ``job_id`` and store the result as its baseline.

    The job (through ``api``) gives the schema (features, target, task) and
    the reference rows the leader is scored on. Returns the baseline as the coordinator stored it: ``leader``,
    ``algorithm``, ``metrics``, ``leaderboard``, ``contributions``,
    ``provenance`` (see :func:`baseline_from_frames`). Every failure is a
    :class:`~shared.api_client.CliError` with one line saying what to fix.
    """
    started = time.monotonic()
    job = api.job(job_id)
    try:
        schema = DataSchema.model_validate(job["spec"]["data"])
    except (KeyError, TypeError, ValueError) as err:
        raise CliError(f"job {job_id} has no usable data schema: {err}") from None
    central = load_central(Path(data), schema)
    data_sha256 = file_sha256(Path(data))  # of the bytes just read, before minutes of AutoML
    reference = load_reference(api.reference(job_id), schema)
    baseline = baseline_from_frames(
        central,
        reference,
        schema,
        preprocess=job.get("preprocess"),
        max_runtime_secs=max_runtime_secs,
        h2o_url=h2o_url,
        seed=seed,
        max_models=max_models,
        nthreads=nthreads,
        project=f"aicfl_job{job_id}",
        log=log,
    )
    baseline["provenance"]["data_sha256"] = data_sha256
    baseline["provenance"]["seconds"] = round(time.monotonic() - started, 1)
    stored = api.put_baseline(job_id, baseline)
    log(f"stored the baseline of job {job_id}: {baseline['leader']}")
    return dict(stored)


# --------------------------------------------------------------------------- data


def load_central(path: Path, schema: DataSchema) -> pd.DataFrame:
    """The central training rows, read as a device reads its data and checked against the schema.

    A classification target needs at least two labels for AutoML to learn anything.
    """
    try:
        df = load_table(path, schema)
        validate_table(df, schema)
    except DataSchemaError as err:
        raise CliError(f"central data {path}: {err}") from None
    if schema.task != "regression":
        labels = category_strings(df[schema.target]).nunique()
        if labels < 2:
            raise CliError(
                f"central data {path}: column {schema.target!r} (target) has {labels} label;"
                " AutoML needs at least two"
            )
    return df


def load_reference(data: bytes, schema: DataSchema) -> pd.DataFrame:
    """The job's reference rows, read as the coordinator reads them for its central evaluation."""
    try:
        # Without the schema's text dtypes, like the coordinator's reader: the
        # same rows then become the same categories on both sides.
        df = read_table_bytes(data)
        validate_table(df, schema)
    except DataSchemaError as err:
        raise CliError(f"the job's reference data: {err}") from None
    return df


def target_encoding(
    schema: DataSchema, central: pd.DataFrame, reference: pd.DataFrame, preprocess: dict[str, Any] | None
) -> tuple[Preprocessor, str]:
    """The preprocessor whose target encoding the leader's metrics use, and where it came from.

    The job's own (``"job"``), once its statistics round has run: then the
    labels, the positive class and the regression scale of ``loss`` are exactly
    the federation's. Before that, one built from the central and reference
    rows (``"central"``) with the same rules.
    """
    if preprocess is not None:
        return Preprocessor.from_dict(preprocess), "job"
    merged = merge_statistics([local_statistics(central, schema), local_statistics(reference, schema)])
    return Preprocessor.from_statistics(merged, schema), "central"


def _h2o_columns(
    df: pd.DataFrame, schema: DataSchema, with_target: bool
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The schema's columns of ``df`` with H2O column types: categories as canonical text (enum)."""
    out = pd.DataFrame(index=df.index)
    types: dict[str, str] = {}
    for feature in schema.features:
        if feature.type == "numeric":
            out[feature.name] = pd.to_numeric(df[feature.name], errors="coerce").astype("float64")
            types[feature.name] = "numeric"
        else:
            out[feature.name] = category_strings(df[feature.name])
            types[feature.name] = "enum"
    if with_target:
        if schema.task == "regression":
            out[schema.target] = pd.to_numeric(df[schema.target]).astype("float64")
            types[schema.target] = "numeric"
        else:
            out[schema.target] = category_strings(df[schema.target])
            types[schema.target] = "enum"
    return out.reset_index(drop=True), types


# --------------------------------------------------------------------------- H2O session


@dataclass
class H2OSession:
    """Where AutoML runs: ``url`` (``"local"`` for a JVM started here), ``version``, and for a local JVM its port and pid."""

    url: str
    version: str
    port: int | None = None
    pid: int | None = None
    # The signals (Ctrl-C, SIGTERM) that stopped a local JVM during the session.
    interrupted: list[int] = field(default_factory=list)


def _import_h2o() -> Any:
    try:
        import h2o
    except ImportError:
        raise CliError("the h2o package is not installed (pip install 'aicfl[cluster]')") from None
    return h2o


def find_java() -> str:
    """The java executable H2O will launch, found the way H2O looks for it, and checked to run.

    H2O's order: ``$H2O_JAVA_HOME/bin/java``, then ``java`` on ``PATH``, then
    ``$JAVA_HOME/bin/java``.
    """
    candidates: list[str] = []
    h2o_java_home = os.environ.get("H2O_JAVA_HOME")
    if h2o_java_home:
        java = os.path.join(h2o_java_home, "bin", "java")
        if not os.access(java, os.X_OK):
            raise CliError(f"H2O_JAVA_HOME={h2o_java_home} has no bin/java: fix or unset it")
        candidates.append(java)
    else:
        on_path = shutil.which("java")
        if on_path:
            candidates.append(on_path)
        else:
            java_home = os.environ.get("JAVA_HOME")
            if java_home:
                java = os.path.join(java_home, "bin", "java")
                if not os.access(java, os.X_OK):
                    raise CliError(
                        f"no Java: java is not on PATH and JAVA_HOME={java_home} has no bin/java;"
                        " install a JRE (8 or later) or pass --h2o-url to use a running H2O cluster"
                    )
                candidates.append(java)
    if not candidates:
        raise CliError(
            "no Java: java is not on PATH and JAVA_HOME is not set; install a JRE (8 or later)"
            " to start a local H2O, or pass --h2o-url to use a running H2O cluster"
        )
    java = candidates[0]
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        raise CliError(
            f"Java at {java} does not run ({err}); install a working JRE or pass --h2o-url"
        ) from None
    return java


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (Linux /proc; empty elsewhere)."""
    pids = []
    needle = marker.encode()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "cmdline"), "rb") as fh:
                    if needle in fh.read():
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_processes(pids: list[int], timeout: float = _STOP_SECONDS) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _interrupts_stop(stop: Callable[[], None]) -> Iterator[list[int]]:
    """While the block runs, Ctrl-C (SIGINT) and SIGTERM call ``stop`` and then raise KeyboardInterrupt.

    ``stop`` kills the local JVM at once, so nothing after an interrupt waits
    on it: h2o's job poller would otherwise cancel the job over REST, with no
    timeout, on a JVM that may be busy for minutes. Yields the list the
    signals received are appended to. Only the main thread can take signals;
    elsewhere the block runs as it is.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop()
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("…" if len(text) > 300 else "")


_CONNECT_REASONS = (
    ("Connection refused", "connection refused"),
    ("NameResolutionError", "unknown host"),
    ("Name or service not known", "unknown host"),
    ("timed out", "timed out"),
    ("Timeout", "timed out"),
    ("SSLError", "TLS handshake failed"),
    ("401", "unauthorised"),
    ("403", "forbidden"),
)


def _connect_reason(err: BaseException) -> str:
    """The cause of a failed connection in a few words, from h2o's long retry message."""
    text = str(err)
    for needle, reason in _CONNECT_REASONS:
        if needle in text:
            return reason
    return _first_line(err)[:200]


def _h2o_reason(err: BaseException) -> str:
    """The line of an H2O job failure that says why, without the Java stack trace."""
    text = str(err)
    for line in text.splitlines():
        if "Exception:" in line:
            return _first_line(ValueError(line.rsplit("Exception:", 1)[1]))
    return _first_line(ValueError(text.split("stacktrace:")[0]))


@contextlib.contextmanager
def h2o_session(h2o_url: str | None = None, *, nthreads: int = -1, log: Log = print) -> Iterator[H2OSession]:
    """Connect the h2o client to ``h2o_url``, or start a local JVM for the duration of the block.

    A local JVM listens on a free loopback port, has a bounded heap
    (:data:`LOCAL_MAX_MEM_BYTES`) and ``nthreads`` threads (-1: all cores), and
    keeps its files in a temporary folder; it is stopped and the folder removed
    however the block ends. A cluster reached by URL is left running.
    """
    h2o = _import_h2o()
    from h2o.exceptions import H2OError

    h2o.no_progress()
    if h2o_url:
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                h2o.connect(url=h2o_url, verbose=False, telemetry=False)
                version = str(h2o.cluster().version)
        except (H2OError, OSError) as err:
            raise CliError(
                f"H2O is not reachable at {h2o_url} ({_connect_reason(err)}); start the cluster or fix --h2o-url"
            ) from None
        if version != h2o.__version__:
            log(f"warning: the H2O cluster runs {version}, this client is {h2o.__version__}")
        log(f"connected to H2O {version} at {h2o_url}")
        try:
            yield H2OSession(url=h2o_url, version=version)
        finally:
            with contextlib.suppress(Exception):
                h2o.connection().close()
        return

    find_java()
    from h2o.backend import H2OLocalServer

    workdir = tempfile.mkdtemp(prefix="aicfl-h2o-")
    folders = [workdir]

    def kill_jvm() -> None:
        # Every process launched with our ice root is ours: this also catches a
        # JVM whose start was interrupted before H2O kept its handle.
        for pid in _pids_with(workdir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    try:
        with _interrupts_stop(kill_jvm) as received:
            try:
                log(f"starting a local H2O JVM ({LOCAL_MAX_MEM_BYTES >> 30} GB heap)")
                try:
                    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        server = H2OLocalServer.start(
                            nthreads=nthreads,
                            max_mem_size=LOCAL_MAX_MEM_BYTES,
                            port=f"{_free_port()}+",
                            ice_root=workdir,
                            log_dir=workdir,
                            log_level="WARN",
                            verbose=False,
                        )
                        # h2o keeps the JVM's stdout and stderr in a folder of its own and never removes it.
                        folders.append(getattr(server, "_tempdir", None) or workdir)
                        h2o.connect(server=server, verbose=False, telemetry=False)
                        version = str(h2o.cluster().version)
                except (H2OError, OSError, KeyboardInterrupt) as err:
                    if received or isinstance(err, KeyboardInterrupt):
                        raise CliError(
                            "interrupted while the local H2O JVM started; it was stopped", code=130
                        ) from None
                    raise CliError(f"the local H2O JVM did not start: {_first_line(err)}") from None
                pids = _pids_with(workdir)
                url = f"http://127.0.0.1:{server.port}"
                log(f"local H2O {version} started at {url}, pid {pids[0] if pids else '?'}")
                yield H2OSession(
                    url="local",
                    version=version,
                    port=int(server.port),
                    pid=pids[0] if pids else None,
                    interrupted=received,
                )
            finally:
                with contextlib.suppress(Exception):
                    h2o.connection().close()
                _stop_processes(_pids_with(workdir))
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- AutoML


def baseline_from_frames(
    central: pd.DataFrame,
    reference: pd.DataFrame,
    schema: DataSchema,
    *,
    preprocess: dict[str, Any] | None = None,
    max_runtime_secs: int = 60,
    h2o_url: str | None = None,
    seed: int = 1,
    max_models: int | None = None,
    nthreads: int = -1,
    project: str = "aicfl",
    log: Log = print,
) -> dict[str, Any]:
    """AutoML on ``central``, scored on ``reference``: the baseline without its coordinator round trip.

    Both frames must already follow ``schema`` (:func:`load_central`,
    :func:`load_reference`). The result:

    - ``leader``, ``algorithm``: the best model on the leaderboard (sorted by
      AUC, logloss or RMSE for binary, multiclass, regression);
    - ``metrics``: the leader's metrics on the reference rows, with the names
      and definitions of :func:`shared.training.evaluate`;
    - ``leaderboard``: up to :data:`LEADERBOARD_ROWS` rows of H2O's leaderboard
      (cross-validated metrics on the central rows, training and prediction times);
    - ``contributions``: ``{"model", "algorithm", "features": {name: mean |TreeSHAP|},
      "rows"}`` on the reference rows, from the leader when it is a tree model
      (GBM, XGBoost, DRF), else from the best tree model on the leaderboard;
    - ``provenance``: ``rows``, ``reference_rows``, ``max_runtime_secs``,
      ``max_models``, ``seed``, ``h2o_version``, ``h2o_url`` (or ``"local"``),
      ``automl_seconds``, ``models``, ``target_encoding``.
    """
    if max_runtime_secs < 1:
        raise CliError(f"--max-runtime-secs must be at least 1, got {max_runtime_secs}")
    if max_models is not None and max_models < 1:
        raise CliError(f"--max-models must be at least 1, got {max_models}")
    pre, encoding = target_encoding(schema, central, reference, preprocess)
    try:
        y_reference = pre.transform_target(reference)
    except DataSchemaError as err:
        raise CliError(f"the job's reference data: {err}") from None
    h2o = _import_h2o()
    from h2o.exceptions import H2OError, H2OJobCancelled

    with h2o_session(h2o_url, nthreads=nthreads, log=log) as session:
        try:
            with warnings.catch_warnings():
                # h2o warns about single-threaded pandas conversion and about its age.
                warnings.simplefilter("ignore")
                result = _run_automl(
                    h2o,
                    central,
                    reference,
                    schema,
                    max_runtime_secs=max_runtime_secs,
                    seed=seed,
                    max_models=max_models,
                    project=f"{project}_{uuid.uuid4().hex[:8]}",
                    remote=session.url != "local",
                    log=log,
                )
        except (H2OJobCancelled, KeyboardInterrupt):
            # h2o's job poller turns Ctrl-C into a cancel; elsewhere it is a KeyboardInterrupt.
            raise CliError(INTERRUPTED, code=130) from None
        except (H2OError, OSError) as err:  # a failed H2O job raises OSError
            if session.interrupted:  # the local JVM was killed under a request (_interrupts_stop)
                raise CliError(INTERRUPTED, code=130) from None
            raise CliError(f"H2O AutoML failed: {_h2o_reason(err)}") from None
    predictions = leader_predictions(result.pop("prediction_frame"), schema, pre)
    metrics = metrics_from_predictions(
        schema.task, y_reference, predictions, target_mean=pre.target_mean, target_std=pre.target_std
    )
    metrics = {name: float(value) for name, value in metrics.items() if math.isfinite(float(value))}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
    log(f"leader {result['leader']} ({result['algorithm']}) on {len(reference)} reference rows: {shown}")
    return {
        "leader": result["leader"],
        "algorithm": result["algorithm"],
        "metrics": metrics,
        "leaderboard": result["leaderboard"],
        "contributions": result["contributions"],
        "provenance": {
            "rows": len(central),
            "reference_rows": len(reference),
            "max_runtime_secs": max_runtime_secs,
            "max_models": max_models,
            "seed": seed,
            "h2o_version": session.version,
            "h2o_url": session.url,
            "automl_seconds": result["seconds"],
            "models": result["models"],
            "target_encoding": encoding,
        },
    }


def _run_automl(
    h2o: Any,
    central: pd.DataFrame,
    reference: pd.DataFrame,
    schema: DataSchema,
    *,
    max_runtime_secs: int,
    seed: int,
    max_models: int | None,
    project: str,
    remote: bool,
    log: Log,
) -> dict[str, Any]:
    from h2o.automl import H2OAutoML, get_leaderboard

    train_df, train_types = _h2o_columns(central, schema, with_target=True)
    ref_df, ref_types = _h2o_columns(reference, schema, with_target=False)
    created: list[Any] = []  # frames made on the cluster, removed from a shared one afterwards
    train = h2o.H2OFrame(train_df, column_types=train_types, destination_frame=f"{project}_central")
    created.append(train)
    ref = h2o.H2OFrame(ref_df, column_types=ref_types, destination_frame=f"{project}_reference")
    created.append(ref)
    features = [f.name for f in schema.features]
    options: dict[str, Any] = {}
    if max_models is not None:
        options["max_models"] = max_models
    aml = H2OAutoML(
        max_runtime_secs=max_runtime_secs,
        seed=seed,
        sort_metric=_SORT_METRIC[schema.task],
        exclude_algos=_EXCLUDED_ALGORITHMS,
        project_name=project,
        verbosity=None,
        **options,
    )
    log(f"AutoML on {len(central)} central rows, {max_runtime_secs} s budget, seed {seed}")
    t0 = time.monotonic()
    try:
        aml.train(x=features, y=schema.target, training_frame=train)
        seconds = round(time.monotonic() - t0, 1)
        if aml.leader is None:
            raise CliError(f"AutoML trained no model within {max_runtime_secs} s; raise --max-runtime-secs")
        board = get_leaderboard(aml, extra_columns="ALL").as_data_frame(use_pandas=True)
        leader = aml.leader
        predicted = leader.predict(ref)
        created.append(predicted)
        prediction_frame = predicted.as_data_frame(use_pandas=True)
        contributions = _contributions(h2o, leader, board, ref, features, created, log)
    finally:
        if remote:
            # A shared cluster keeps the models (under the project name) but
            # not our data; a local JVM goes away with everything in it.
            for frame in created:
                with contextlib.suppress(Exception):
                    h2o.remove(frame)
    rows = [_json_row(r) for r in board.head(LEADERBOARD_ROWS).to_dict(orient="records")]
    log(f"AutoML trained {len(board)} models in {seconds:.0f} s; leader {leader.model_id}")
    return {
        "leader": str(leader.model_id),
        "algorithm": _algorithm_name(str(leader.algo)),
        "leaderboard": rows,
        "contributions": contributions,
        "models": len(board),
        "seconds": seconds,
        "prediction_frame": prediction_frame,
    }


_ALGORITHM_NAMES = {
    "gbm": "GBM",
    "xgboost": "XGBoost",
    "drf": "DRF",
    "glm": "GLM",
    "deeplearning": "DeepLearning",
    "stackedensemble": "StackedEnsemble",
}


def _algorithm_name(algo: str) -> str:
    return _ALGORITHM_NAMES.get(algo.lower(), algo)


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[str(key)] = value
    return out


def _probability_column(frame: pd.DataFrame, label: str) -> str | None:
    # H2O names a class's probability column after the label, or "p<label>"
    # when the label would not make a valid column name (e.g. "0", "1").
    for name in (label, f"p{label}"):
        if name in frame.columns:
            return name
    return None


def leader_predictions(frame: pd.DataFrame, schema: DataSchema, pre: Preprocessor) -> np.ndarray:
    """H2O's prediction frame as :func:`shared.training.predict` shapes it, in ``pre``'s class order.

    A class the central data never showed (so H2O has no column for it) gets probability 0.
    """
    if schema.task == "regression":
        return frame["predict"].to_numpy(dtype=np.float64)
    columns = [_probability_column(frame, label) for label in pre.classes]
    if schema.task == "binary":
        positive = columns[-1]
        if positive is None:
            raise CliError(
                f"the leader predicts no probability for the positive label {pre.classes[-1]!r};"
                " the central data has no row with it"
            )
        return frame[positive].to_numpy(dtype=np.float64)
    return np.column_stack(
        [frame[c].to_numpy(dtype=np.float64) if c else np.zeros(len(frame)) for c in columns]
    )


def _feature_of(column: str, features: list[str]) -> str | None:
    if column in features:
        return column
    # One-hot columns ("plan.yes") when a model reports them: the longest feature name that prefixes them.
    owners = [f for f in features if column.startswith(f + ".")]
    return max(owners, key=len) if owners else None


def _contributions(
    h2o: Any, leader: Any, board: pd.DataFrame, ref: Any, features: list[str], created: list[Any], log: Log
) -> dict[str, Any]:
    """Mean |TreeSHAP| per original feature on the reference rows, from the best tree model that gives it."""
    from h2o.exceptions import H2OError

    candidates = [str(leader.model_id)] if str(leader.algo).lower() in TREE_ALGORITHMS else []
    algos = board["algo"].astype(str).str.lower() if "algo" in board.columns else pd.Series(dtype=str)
    candidates += [str(m) for m, a in zip(board["model_id"], algos, strict=False) if a in TREE_ALGORITHMS]
    reasons: list[str] = []
    for model_id in dict.fromkeys(candidates):
        model = leader if model_id == str(leader.model_id) else h2o.get_model(model_id)
        try:
            shap = model.predict_contributions(ref, output_format="Compact")
            created.append(shap)
            frame = shap.as_data_frame(use_pandas=True)
        except (H2OError, OSError, ValueError) as err:  # a failed H2O job raises OSError
            reason = _h2o_reason(err)
            reasons.append(f"{model_id}: {reason}")
            log(f"no TreeSHAP from {model_id}: {reason}")
            if "multinomial" in reason:
                break  # H2O computes no contributions for any multinomial model
            continue
        per_feature: dict[str, np.ndarray] = {}
        for column in frame.columns:
            owner = _feature_of(str(column), features)
            if owner is not None:
                values = frame[column].to_numpy(dtype=np.float64)
                per_feature[owner] = per_feature.get(owner, 0.0) + values
        means = {f: float(np.nanmean(np.abs(per_feature[f]))) for f in features if f in per_feature}
        if model_id != str(leader.model_id):
            log(f"TreeSHAP from {model_id}: the leader ({leader.algo}) has none")
        return {
            "model": model_id,
            "algorithm": _algorithm_name(str(model.algo)),
            "features": {f: v for f, v in means.items() if math.isfinite(v)},
            "rows": len(frame),
        }
    return {
        "model": None,
        "algorithm": None,
        "features": {},
        "rows": 0,
        "reason": "no tree model on the leaderboard gives TreeSHAP contributions"
        + (f" ({'; '.join(reasons)[:500]})" if reasons else ""),
    }
