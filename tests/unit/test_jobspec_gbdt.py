"""A gbdt job's spec: [model] zoo = "gbdt" with its [gbdt] table; each misfit says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.jobspec import GbdtSpec, JobSpecError, load_spec, parse_spec_text, reference_markdown

ROOT = Path(__file__).resolve().parents[2]

GBDT = """
name = "trees"
rounds = 20

[data]
target = "churn"
task = "binary"
features = [{ name = "minutes", type = "numeric" }, { name = "plan", type = "categorical" }]

[model]
zoo = "gbdt"

[gbdt]
max_depth = 4
eta = 0.1
bins = 64
min_child_weight = 2.0
reg_lambda = 0.5
gamma = 0.1

[audit]
enabled = false
"""


def test_gbdt_spec_parses_with_its_settings() -> None:
    spec = parse_spec_text(GBDT)
    assert spec.model.zoo == "gbdt"
    assert spec.gbdt == GbdtSpec(
        max_depth=4, eta=0.1, bins=64, min_child_weight=2.0, reg_lambda=0.5, gamma=0.1
    )
    assert spec.rounds == 20


def test_gbdt_defaults_are_xgboosts() -> None:
    spec = parse_spec_text(GBDT.replace(GBDT[GBDT.index("[gbdt]") : GBDT.index("[audit]")], ""))
    assert spec.gbdt.model_dump() == {
        "max_depth": 6,
        "eta": 0.3,
        "bins": 256,
        "min_child_weight": 1.0,
        "reg_lambda": 1.0,
        "gamma": 0.0,
    }


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("max_depth = 4", "max_depth = 0"), "gbdt.max_depth: Input should be greater than or equal to 1"),
        (("max_depth = 4", "max_depth = 13"), "gbdt.max_depth: Input should be less than or equal to 12"),
        (("eta = 0.1", "eta = 0"), "gbdt.eta: Input should be greater than 0"),
        (("bins = 64", "bins = 1"), "gbdt.bins: Input should be greater than or equal to 2"),
        (("bins = 64", "bins = 2000"), "gbdt.bins: Input should be less than or equal to 1024"),
        (("gamma = 0.1", "gamma = -1"), "gbdt.gamma: Input should be greater than or equal to 0"),
        (("reg_lambda = 0.5", "lambda = 0.5"), "gbdt.lambda: unknown field"),
        (("eta = 0.1", "eta = nan"), "gbdt.eta: must be a finite number"),
        (
            ("enabled = false", "enabled = true\ngate = true"),
            "audit: gate = true cannot hold back a zoo = 'gbdt'",
        ),
        (('zoo = "gbdt"', 'zoo = "mlp"'), "gbdt: the [gbdt] table applies to [model] zoo = 'gbdt'"),
        (('zoo = "gbdt"', 'zoo = "gbdt"\ninitial = "pretrained"'), "model: zoo = 'gbdt' grows its trees"),
        (('zoo = "gbdt"', 'zoo = "trees"'), "model.zoo: Input should be 'mlp', 'logreg' or 'gbdt'"),
        (
            ("[audit]", '[strategy]\nname = "fedadam"\n\n[audit]'),
            "strategy: a zoo = 'gbdt' job sums histograms",
        ),
    ],
)
def test_gbdt_spec_mistakes_name_the_field(change: tuple[str, str], problem: str) -> None:
    old, new = change
    assert old in GBDT
    with pytest.raises(JobSpecError) as err:
        parse_spec_text(GBDT.replace(old, new, 1))
    assert any(p.removeprefix("(spec): ").startswith(problem) for p in err.value.problems), err.value.problems


def test_gbdt_versions_are_audited_by_default() -> None:
    # The audit worker explains trees (training_cluster/audit_trees.py): no [audit] table, every version audited.
    spec = parse_spec_text(GBDT[: GBDT.index("[audit]")])
    assert spec.audit.enabled and not spec.audit.gate


def test_gbdt_zoo_belongs_to_the_builtin_app() -> None:
    text = GBDT.replace('zoo = "gbdt"', 'zoo = "gbdt"\napp = "sensors:app"')
    with pytest.raises(JobSpecError) as err:
        parse_spec_text(text)
    assert any("zoo = 'gbdt' is the built-in tabular app's" in p for p in err.value.problems)


def test_mlp_spec_round_trips_with_the_default_gbdt_table() -> None:
    # A spec is dumped and validated again (the simulation, the coordinator): the default table must pass.
    spec = load_spec(ROOT / "examples" / "churn.toml")
    assert type(spec).model_validate(spec.model_dump(mode="json")) == spec


def test_the_gbdt_example_is_valid_and_documented() -> None:
    spec = load_spec(ROOT / "examples" / "churn_gbdt.toml")
    assert spec.model.zoo == "gbdt" and spec.audit.enabled and not spec.audit.gate
    assert "## [gbdt]" in reference_markdown()
