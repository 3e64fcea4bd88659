"""Fuzz the published API for a while: cases tried, server errors (5xx) and schema violations.

Starts a real coordinator on loopback, seeded as tests/integration/test_schemathesis.py seeds it
(tests/fixtures/fuzzing.py: a job's history with versions and an audit, a running job, an enrolled
device), loads its /openapi.json and, until ``--seconds`` have passed, runs schemathesis over every
operation: first its explicit cases (schema examples and the coverage phase's boundary values:
2^63, negative ids, wrong types, missing headers), then passes of ``--examples`` random cases per
operation, valid and invalid, each pass with a new seed. Operator operations go out with the admin
token, device operations signed as the enrolled device. Every response goes through the checks of
``CHECK_NAMES``; nothing stops at a failure, so the figures count them all (by operation and kind).

    python bench/fuzz.py [--seconds 300] [--examples 100] [--traced]

Exit status 1 when any 5xx or violation was seen.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import schemathesis  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402
from schemathesis.core.result import Ok  # noqa: E402

# Semi-public: what schemathesis.pytest builds each operation's test with (pinned <5 in pyproject).
from schemathesis.generation.hypothesis.builder import (  # noqa: E402
    HypothesisTestConfig,
    HypothesisTestMode,
    create_test,
)

from tests.fixtures.fuzzing import (  # noqa: E402
    CHECK_NAMES,
    FuzzTarget,
    fuzz_target,
    operator_headers,
    session_for,
)


class Tally:
    """Cases sent, 5xx answers and schema violations (check failures of the other answers)."""

    def __init__(self) -> None:
        self.cases = 0
        self.server_errors = 0
        self.violations = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()
        self.examples: dict[tuple[str, str], str] = {}

    def record(self, label: str, status: int, failures: list[Any]) -> None:
        self.cases += 1
        self.statuses[status] += 1
        if status >= 500:
            self.server_errors += 1
        for failure in failures:
            title = getattr(failure, "title", type(failure).__name__)
            key = (label, title)
            self.failures[key] += 1
            self.examples.setdefault(key, str(failure)[:600])
        # A 5xx is counted once, as a server error, however many checks it also fails.
        if status < 500:
            self.violations += len(failures)


def _failures(err: BaseException) -> list[Any]:
    if isinstance(err, BaseExceptionGroup):
        return [f for e in err.exceptions for f in _failures(e)]
    return [err]


def fuzz_operation(
    operation: Any, target: FuzzTarget, tally: Tally, checks: list[Any], examples: int, explicit: bool
) -> None:
    """One pass over an operation: its explicit cases too when ``explicit``, then ``examples`` random ones."""
    label = f"{operation.method.upper()} {operation.path}"
    session = session_for(target, operation.path)
    headers = operator_headers(target, operation.path)

    def run(case: schemathesis.Case) -> None:
        response = case.call(session=session, headers=headers)
        try:
            case.validate_response(response, checks=checks, headers=headers)
            failures: list[Any] = []
        except (Exception, BaseExceptionGroup) as err:  # noqa: BLE001 - every failure is counted, none stops
            failures = _failures(err)
        tally.record(label, response.status_code, failures)

    modes = [HypothesisTestMode.FUZZING]
    if explicit:
        modes += [HypothesisTestMode.EXAMPLES, HypothesisTestMode.COVERAGE]
    settings = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    test = create_test(
        operation=operation,
        test_func=run,
        config=HypothesisTestConfig(
            project=operation.schema.config, modes=modes, settings=settings, seed=random.getrandbits(64)
        ),
    )
    # An operation that takes nothing has no invalid cases to generate.
    with contextlib.suppress(hypothesis.errors.Unsatisfiable):
        test()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300, help="how long to fuzz (default 300)")
    p.add_argument("--examples", type=int, default=100, help="random cases per operation and pass")
    p.add_argument("--traced", action="store_true", help="run the coordinator under coverage too")
    args = p.parse_args()

    load_all_checks()
    checks = CHECKS.get_by_names(list(CHECK_NAMES))
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp, fuzz_target(Path(tmp), traced=args.traced) as target:
        schema = schemathesis.openapi.from_url(target.url + "/openapi.json")
        operations = []
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                raise SystemExit(f"the published schema does not load: {result.err()}")
            operations.append(result.ok())
        start = time.monotonic()
        passes = 0
        while time.monotonic() - start < args.seconds:
            for operation in operations:
                if time.monotonic() - start >= args.seconds:
                    break
                fuzz_operation(operation, target, tally, checks, args.examples, explicit=passes == 0)
            passes += 1
        seconds = time.monotonic() - start

    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"schemathesis {schemathesis.__version__}, hypothesis {hypothesis.__version__}")
    print(f"operations: {len(operations)}, passes: {passes}, seconds: {seconds:.0f}")
    print(f"cases tried: {tally.cases} ({tally.cases / seconds:.0f}/s)")
    print("statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items())))
    print(f"server errors (5xx): {tally.server_errors}")
    print(f"schema violations: {tally.violations}")
    for (label, title), n in tally.failures.most_common():
        print(f"  {n:6d}  {label}: {title}")
        print("          " + tally.examples[(label, title)].replace("\n", "\n          ")[:600])
    sys.exit(1 if tally.server_errors or tally.violations else 0)


if __name__ == "__main__":
    main()
