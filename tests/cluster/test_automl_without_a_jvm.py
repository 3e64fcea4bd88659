"""AutoML without a JVM: refusals of bad options, unfit data and unusable Java, H2O's errors in one line,
and the frames handed to H2O.

Each failure must end as one line a person can act on (the real runs, with a
local JVM, are in test_automl.py).
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shared.api_client import CliError
from shared.jobspec import DataSchema
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from training_cluster.automl import (
    _alive,
    _connect_reason,
    _h2o_columns,
    _h2o_reason,
    _interrupts_stop,
    _json_row,
    automl,
    baseline_from_frames,
    find_java,
    leader_predictions,
    load_reference,
)

BINARY = DataSchema.model_validate(
    {"features": [{"name": "x", "type": "numeric"}], "target": "y", "task": "binary"}
)
CENTRAL = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": ["no", "yes", "no", "yes"]})


def executable(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- before H2O


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_runtime_secs": 0}, "--max-runtime-secs must be at least 1, got 0"),
        ({"max_models": 0}, "--max-models must be at least 1, got 0"),
    ],
)
def test_options_out_of_range_are_refused(options: dict[str, int], message: str) -> None:
    with pytest.raises(CliError, match=f"^{message}$"):
        baseline_from_frames(CENTRAL, CENTRAL, BINARY, **options)  # type: ignore[arg-type]


def test_reference_rows_with_a_label_the_federation_lacks_are_refused() -> None:
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(CENTRAL, BINARY)]), BINARY)
    reference = pd.DataFrame({"x": [1.0, 2.0], "y": ["no", "perhaps"]})
    with pytest.raises(CliError) as err:
        baseline_from_frames(CENTRAL, reference, BINARY, preprocess=pre.to_dict())
    assert str(err.value) == (
        "the job's reference data: column 'y' (target): label 'perhaps' is not one of 'no', 'yes' (row 2)"
    )


def test_reference_data_that_does_not_follow_the_schema_is_refused() -> None:
    with pytest.raises(CliError, match=r"^the job's reference data: column 'x': missing from the data"):
        load_reference(b"z,y\n1,no\n", BINARY)


def test_a_job_without_a_data_schema_is_refused(tmp_path: Path) -> None:
    class NoSchemaApi:
        def job(self, job_id: int) -> dict[str, Any]:
            return {"id": job_id, "spec": {"name": "x"}}

    with pytest.raises(CliError, match="^job 3 has no usable data schema: 'data'$"):
        automl(NoSchemaApi(), 3, tmp_path / "central.csv")  # type: ignore[arg-type]


def test_h2o_gets_categories_as_text_and_a_regression_target_as_numbers() -> None:
    # A numeric target typed "enum" would make AutoML classify prices instead of regressing them.
    schema = DataSchema.model_validate(
        {
            "features": [{"name": "area", "type": "categorical"}, {"name": "x", "type": "numeric"}],
            "target": "price",
            "task": "regression",
        }
    )
    df = pd.DataFrame({"area": [415, 510.0], "x": ["1.5", "2"], "price": ["100.5", "200"]}, index=[7, 9])
    frame, types = _h2o_columns(df, schema, with_target=True)
    assert types == {"area": "enum", "x": "numeric", "price": "numeric"}
    assert frame.to_dict(orient="list") == {"area": ["415", "510"], "x": [1.5, 2.0], "price": [100.5, 200.0]}
    frame, types = _h2o_columns(df, schema, with_target=False)
    assert list(frame.columns) == ["area", "x"] and "price" not in types


# --------------------------------------------------------------------------- Java


def test_h2o_java_home_wins_and_must_hold_a_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("H2O_JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(
        CliError, match=f"^H2O_JAVA_HOME={tmp_path / 'jdk'} has no bin/java: fix or unset it$"
    ):
        find_java()
    java = executable(tmp_path / "jdk" / "bin" / "java", "#!/bin/sh\nexit 0\n")
    assert find_java() == str(java)


def test_java_home_is_used_when_java_is_not_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("H2O_JAVA_HOME", raising=False)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jre"))
    java = executable(tmp_path / "jre" / "bin" / "java", "#!/bin/sh\nexit 0\n")
    assert find_java() == str(java)


def test_a_java_that_does_not_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = executable(tmp_path / "jdk" / "bin" / "java", "#!/bin/sh\necho 'broken JRE' >&2\nexit 1\n")
    monkeypatch.setenv("H2O_JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(CliError) as err:
        find_java()
    message = str(err.value)
    assert (
        message.startswith(f"Java at {java} does not run (") and "returned non-zero exit status 1" in message
    )
    assert message.endswith("); install a working JRE or pass --h2o-url") and "\n" not in message


# --------------------------------------------------------------------------- H2O's answers


def test_a_failed_h2o_job_is_reported_by_its_exception_line_without_the_java_stack() -> None:
    err = OSError(
        "Job with key $03017f00000132d4ffffffff$_aml failed with an exception:"
        " java.lang.IllegalArgumentException: Response column 'y' has only one level\n"
        "stacktrace:\n  at hex.ModelBuilder.init(ModelBuilder.java:1520)\n  at water.H2O$H2OCountedCompleter"
    )
    assert _h2o_reason(err) == "Response column 'y' has only one level"
    assert _h2o_reason(OSError("Job was cancelled by the user.\nstacktrace:\n  at x")) == (
        "Job was cancelled by the user."
    )


def test_an_unknown_connection_failure_is_shown_in_short() -> None:
    reason = _connect_reason(OSError("the cluster said something odd:   " + "x" * 500))
    assert reason.startswith("the cluster said something odd: xxx") and len(reason) == 200


def test_leaderboard_rows_become_json_with_no_numpy_types_or_non_finite_numbers() -> None:
    row = _json_row({"model_id": "GBM_1", "auc": np.float64(0.81), "rmse": float("nan"), "runs": np.int64(3)})
    assert row == {"model_id": "GBM_1", "auc": 0.81, "rmse": None, "runs": 3}
    assert type(row["auc"]) is float and type(row["runs"]) is int


def test_regression_predictions_are_the_predict_column() -> None:
    schema = DataSchema.model_validate(
        {"features": [{"name": "x", "type": "numeric"}], "target": "price", "task": "regression"}
    )
    frame = pd.DataFrame({"predict": [1.5, -2.0]})
    got = leader_predictions(frame, schema, None)  # type: ignore[arg-type]
    assert got.dtype == np.float64 and got.tolist() == [1.5, -2.0]


def test_a_leader_without_the_positive_class_is_refused() -> None:
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(CENTRAL, BINARY)]), BINARY)
    frame = pd.DataFrame({"predict": ["no", "no"], "no": [1.0, 1.0]})  # the central rows held no "yes"
    with pytest.raises(CliError, match="^the leader predicts no probability for the positive label 'yes';"):
        leader_predictions(frame, BINARY, pre)


# --------------------------------------------------------------------------- the local JVM's processes


def test_a_process_that_has_ended_and_been_reaped_is_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert _alive(proc.pid) is False


def test_off_the_main_thread_interrupt_handling_leaves_signals_alone() -> None:
    # signal.signal raises off the main thread; the AutoML run must still work there (in a server).
    outcome: list[object] = []

    def body() -> None:
        try:
            with _interrupts_stop(lambda: None) as received:
                outcome.append(received)
        except Exception as err:  # noqa: BLE001 - the test reports it below
            outcome.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(10)
    assert outcome == [[]]
