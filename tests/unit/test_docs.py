"""The documented job spec and the example stay in step with the schema."""

from __future__ import annotations

from pathlib import Path

from shared.jobspec import load_spec, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_jobspec_reference_is_generated_from_the_schema() -> None:
    assert (ROOT / "docs" / "jobspec.md").read_text() == reference_markdown() + "\n", (
        "docs/jobspec.md is stale: regenerate it with `aicfl jobs schema > docs/jobspec.md`"
    )


def test_example_spec_is_valid_and_matches_the_churn_dataset() -> None:
    from shared.datasets import load_dataset

    spec = load_spec(ROOT / "examples" / "churn.toml")
    _, schema, _ = load_dataset("mlc_churn")
    assert [f.model_dump() for f in spec.data.features] == schema["features"]
    assert (spec.data.target, spec.data.task, spec.data.positive) == (
        schema["target"],
        schema["task"],
        schema["positive"],
    )
