"""Reading a job spec: TOML text or a file, validated into a :class:`~shared.jobspec.spec.JobSpec`,
every problem named by its field (:class:`JobSpecError`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.jobspec.spec import MISSING_DATA, JobSpec


class JobSpecError(ValueError):
    """A job spec that cannot be accepted; ``str()`` names each field and problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        lines = msg.splitlines()
        if len(lines) > 0 and all(line.startswith(f"{loc}.") for line in lines):
            problems += lines  # a section validated on its own names its own fields (validate_privacy)
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "finite_number":
            msg = f"must be a finite number (got {e.get('input')!r})"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        problems.append(f"{loc}: {msg}")
    return problems


def validate_spec(data: Any) -> JobSpec:
    """Validate a parsed spec (a mapping); raise :class:`JobSpecError` naming each bad field."""
    if not isinstance(data, dict):
        raise JobSpecError(["(spec): expected a table of fields"])
    model = data.get("model")
    names_app = isinstance(model, dict) and model.get("app") is not None
    # The built-in app reads the [data] schema; the check sits beside the field errors, which
    # pydantic reports before any model validator runs.
    missing = [] if names_app or "data" in data else [MISSING_DATA]
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        problems = [p for p in _format_errors(err) if not p.endswith(MISSING_DATA.split(": ", 1)[1])]
        raise JobSpecError(missing + problems) from None
    return spec


def parse_spec_text(text: str, source: str = "job spec") -> JobSpec:
    """Parse TOML text and validate it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobSpecError([f"{source}: not valid TOML: {err}"]) from None
    return validate_spec(data)


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise JobSpecError([f"{p}: cannot read: {err.strerror}"]) from None
    return parse_spec_text(text, source=str(p))
