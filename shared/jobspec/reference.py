"""The job spec reference (docs/jobspec.md, ``aicfl jobs schema``), generated from the sections' models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from shared.jobspec.sections import (
    AuditSpec,
    CohortSpec,
    DataSchema,
    EvaluationSpec,
    Feature,
    GbdtSpec,
    ModelSpec,
    RobustnessSpec,
    SecAggSpec,
    StrategySpec,
    TrainingSpec,
)
from shared.jobspec.spec import JobSpec
from shared.privacy.settings import PrivacySettings

_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("(top level)", JobSpec),
    ("[data]", DataSchema),
    ("[[data.features]]", Feature),
    ("[model]", ModelSpec),
    ("[cohort]", CohortSpec),
    ("[training]", TrainingSpec),
    ("[strategy]", StrategySpec),
    ("[evaluation]", EvaluationSpec),
    ("[secagg]", SecAggSpec),
    ("[robustness]", RobustnessSpec),
    ("[audit]", AuditSpec),
    ("[gbdt]", GbdtSpec),
]


def _type_text(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for cls in (
        DataSchema,
        ModelSpec,
        CohortSpec,
        TrainingSpec,
        StrategySpec,
        EvaluationSpec,
        SecAggSpec,
        RobustnessSpec,
        AuditSpec,
        GbdtSpec,
        Feature,
        PrivacySettings,
    ):
        text = text.replace(f"{cls.__module__}.{cls.__name__}", cls.__name__)
    return text.replace("<class '", "").replace("'>", "")


def _constraint(meta: Any) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    for attr, op in ops.items():
        if getattr(meta, attr, None) is not None:
            return f"{op} {getattr(meta, attr)}"
    return str(meta)


def reference_markdown() -> str:
    """The job spec reference, generated from the sections' models (docs/jobspec.md)."""
    lines = [
        "# Job spec reference",
        "",
        "Generated from `shared/jobspec/` by `aicfl jobs schema`; do not edit by hand.",
        'Durations take seconds or a string such as `"90s"`, `"5m"`, `"1h"`.',
        "An example: `examples/churn.toml`.",
        "",
    ]
    for title, model in _SECTIONS:
        lines += [
            f"## {title}",
            "",
            (model.__doc__ or "").strip().splitlines()[0],
            "",
            "| field | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, f in model.model_fields.items():
            if f.is_required():
                default = "required"
            else:
                value = f.get_default(call_default_factory=True)
                default = "" if isinstance(value, BaseModel) else f"`{value!r}`"
            constraints = ", ".join(_constraint(m) for m in f.metadata)
            meaning = " ".join(
                x for x in (f.description or "", f"({constraints})" if constraints else "") if x
            )
            type_text = _type_text(f.annotation).replace("|", "\\|")
            lines.append(f"| `{name}` | `{type_text}` | {default} | {meaning} |")
        lines.append("")
    lines += _privacy_reference()
    return "\n".join(lines)


def _privacy_reference() -> list[str]:
    """The [privacy] table's rows, from ``PrivacySettings`` (a dataclass shared with the privacy code)."""
    from dataclasses import MISSING, fields
    from typing import get_type_hints

    hints = get_type_hints(PrivacySettings)
    lines = [
        "## [privacy]",
        "",
        (PrivacySettings.__doc__ or "").strip().splitlines()[0],
        "Checked by `shared/privacy/settings.py` (docs/privacy.md).",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in fields(PrivacySettings):
        default = "required" if f.default is MISSING else f"`{f.default!r}`"
        type_text = _type_text(hints[f.name]).replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{type_text}` | {default} | {f.metadata.get('doc', '')} |")
    lines.append("")
    return lines
