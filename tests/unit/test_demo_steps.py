"""The demo's steps: which run for which dataset and model (mlp or gbdt), and each failing with one line
that says which step and why (real child processes)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from server.demo import (
    GBDT,
    GBDT_SETTINGS,
    MLP,
    NO_PRETRAINED_TREES,
    DemoError,
    Steps,
    _run_step,
    _tail,
    _wait_step,
    demo_steps,
    gbdt_audit_refusal,
    gbdt_spec,
    prepare_data,
    run_demo,
    wait_healthy,
)
from server.demo_summary import _against_leader, _spans, model_rounds
from server.plots import training_rounds
from shared.jobspec import JobSpecError, validate_spec

SCHEMA = {"target": "y", "task": "binary", "features": [{"name": "x", "type": "numeric"}]}
T0 = datetime.fromisoformat("2026-12-01T10:00:00+00:00").timestamp()


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_step_names_itself_and_the_end_of_its_log(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    _run_step(child("print('fine')"), log, {}, "pre-training", timeout=30)
    assert log.read_text().strip() == "fine"
    with pytest.raises(
        DemoError, match=r"^pre-training failed: line 9 \| line 10 \| line 11 \| line 12 \| no GPU$"
    ):
        _run_step(
            child("import sys\nfor i in range(13): print(f'line {i}')\nprint('no GPU'); sys.exit(3)"),
            log,
            {},
            "pre-training",
            timeout=30,
        )
    with pytest.raises(DemoError, match=r"^AutoML did not finish within 1 s \(see .*step.log\)$"):
        _run_step(child("import time; time.sleep(30)"), log, {}, "AutoML", timeout=1)


def test_waiting_on_a_background_step(tmp_path: Path) -> None:
    log = tmp_path / "automl.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(child("print('leader: GBM'); raise SystemExit(2)"), stdout=fh)
    with pytest.raises(DemoError, match="^AutoML failed: leader: GBM$"):
        _wait_step(proc, log, "AutoML", timeout=30)
    slow = subprocess.Popen(child("import time; time.sleep(30)"))
    try:
        with pytest.raises(DemoError, match="AutoML did not finish within 1 s"):
            _wait_step(slow, log, "AutoML", timeout=1)
    finally:
        slow.kill()
        slow.wait()
    assert _tail(tmp_path / "missing.log") == ""


def test_a_coordinator_that_dies_or_never_answers_is_reported(tmp_path: Path) -> None:
    dead = subprocess.Popen(child("raise SystemExit(4)"))
    dead.wait()
    with pytest.raises(DemoError, match="the coordinator exited with code 4 while starting"):
        wait_healthy("http://127.0.0.1:9", dead, timeout=5)
    silent = subprocess.Popen(child("import time; time.sleep(30)"))
    try:
        with pytest.raises(DemoError, match=r"did not answer at http://127.0.0.1:9 within 1 s"):
            wait_healthy("http://127.0.0.1:9", silent, timeout=1)
    finally:
        silent.kill()
        silent.wait()


def test_unknown_dataset_and_an_earlier_demo_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="no_such_set"):
        prepare_data("no_such_set", 3, 0, tmp_path, rounds=1)
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "coordinator.db").write_bytes(b"")
    with pytest.raises(DemoError, match="holds an earlier demo; pass another --out or remove it"):
        run_demo(out=tmp_path, devices=3, rounds=1, dataset="mlc_churn")
    assert not (tmp_path / "devices").exists() or not any((tmp_path / "devices").iterdir())


def aicfl(*args: str) -> tuple[int, str, str]:
    """``aicfl ARGS`` through its entry point in this process: exit status, stdout, stderr."""
    from click.testing import CliRunner

    from server.cli import main

    argv, sys.argv = sys.argv, ["aicfl", *args]
    code: int | str | None = 0
    try:
        with CliRunner().isolation(env={"COLUMNS": "200"}) as (out, err, _):
            try:
                main()
            except SystemExit as ended:
                code = ended.code
            sys.stdout.flush()
            sys.stderr.flush()
            return 0 if code is None else int(code), out.getvalue().decode(), err.getvalue().decode()
    finally:
        sys.argv = argv


def test_the_mlp_demo_runs_every_step_by_default_and_the_gbdt_demo_no_pretraining() -> None:
    assert demo_steps("mlc_churn", None, None, None) == Steps(True, True, True, {})
    assert demo_steps("mlc_churn", None, None, None, MLP) == Steps(True, True, True, {})
    trees = demo_steps("mlc_churn", None, None, False, GBDT)
    assert trees == Steps(
        False, True, False, {"pretrain": NO_PRETRAINED_TREES, "audits": "not asked for (--no-audit)"}
    )
    assert (
        "does not apply to trees" in NO_PRETRAINED_TREES and "initial = 'pretrained'" in NO_PRETRAINED_TREES
    )
    assert (
        demo_steps("mlc_churn", False, False, False, GBDT).skipped["baseline"]
        == "not asked for (--no-automl)"
    )
    with pytest.raises(
        DemoError, match="^--pretrain is not available for --model gbdt: Horovod pre-training"
    ):
        demo_steps("mlc_churn", True, None, False, GBDT)
    with pytest.raises(DemoError, match="--model gbdt grows trees on a tabular set's rows.*--dataset digits"):
        demo_steps("digits", None, None, None, GBDT)
    with pytest.raises(DemoError, match=r"^--model must be one of mlp, gbdt; got 'xgb'$"):
        demo_steps("mlc_churn", None, None, None, "xgb")


def test_the_gbdt_demo_audits_by_default_once_the_spec_accepts_an_audit_of_trees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The demo asks the job spec: its answer is the spec's own refusal, or None when it audits trees.
    refusal = gbdt_audit_refusal()
    job = gbdt_spec(SCHEMA, rounds=1, devices=2, seed=0, reference="r.csv")
    assert validate_spec({**job, "audit": {"enabled": False}}).model.zoo == GBDT
    if refusal is None:
        assert validate_spec(job).audit.enabled and demo_steps("mlc_churn", None, None, None, GBDT).audit
    else:
        with pytest.raises(JobSpecError) as refused:
            validate_spec(job)
        assert str(refused.value) == refusal and "audit" in refusal
        assert refusal in demo_steps("mlc_churn", None, None, None, GBDT).skipped["audits"]

    monkeypatch.setattr("server.demo.gbdt_audit_refusal", lambda: None)
    assert demo_steps("mlc_churn", None, None, None, GBDT) == Steps(
        False, True, True, {"pretrain": NO_PRETRAINED_TREES}
    )
    monkeypatch.setattr("server.demo.gbdt_audit_refusal", lambda: "audit: not for trees")
    steps = demo_steps("mlc_churn", None, None, None, GBDT)
    assert not steps.audit
    assert (
        steps.skipped["audits"] == "off for --model gbdt while the job spec refuses it: audit: not for trees"
    )
    with pytest.raises(DemoError, match=r"^--audit is not available for --model gbdt: audit: not for trees$"):
        demo_steps("mlc_churn", None, None, True, GBDT)


def test_the_gbdt_demo_writes_a_trees_job_on_the_same_slices(tmp_path: Path) -> None:
    mlp = prepare_data("mlc_churn", 3, 7, tmp_path / "mlp", rounds=4, central_share=0.1, audit=False)
    trees = prepare_data(
        "mlc_churn", 3, 7, tmp_path / "gbdt", rounds=4, central_share=0.1, audit=False, model=GBDT
    )
    job = tomllib.loads((tmp_path / "gbdt" / "job.toml").read_text())
    assert job["model"] == {"zoo": "gbdt"} and job["gbdt"] == GBDT_SETTINGS and job["rounds"] == 4
    assert job["audit"] == {"enabled": False} and "strategy" not in job
    assert validate_spec(job).secure
    for a, b in zip(mlp["parts"], trees["parts"], strict=True):
        assert a.equals(b)
    assert (tmp_path / "gbdt" / "central.csv").read_bytes() == (tmp_path / "mlp" / "central.csv").read_bytes()
    with pytest.raises(DemoError, match="--dataset digits is an app's images"):
        prepare_data("digits", 3, 7, tmp_path / "d", model=GBDT)


def test_a_boosting_round_is_drawn_and_timed_from_its_first_level_to_its_version() -> None:
    def level(number: int, start: int, end: int, version: int | None, boosting: int) -> dict[str, object]:
        return {
            "kind": "level",
            "number": number,
            "status": "completed",
            "started_at": f"2026-12-01T10:00:{start:02d}+00:00",
            "ended_at": f"2026-12-01T10:00:{end:02d}+00:00",
            "model_version_out": version,
            "metrics": {"boosting_round": boosting, "central": {"auc": [0.0, 0.81, 0.82][boosting]}},
        }

    rounds = [
        {"kind": "stats", "number": 0, "status": "completed", "model_version_out": None},
        {"kind": "bins", "number": 1, "status": "completed", "model_version_out": 0},
        level(2, 1, 2, None, 1),
        level(3, 2, 4, 1, 1),
        level(4, 5, 6, None, 2),
        level(5, 6, 9, 2, 2),
    ]
    made = model_rounds(rounds)
    assert [r["number"] for r in made] == [3, 5]
    assert _spans(made, rounds) == [(T0 + 1, T0 + 4), (T0 + 5, T0 + 9)]
    # The learning curve (the demo's, `aicfl rounds plot`'s) draws each boosting round once.
    curve = training_rounds(rounds)
    assert [(r["kind"], r["number"], r["metrics"]["central"]["auc"]) for r in curve] == [
        ("train", 1, 0.81),
        ("train", 2, 0.82),
    ]
    mlp = [{"kind": "train", "number": 1, "status": "completed", "model_version_out": 1}]
    assert training_rounds(mlp) == mlp


def test_the_federated_model_against_the_automl_leader() -> None:
    assert _against_leader("auc", {"auc": 0.92}, {"auc": 0.90}) == {
        "federated_beats_leader": True,
        "gap_to_leader": pytest.approx(0.02),
    }
    assert _against_leader("auc", {"auc": 0.88}, {"auc": 0.90})["federated_beats_leader"] is False
    assert _against_leader("rmse", {"rmse": 1.0}, {"rmse": 1.5})["federated_beats_leader"] is True
    assert _against_leader("auc", {"auc": 0.9}, {}) == {"federated_beats_leader": None, "gap_to_leader": None}


def test_the_demo_cli_offers_two_models_and_refuses_the_rest(tmp_path: Path) -> None:
    code, out, err = aicfl("demo", "--model", "xgb", "--out", str(tmp_path / "x"))
    assert code == 2 and "Invalid value for '--model'" in err and "'mlp', 'gbdt'" in err, err
    code, out, err = aicfl("demo", "--model", "gbdt", "--pretrain", "--out", str(tmp_path / "y"))
    assert (code, out) == (1, "") and err.startswith("error: --pretrain is not available for --model gbdt")
    assert err.count("\n") == 1 and "Traceback" not in err
    code, out, err = aicfl("demo", "--model", "gbdt", "--dataset", "digits", "--out", str(tmp_path / "z"))
    assert code == 1 and err.startswith("error: --model gbdt grows trees") and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
