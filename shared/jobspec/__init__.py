"""The job specification: the one schema for what an operator submits.

A job spec is a TOML file. ``aicfl jobs submit`` parses and validates it here,
the coordinator validates it again on arrival, and the agent reads the
``data``, ``model`` and ``training`` parts from the task it is given. The
example in ``examples/churn.toml`` is documented from this package.

- :mod:`~shared.jobspec.sections`: a model per TOML table, each checking its own fields;
- :mod:`~shared.jobspec.spec`: the whole :class:`JobSpec` and the checks across its sections;
- :mod:`~shared.jobspec.loading`: TOML text or a file to a validated spec, every problem named;
- :mod:`~shared.jobspec.reference`: the reference in docs/jobspec.md, generated from the models.
"""

from shared.jobspec.loading import JobSpecError, load_spec, parse_spec_text, validate_spec
from shared.jobspec.reference import reference_markdown
from shared.jobspec.sections import (
    ROBUST_STRATEGIES,
    AuditSpec,
    CohortSpec,
    DataSchema,
    Duration,
    EvaluationSpec,
    Feature,
    GbdtSpec,
    ModelSpec,
    RobustnessSpec,
    SecAggSpec,
    StrategyName,
    StrategySpec,
    Task,
    TrainingSpec,
    parse_duration,
)
from shared.jobspec.spec import JobSpec

__all__ = [
    "ROBUST_STRATEGIES",
    "AuditSpec",
    "CohortSpec",
    "DataSchema",
    "Duration",
    "EvaluationSpec",
    "Feature",
    "GbdtSpec",
    "JobSpec",
    "JobSpecError",
    "ModelSpec",
    "RobustnessSpec",
    "SecAggSpec",
    "StrategyName",
    "StrategySpec",
    "Task",
    "TrainingSpec",
    "load_spec",
    "parse_duration",
    "parse_spec_text",
    "reference_markdown",
    "validate_spec",
]
