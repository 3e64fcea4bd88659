"""bench/gc_pauses logs a process's full collections when on its PYTHONPATH, and summarises them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_full_collections_are_logged_and_summarised(tmp_path: Path) -> None:
    env = {**os.environ, "AICFL_GC_LOG": str(tmp_path), "PYTHONPATH": str(REPO / "bench" / "gc_pauses")}
    code = "import gc\nx = [[i] for i in range(50_000)]\nfor _ in range(3):\n    gc.collect()\n"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    (log,) = tmp_path.glob("gc-*.txt")
    full = [line for line in log.read_text().splitlines() if line.split(" ")[1] == "2"]
    assert len(full) >= 3  # the three it was asked for (and any the interpreter made on its own)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gc_pauses" / "summary.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert f"{len(full)} full collections" in out


def test_nothing_is_logged_without_a_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "bench" / "gc_pauses")}
    env.pop("AICFL_GC_LOG", None)
    subprocess.run(
        [sys.executable, "-c", "import gc; gc.collect()"], env=env, check=True, cwd=tmp_path, timeout=60
    )
    assert list(tmp_path.iterdir()) == []
