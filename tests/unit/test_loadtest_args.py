"""loadtests/run.py's options: what it asks of locust, and what it refuses before starting anything."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loadtests import run


def args(**over: object) -> argparse.Namespace:
    base = {
        "devices": 10,
        "operators": 0,
        "spawn_rate": 5.0,
        "workers": 1,
        "scenario": "idle",
        "steady": False,
    }
    return argparse.Namespace(**{**base, **over})


def test_steady_resets_locust_stats_once_every_device_has_started(tmp_path: Path) -> None:
    assert "--reset-stats" not in run.locust_command(args(), "http://x", tmp_path, 60)
    assert "--reset-stats" in run.locust_command(args(steady=True), "http://x", tmp_path, 60)


def test_steady_is_refused_outside_the_idle_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run.main(["--scenario", "secure", "--steady"])
    assert exit_.value.code == 2
    assert "--steady is for --scenario idle" in capsys.readouterr().err
