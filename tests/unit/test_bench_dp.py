"""The DP benches (issue 13) measure what they name: bench/dp_cost.py, bench/dp_devices.py, tff_peer's --aicfl-dp."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from shared.privacy.skellam import decode_total

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_dp_round_sends_noised_skellam_vectors_and_decodes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    dp_cost = _bench("dp_cost")
    core = sys.modules["secagg_core"]
    dp = dp_cost.skellam_for(6, 500, 1.0)
    sums: list[np.ndarray] = []
    real_decode = core.decode_total

    def keep(total: np.ndarray, params: object) -> object:
        sums.append(total.copy())
        return real_decode(total, params)

    monkeypatch.setattr(core, "decode_total", keep)
    r = dp_cost.one_round(6, 500, "none", 0.0, "prime", dp)
    assert r["exact"] and r["round_wall_s"] > 0 and r["decode_cpu_s"] >= 0
    (total,) = sums
    noised = decode_total(total, dp)
    assert noised.contributors == 6
    # Six clipped updates of norm 1 (sum at most 6 in L2) plus Skellam noise of std z * D2 / scale per value.
    noise_std = np.sqrt(dp.variance / dp.min_contributors * 6) / dp.scale
    assert 0.5 * noise_std < np.std(noised.total) < 2.0 * noise_std
    plain = dp_cost.one_round(6, 500, "none", 0.0, "prime", None)
    assert plain["exact"] and plain["decode_cpu_s"] >= 0


def test_dp_cost_refuses_bad_rows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dp_cost = _bench("dp_cost")
    monkeypatch.setattr(sys, "argv", ["dp_cost.py", "--rows", "4x"])
    with pytest.raises(SystemExit):
        dp_cost.main()
    assert "--rows must be DEVICESxPARAMS" in capsys.readouterr().err


def test_dp_devices_baseline_is_the_same_job_without_privacy() -> None:
    dp_devices = _bench("dp_devices")
    text = (ROOT / "examples" / "churn_dp.toml").read_text()
    with_dp, without = tomllib.loads(text), tomllib.loads(dp_devices.without_privacy(text))
    assert "privacy" not in without and with_dp.pop("privacy")["level"] == "device"
    assert without == with_dp
    with pytest.raises(ValueError, match="no \\[privacy\\] table"):
        dp_devices.without_privacy(dp_devices.without_privacy(text))


def test_churn_dp_example_is_a_valid_device_level_job() -> None:
    from shared.jobspec import load_spec

    spec = load_spec(ROOT / "examples" / "churn_dp.toml")
    assert spec.secure and spec.privacy is not None and spec.privacy.level == "device"
    assert spec.privacy.target_epsilon <= 8 and spec.privacy.delta == 1e-5


def test_tff_peer_aicfl_dp_spec_sizes_shares_for_the_cohort_at_the_given_epsilon() -> None:
    from shared.jobspec import load_spec

    tff_peer = _bench("tff_peer")
    args = argparse.Namespace(devices=50, delta=1e-5, clip=0.5)
    spec = tff_peer.dp_spec(load_spec(ROOT / "examples" / "churn.toml"), args, 8.098)
    assert spec.secure and not spec.evaluation.federated
    assert spec.cohort.target == spec.cohort.minimum == 50
    p = spec.privacy
    assert (p.level, p.target_epsilon, p.delta, p.clip, p.noise_multiplier) == (
        "device",
        8.098,
        1e-5,
        0.5,
        None,
    )
