"""Log the garbage collector's pauses of every Python process started with this folder on PYTHONPATH.

    AICFL_GC_LOG=/tmp/gc PYTHONPATH=bench/gc_pauses python loadtests/run.py --scenario idle ...
    python bench/gc_pauses/summary.py /tmp/gc

Each process appends, to ``$AICFL_GC_LOG/gc-PID.txt``, one line per full (generation 2) collection and per
younger one over 20 ms: wall time, generation, milliseconds, objects collected, command line. How the
coordinator's p99 tail under 10,000 held check-ins was found (BENCHMARKS.md, "An idle fleet").
"""

from __future__ import annotations

import gc
import os
import sys
import time

_folder = os.environ.get("AICFL_GC_LOG")
if _folder:
    os.makedirs(_folder, exist_ok=True)
    _log = open(os.path.join(_folder, f"gc-{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115 - for the process's life
    _started: list[float] = [0.0]

    def _pause(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _started[0]) * 1000
        if info["generation"] == 2 or ms > 20:
            command = " ".join(sys.argv)[:80]
            _log.write(f"{time.time():.1f} {info['generation']} {ms:.1f} {info['collected']} {command}\n")

    gc.callbacks.append(_pause)
