"""The coordinator process freezes what start-up made and raises the collector's thresholds, so that full
collections, which walk every tracked object, are rarer and shorter (server/gc_tuning.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from server import gc_tuning


def test_tuning_freezes_the_start_up_objects_and_raises_the_thresholds() -> None:
    code = (
        "import gc, json\n"
        "from server.app import create_app\n"  # what a coordinator imports before it serves
        "before = (gc.get_threshold(), gc.get_freeze_count())\n"
        "from server.gc_tuning import tune_for_serving\n"
        "tune_for_serving()\n"
        "after = (gc.get_threshold(), gc.get_freeze_count(), len(gc.get_objects()))\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    (threshold, frozen_before), (tuned, frozen, tracked) = json.loads(out.stdout.splitlines()[-1])
    assert threshold == [700, 10, 10] and frozen_before == 0
    assert tuned == [gc_tuning.YOUNG, gc_tuning.MIDDLE, gc_tuning.OLD]
    # the imports and the app are out of every later collection's walk
    assert frozen > 100_000 and tracked < frozen / 10


def test_the_coordinator_tunes_its_collector_before_it_serves(monkeypatch) -> None:
    import server.cli.server as cli

    calls: list[str] = []
    monkeypatch.setattr(gc_tuning, "tune_for_serving", lambda: calls.append("tuned"))
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: calls.append("served"))
    monkeypatch.setattr("server.app.create_app", lambda settings: object())
    cli._serve(
        None,
        __import__("pathlib").Path("/tmp/aicfl-gc-test"),
        "127.0.0.1",
        1,
        None,
        None,
        None,
        "warning",
        False,
    )
    assert calls == ["tuned", "served"]
