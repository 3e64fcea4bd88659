"""The Prometheus material in deploy/monitoring/ is valid for promtool, and its alerts fire on the series
that should fire them (tests/fixtures/monitoring/alerts_test.yml: two rounds abandoned in a row, an audit
verdict of drift, a round abandoned, a stage near its deadline, no device online, the coordinator down)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULE_TESTS = ROOT / "tests" / "fixtures" / "monitoring" / "alerts_test.yml"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if exe is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (Debian) puts it in /usr/bin")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_alerting_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", "alerts.yml", cwd=MONITORING)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout


def test_prometheus_config_loads_the_rules() -> None:
    out = promtool("check", "config", "prometheus.yml", cwd=MONITORING)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alerts.yml" in out.stdout and "1 rule files found" in out.stdout


def test_alerts_fire_on_synthetic_series() -> None:
    cases = RULE_TESTS.read_text()
    for alert in ("AicflRoundsAbandonedInARow", "AicflAuditDrift"):
        assert f"alertname: {alert}" in cases, f"{RULE_TESTS.name} has no case for {alert}"
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
