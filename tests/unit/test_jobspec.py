"""The job spec: a valid file parses; each mistake gives one message naming the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.jobspec import JobSpec, JobSpecError, load_spec, parse_duration, parse_spec_text, validate_spec

EXAMPLE = """
name = "churn"
rounds = 10
seed = 7

[data]
target = "churn"
task = "binary"
positive = "yes"
features = [
  { name = "account_length", type = "numeric" },
  { name = "total_day_minutes", type = "numeric" },
  { name = "plan", type = "categorical" },
]

[model]
zoo = "mlp"
hidden = [32, 16]

[cohort]
target = 6
minimum = 3
stage_timeout = "90s"
selection_timeout = "5m"

[training]
epochs = 2
batch_size = 64
learning_rate = 0.05

[strategy]
name = "fedadam"
eta = 0.02
"""


def spec_dict(**overrides: object) -> dict[str, object]:
    """A minimal valid spec as a mapping, with top-level fields replaced."""
    data: dict[str, object] = {
        "name": "churn",
        "rounds": 3,
        "data": {
            "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical"}],
            "target": "y",
            "task": "binary",
        },
    }
    data.update(overrides)
    return data


def problems_of(data: object) -> list[str]:
    with pytest.raises(JobSpecError) as info:
        validate_spec(data)
    return info.value.problems


def test_example_spec_parses_with_every_section() -> None:
    spec = parse_spec_text(EXAMPLE)
    assert isinstance(spec, JobSpec)
    assert spec.name == "churn"
    assert spec.rounds == 10
    assert spec.seed == 7
    assert [f.name for f in spec.data.features] == ["account_length", "total_day_minutes", "plan"]
    assert spec.data.positive == "yes"
    assert spec.model.hidden == [32, 16]
    assert spec.cohort.target == 6 and spec.cohort.minimum == 3
    assert spec.cohort.stage_timeout == 90.0
    assert spec.cohort.selection_timeout == 300.0
    assert spec.training.epochs == 2 and spec.training.batch_size == 64
    assert spec.strategy.name == "fedadam" and spec.strategy.eta == 0.02


def test_minimal_spec_gets_documented_defaults() -> None:
    spec = validate_spec(spec_dict())
    assert spec.cohort.target == 10 and spec.cohort.minimum == 2
    assert spec.cohort.stage_timeout == 120.0
    assert spec.strategy.name == "fedavg"
    assert spec.model.zoo == "mlp"


def test_unknown_nested_field_is_named_by_its_path() -> None:
    problems = problems_of(spec_dict(cohort={"targett": 5}))
    assert problems == ["cohort.targett: unknown field"]


def test_unknown_top_level_field_is_refused() -> None:
    problems = problems_of(spec_dict(round=3))
    assert problems == ["round: unknown field"]


def test_missing_rounds_is_one_message() -> None:
    data = spec_dict()
    del data["rounds"]
    assert problems_of(data) == ["rounds: required field is missing"]


def test_bad_task_literal_names_field_and_shows_the_value() -> None:
    data = spec_dict()
    data["data"] = {**data["data"], "task": "binry"}  # type: ignore[dict-item]
    (problem,) = problems_of(data)
    assert problem.startswith("data.task: ")
    assert "'binry'" in problem
    assert "binary" in problem and "regression" in problem


def test_minimum_above_target_is_refused() -> None:
    (problem,) = problems_of(spec_dict(cohort={"target": 3, "minimum": 5}))
    assert problem.startswith("cohort: ")
    assert "minimum (5) must not exceed target (3)" in problem


def test_duplicate_feature_names_are_refused() -> None:
    data = spec_dict()
    data["data"] = {
        "features": [{"name": "a", "type": "numeric"}, {"name": "a", "type": "categorical"}],
        "target": "y",
        "task": "regression",
    }
    (problem,) = problems_of(data)
    assert problem.startswith("data: ")
    assert "distinct" in problem and "repeated: a" in problem


def test_target_listed_as_feature_is_refused() -> None:
    data = spec_dict()
    data["data"] = {
        "features": [{"name": "a", "type": "numeric"}, {"name": "y", "type": "numeric"}],
        "target": "y",
        "task": "regression",
    }
    (problem,) = problems_of(data)
    assert problem.startswith("data: ")
    assert "target 'y' is also listed as a feature" in problem


def test_positive_on_a_non_binary_task_is_refused() -> None:
    data = spec_dict()
    data["data"] = {**data["data"], "task": "multiclass", "positive": "yes"}  # type: ignore[dict-item]
    (problem,) = problems_of(data)
    assert problem.startswith("data: ")
    assert "'positive' applies to binary tasks only" in problem


@pytest.mark.parametrize("bad", ["5x", "", "m", "-5s", "five minutes", "1h30m"])
def test_bad_duration_string_is_refused_with_field_path(bad: str) -> None:
    (problem,) = problems_of(spec_dict(cohort={"stage_timeout": bad}))
    assert problem.startswith("cohort.stage_timeout: ")
    assert "duration" in problem


@pytest.mark.parametrize("bad", [0, "0s", -1, True])
def test_zero_negative_or_boolean_duration_is_refused(bad: object) -> None:
    (problem,) = problems_of(spec_dict(cohort={"selection_timeout": bad}))
    assert problem.startswith("cohort.selection_timeout: ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), (30, 30.0), ("30", 30.0), ("1.5m", 90.0), ("250ms", 0.25)],
)
def test_durations_parse_to_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    spec = validate_spec(spec_dict(cohort={"stage_timeout": text}))
    assert spec.cohort.stage_timeout == pytest.approx(seconds)


def test_several_mistakes_give_one_message_each() -> None:
    data = spec_dict(cohort={"targett": 5, "stage_timeout": "5x"})
    del data["rounds"]
    with pytest.raises(JobSpecError) as info:
        validate_spec(data)
    problems = info.value.problems
    assert "rounds: required field is missing" in problems
    assert "cohort.targett: unknown field" in problems
    assert [p for p in problems if p.startswith("cohort.stage_timeout: ")] != []
    assert len(problems) == 3
    assert str(info.value) == "; ".join(problems)


def test_non_table_spec_is_refused() -> None:
    assert problems_of(["not", "a", "table"]) == ["(spec): expected a table of fields"]


def test_invalid_toml_message_names_the_source() -> None:
    with pytest.raises(JobSpecError) as info:
        parse_spec_text('name = "x"\nrounds = = 3\n', source="jobs/churn.toml")
    (problem,) = info.value.problems
    assert problem.startswith("jobs/churn.toml: not valid TOML")


def test_load_spec_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "churn.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    assert load_spec(path) == parse_spec_text(EXAMPLE)


def test_load_spec_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("rounds = [\n", encoding="utf-8")
    with pytest.raises(JobSpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: not valid TOML")


def test_load_spec_missing_file_gives_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(JobSpecError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: cannot read")
    assert "No such file" in problem


def test_spec_is_immutable() -> None:
    spec = validate_spec(spec_dict())
    with pytest.raises(ValueError):
        spec.rounds = 5  # type: ignore[misc]
