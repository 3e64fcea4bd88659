"""The demo's steps fail with one line that says which step and why (real child processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.demo import DemoError, _run_step, _tail, _wait_step, prepare_data, run_demo, wait_healthy


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
