"""The coordinator process's garbage collector, tuned for serving thousands of held requests.

CPython's full collection (generation 2) walks every tracked object: the imports' and the app's, and
those of every request in flight. With 10,000 idle devices' check-ins held (long polls), one took 175
to 195 ms and came every 10 to 15 s (measured with ``gc.callbacks`` during
``loadtests/run.py --scenario idle --devices 10000``), and every request arriving meanwhile waited: the
fleet's p99 check-in sat at the pause's length. So, once the app is built:

- ``gc.freeze()``: what start-up made (modules, the app, its routes and models) moves to the permanent
  generation and is not walked again;
- thresholds raised so that a young collection comes every ``YOUNG`` allocations rather than 700 and a
  full one is considered every ``YOUNG * MIDDLE * OLD`` (5 million) rather than 70,000: objects that die
  young (a request's) are freed before they are promoted, and the pauses that remain are rarer.

Cyclic garbage of the held requests (freed by reference counting otherwise) waits longer for a full
collection; the coordinator's peak RSS in the same run is recorded beside the latencies (BENCHMARKS.md).
"""

from __future__ import annotations

import gc

YOUNG = 10_000
MIDDLE = 10
OLD = 50


def tune_for_serving() -> None:
    """Freeze what exists now and raise the collection thresholds; call once the app is built."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
