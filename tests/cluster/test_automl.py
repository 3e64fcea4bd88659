"""H2O AutoML baselines: one real run stores a baseline on a real coordinator's job, the local JVM
never outlives the run (Ctrl-C included), the leader is scored with the federation's own metrics,
and every expected failure is one clear error line."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from shared.api_client import CliError
from shared.datasets import load_dataset
from shared.jobspec import DataSchema
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from shared.training import evaluate, metrics_from_predictions, predict
from training_cluster.api import ClusterApi
from training_cluster.automl import _pids_with, automl, leader_predictions, target_encoding

from ..integration.harness import ENV, Coordinator, churn_slices, small_spec, wait_for

BUDGET = 25  # seconds of AutoML: enough for a few tree models on 2 cores


# --------------------------------------------------------------------------- helpers


class FakeApi:
    """The coordinator as automl() sees it, in memory: for the failures that come before any storing."""

    def __init__(self, schema: dict[str, Any], reference: pd.DataFrame):
        self.schema = schema
        self.reference_bytes = reference.to_csv(index=False).encode()
        self.stored: list[dict[str, Any]] = []

    def job(self, job_id: int) -> dict[str, Any]:
        return {"id": job_id, "spec": {"data": self.schema}, "preprocess": None, "baseline": None}

    def reference(self, job_id: int) -> bytes:
        return self.reference_bytes

    def put_baseline(self, job_id: int, baseline: dict[str, Any]) -> dict[str, Any]:
        self.stored.append(baseline)
        return baseline


def churn_frames(rows: int = 600) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    df, schema, _ = load_dataset("mlc_churn")
    df = df.sample(n=rows, random_state=11)
    return df.iloc[: rows // 2], df.iloc[rows // 2 :], schema


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def jvm_of(lines: list[str]) -> tuple[int, int]:
    """The port and pid of the local JVM, from automl()'s "local H2O … started at URL, pid N" line."""
    line = next(x for x in lines if x.startswith("local H2O ") and " started at " in x)
    url, pid = line.split(" started at ", 1)[1].split(", pid ")
    return int(url.rsplit(":", 1)[1]), int(pid)


# --------------------------------------------------------------------------- without a JVM


def test_metrics_from_predictions_are_evaluates_metrics_for_every_task() -> None:
    """The leader is scored with the federation's definitions: same numbers as evaluate() on a zoo model."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4)).astype(np.float32)
    targets = {
        "binary": (X[:, 0] > 0).astype(np.float32),
        "multiclass": rng.integers(0, 3, 300),
        "regression": (X[:, 1] * 2).astype(np.float32),
    }
    for task, y in targets.items():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3 if task == "multiclass" else 1))
        scale = {"target_mean": 5.0, "target_std": 2.0}
        expected = evaluate(model, X, y, task=task, **scale)  # type: ignore[arg-type]
        got = metrics_from_predictions(task, y, predict(model, X, task, **scale), **scale)  # type: ignore[arg-type]
        assert got.keys() == expected.keys(), task
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9), (task, name)


def test_metrics_from_predictions_refuse_misshapen_predictions() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics_from_predictions("binary", np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="shape"):
        metrics_from_predictions("multiclass", np.zeros(3), np.zeros(3))


def test_leader_predictions_follow_the_federations_class_order() -> None:
    schema = DataSchema.model_validate(
        {"features": [{"name": "x", "type": "numeric"}], "target": "y", "task": "binary", "positive": "no"}
    )
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": ["yes", "no"]})
    pre, source = target_encoding(schema, frame, frame, None)
    assert (pre.classes, source) == (["yes", "no"], "central")
    h2o_frame = pd.DataFrame({"predict": ["no", "yes"], "no": [0.8, 0.3], "yes": [0.2, 0.7]})
    np.testing.assert_allclose(leader_predictions(h2o_frame, schema, pre), [0.8, 0.3])

    multi = DataSchema.model_validate(
        {"features": [{"name": "x", "type": "numeric"}], "target": "y", "task": "multiclass"}
    )
    central = pd.DataFrame({"x": [1.0, 2.0], "y": ["0", "1"]})
    reference = pd.DataFrame({"x": [3.0], "y": ["2"]})  # a class the central rows never show
    pre, _ = target_encoding(multi, central, reference, None)
    h2o_frame = pd.DataFrame({"predict": ["1"], "p0": [0.25], "p1": [0.75]})  # H2O's names for labels 0, 1
    np.testing.assert_allclose(leader_predictions(h2o_frame, multi, pre), [[0.25, 0.75, 0.0]])


def test_metrics_use_the_jobs_encoding_once_it_has_one() -> None:
    """After the statistics round the leader's labels and regression scale are exactly the federation's."""
    central, reference, schema_dict = churn_frames()
    schema = DataSchema.model_validate(schema_dict)
    federation = Preprocessor.from_statistics(merge_statistics([local_statistics(central, schema)]), schema)
    pre, source = target_encoding(schema, central, reference, federation.to_dict())
    assert source == "job" and pre.to_dict() == federation.to_dict()


def test_central_data_missing_a_column_is_one_error_line(tmp_path: Path) -> None:
    central, reference, schema = churn_frames()
    path = tmp_path / "central.csv"
    central.drop(columns=["total_day_minutes"]).to_csv(path, index=False)
    api = FakeApi(schema, reference)
    with pytest.raises(CliError) as err:
        automl(api, 1, path, max_runtime_secs=BUDGET)  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "'total_day_minutes'" in message and "missing" in message
    assert not api.stored


def test_central_data_with_a_wrong_type_or_one_class_is_one_error_line(tmp_path: Path) -> None:
    central, reference, schema = churn_frames()
    api = FakeApi(schema, reference)
    path = tmp_path / "central.csv"
    bad = central.copy()
    bad["account_length"] = bad["account_length"].astype(object)
    bad.iloc[3, bad.columns.get_loc("account_length")] = "many"
    bad.to_csv(path, index=False)
    with pytest.raises(CliError, match=r"'account_length': expected numbers, found 'many' \(row 4\)"):
        automl(api, 1, path)  # type: ignore[arg-type]

    central[central["churn"] == "no"].to_csv(path, index=False)
    with pytest.raises(CliError, match=r"'churn' \(target\) has 1 label; AutoML needs at least two"):
        automl(api, 1, path)  # type: ignore[arg-type]
    assert not api.stored


def test_no_java_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    central, reference, schema = churn_frames()
    path = tmp_path / "central.csv"
    central.to_csv(path, index=False)
    api = FakeApi(schema, reference)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.delenv("H2O_JAVA_HOME", raising=False)
    with pytest.raises(CliError) as err:
        automl(api, 1, path, max_runtime_secs=BUDGET)  # type: ignore[arg-type]
    assert str(err.value).startswith("no Java: java is not on PATH and JAVA_HOME is not set")
    assert "--h2o-url" in str(err.value)

    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-such-jdk"))
    with pytest.raises(CliError, match=r"JAVA_HOME=.*no-such-jdk has no bin/java"):
        automl(api, 1, path, max_runtime_secs=BUDGET)  # type: ignore[arg-type]
    assert not api.stored


def test_unreachable_h2o_url_is_one_error_line(tmp_path: Path) -> None:
    central, reference, schema = churn_frames()
    path = tmp_path / "central.csv"
    central.to_csv(path, index=False)
    api = FakeApi(schema, reference)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CliError) as err:
        automl(api, 1, path, h2o_url=url)  # type: ignore[arg-type]
    assert (
        str(err.value)
        == f"H2O is not reachable at {url} (connection refused); start the cluster or fix --h2o-url"
    )
    assert not api.stored


# --------------------------------------------------------------------------- one real run


class Run:
    def __init__(
        self, coord: Coordinator, job_id: int, central: Path, reference: Path, schema: dict[str, Any]
    ):
        self.coord, self.job_id, self.central, self.reference, self.schema = (
            coord,
            job_id,
            central,
            reference,
            schema,
        )
        self.lines: list[str] = []
        self.result: dict[str, Any] = {}
        self.seconds = 0.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A real coordinator, a churn job with its reference rows, and one AutoML run on central rows
    disjoint from the devices' and the reference's; the assertions below share it."""
    root = tmp_path_factory.mktemp("automl")
    coord = Coordinator(root)
    coord.bootstrap()
    coord.start()
    try:
        _, reference, schema = churn_slices(root / "data", 2)
        df, _, _ = load_dataset("mlc_churn")
        used = df.sample(n=1800, random_state=3).index  # the rows churn_slices gave devices and reference
        central = root / "central.csv"
        df.drop(index=used).sample(n=1500, random_state=4).to_csv(central, index=False)
        api = coord.api()
        job = api.json("POST", "/v1/jobs", json=small_spec(schema, rounds=1, target=2, minimum=2))
        api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference.read_bytes())
        r = Run(coord, int(job["id"]), central, reference, schema)
        cluster = ClusterApi(coord.api())
        t0 = time.monotonic()
        r.result = automl(cluster, r.job_id, central, max_runtime_secs=BUDGET, nthreads=2, log=r.lines.append)
        r.seconds = time.monotonic() - t0
        yield r
    finally:
        coord.stop()


@pytest.mark.slow
def test_automl_stores_a_baseline_on_the_job(run: Run) -> None:
    api = run.coord.api()
    stored = api.json("GET", f"/v1/jobs/{run.job_id}/baseline")
    assert api.json("GET", f"/v1/jobs/{run.job_id}")["baseline"] is not None
    assert stored["leader"] == run.result["leader"]

    board = stored["leaderboard"]
    assert 1 <= len(board) <= 20
    assert all({"model_id", "auc", "logloss", "algo"} <= row.keys() for row in board)
    assert board[0]["model_id"] == stored["leader"]  # sorted by AUC, best first
    assert stored["algorithm"] == board[0]["algo"]

    reference_rows = len(pd.read_csv(run.reference))
    metrics = stored["metrics"]
    assert set(metrics) == {"loss", "accuracy", "auc", "examples"}  # the federation's binary metrics
    assert metrics["examples"] == reference_rows
    assert 0.75 < metrics["auc"] <= 1.0 and 0.8 < metrics["accuracy"] <= 1.0 and 0.0 < metrics["loss"] < 0.6

    shap = stored["contributions"]
    names = {f["name"] for f in run.schema["features"]}
    assert shap["model"] in {row["model_id"] for row in board}
    assert shap["algorithm"] in ("GBM", "XGBoost", "DRF")
    assert set(shap["features"]) == names  # per original feature, never per one-hot column
    assert all(v >= 0 for v in shap["features"].values()) and max(shap["features"].values()) > 0
    assert shap["rows"] == reference_rows

    p = stored["provenance"]
    assert p["data_sha256"] == hashlib.sha256(run.central.read_bytes()).hexdigest()
    assert (p["rows"], p["reference_rows"]) == (1500, reference_rows)
    assert (p["max_runtime_secs"], p["seed"], p["h2o_url"]) == (BUDGET, 1, "local")
    assert p["h2o_version"].startswith("3.") and p["models"] >= len(board)
    assert 0 < p["automl_seconds"] <= p["seconds"] <= run.seconds + 1
    assert p["target_encoding"] == "central"  # no statistics round has run: no agents


@pytest.mark.slow
def test_local_jvm_is_gone_after_the_run(run: Run) -> None:
    port, pid = jvm_of(run.lines)
    assert not alive(pid)
    assert not port_open(port)


_INTERRUPTED = """
import sys
from pathlib import Path
from training_cluster.api import ClusterApi
from training_cluster.automl import automl
from shared.api_client import CliError
api = ClusterApi.connect(sys.argv[1], sys.argv[2])
try:
    automl(api, int(sys.argv[3]), Path(sys.argv[4]), max_runtime_secs=300, nthreads=1,
           log=lambda line: print(line, flush=True))
except CliError as err:
    print(f"error: {err}", flush=True)
    sys.exit(err.code)
"""


def _interrupt(
    run: Run, sig: signal.Signals, after: str, delay: float, freeze_jvm: bool = False
) -> tuple[int, list[str], str]:
    """Start automl() in a process, send it ``sig`` ``delay`` s after the line starting with ``after``.

    With ``freeze_jvm``, the local JVM is stopped (SIGSTOP) just before: a JVM
    that answers no request. Returns the exit code, the lines printed up to
    ``after`` and the rest of the output. A process that has not ended 60 s
    later gets SIGABRT, which makes faulthandler print where every thread of
    it waits.
    """
    frozen: int | None = None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "faulthandler",
            "-c",
            _INTERRUPTED,
            run.coord.url,
            run.coord.token,
            str(run.job_id),
            str(run.central),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(after):
                break
        time.sleep(delay)
        if freeze_jvm:
            frozen = jvm_of(lines)[1]
            os.kill(frozen, signal.SIGSTOP)
        proc.send_signal(sig)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            rest, _ = proc.communicate(timeout=30)
            pytest.fail(f"automl() had not ended 60 s after {sig.name}:\n" + "\n".join(lines) + "\n" + rest)
    finally:
        if proc.poll() is None:
            proc.kill()
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
    return proc.returncode, lines, rest


def _jvms() -> set[int]:
    """Processes started by automl() (launched with an aicfl-h2o- temporary folder as ice root)."""
    return set(_pids_with("aicfl-h2o-"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_interrupt_stops_the_local_jvm_and_stores_nothing(run: Run, sig: signal.Signals) -> None:
    before = run.coord.api().json("GET", f"/v1/jobs/{run.job_id}/baseline")
    code, lines, rest = _interrupt(run, sig, "AutoML on ", 3)  # 3 s: into the models
    port, pid = jvm_of(lines)
    assert code == 130, (lines, rest)
    assert rest.strip().splitlines() == ["error: AutoML was interrupted; no baseline stored"], rest
    wait_for(lambda: not alive(pid), 10, "the JVM to end")
    assert not port_open(port)
    after = run.coord.api().json("GET", f"/v1/jobs/{run.job_id}/baseline")
    assert after == before


@pytest.mark.slow
def test_ctrl_c_does_not_wait_on_a_jvm_that_answers_nothing(run: Run) -> None:
    """A JVM too busy to answer (here: stopped) must not hold up Ctrl-C. h2o's own answer to Ctrl-C is
    to cancel the job over REST, with no timeout: automl() kills the local JVM before that."""
    code, lines, rest = _interrupt(run, signal.SIGINT, "AutoML on ", 3, freeze_jvm=True)
    _, pid = jvm_of(lines)
    assert code == 130, (lines, rest)
    assert rest.strip().splitlines() == ["error: AutoML was interrupted; no baseline stored"], rest
    wait_for(lambda: not alive(pid), 10, "the JVM to end")


@pytest.mark.slow
def test_ctrl_c_while_the_jvm_starts_leaves_no_jvm(run: Run) -> None:
    before = _jvms()
    code, lines, rest = _interrupt(run, signal.SIGINT, "starting a local H2O JVM", 2)
    assert code == 130, (lines, rest)
    assert rest.strip().splitlines()[-1:] == [
        "error: interrupted while the local H2O JVM started; it was stopped"
    ], rest
    assert "Traceback" not in rest
    wait_for(lambda: not (_jvms() - before), 10, "the JVM to end")


@pytest.mark.slow
def test_cli_automl_error_is_one_line(run: Run, tmp_path: Path) -> None:
    """`aicfl cluster automl` prints the error line, not a traceback, and exits non-zero."""
    bad = tmp_path / "central.csv"
    pd.read_csv(run.central).drop(columns=["voice_mail_plan"]).to_csv(bad, index=False)
    env = {**ENV, "AICFL_URL": run.coord.url, "AICFL_TOKEN": run.coord.token}
    out = subprocess.run(
        [sys.executable, "-m", "server", "cluster", "automl", "--job", str(run.job_id), "--data", str(bad)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "'voice_mail_plan'" in out.stderr + out.stdout and "missing" in out.stderr + out.stdout
