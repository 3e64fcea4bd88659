"""Wire messages between agents, operators and the coordinator, defined once for both sides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# bins and level: a gbdt job's binning round and its tree levels (docs/gbdt.md).
RoundKind = Literal["stats", "train", "evaluate", "bins", "level"]
Stage = Literal["configure", "input", "advertise_keys", "share_keys", "masked_input", "unmask"]
AGENT_API = "v1"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollRequest(_Msg):
    token: str = Field(min_length=8, max_length=256)
    public_key: str = Field(min_length=40, max_length=64, description="raw Ed25519 public key, base64")
    name: str = Field(default="", max_length=200)
    platform: str = Field(default="", max_length=200)


class EnrollResponse(_Msg):
    device_id: str
    coordinator_public_key: str
    signature_window_seconds: float


class ModelRef(_Msg):
    version: int
    sha256: str
    signature: str
    size: int


class Task(_Msg):
    """What a selected device has to do next in a round."""

    round_id: int
    job_id: int
    round: int
    kind: RoundKind
    stage: Stage
    deadline: float = Field(description="unix time by which the stage's message must arrive")
    seed: int
    spec: dict[str, Any]
    model: ModelRef | None = None
    preprocess: dict[str, Any] | None = None
    secagg: dict[str, Any] | None = Field(
        default=None,
        description="secure rounds: parameters, context and what this stage needs (keys, shares, sets)",
    )
    boosting: dict[str, Any] | None = Field(
        default=None,
        description=(
            "a gbdt job's level rounds: the boosting round's trees so far and their open slots"
            " (shared.gbdt.model.growth_to_json), and the cohort size the histogram is encoded for"
        ),
    )


class CheckinRequest(_Msg):
    agent_version: str = Field(default="", max_length=64)
    peak_rss_mb: float | None = Field(default=None, ge=0)
    platform: str = Field(default="", max_length=200)
    wait: float = Field(
        default=0.0,
        ge=0,
        le=3600,
        description=(
            "seconds the device can wait for an answer: with nothing to do now, the coordinator holds"
            " the request until the device has a task or at most this long (capped by its long_poll"
            " setting); 0: answer at once"
        ),
    )


class CheckinResponse(_Msg):
    retry_after: float = Field(description="seconds to wait before the next check-in (0: at once)")
    task: Task | None = None


class ConfigureMessage(_Msg):
    """The device's answer to the configure stage: it takes part, or declines with a reason."""

    accepted: bool
    reason: str | None = Field(default=None, max_length=2000)
    rows: int = Field(default=0, ge=0)
    vocabulary: dict[str, list[str]] | None = Field(
        default=None,
        description="secure statistics rounds: the category values and labels the device holds (no counts)",
    )


class StatsMessage(_Msg):
    """Aggregate feature statistics of the device's training rows (no raw row)."""

    statistics: dict[str, Any]


class EvaluateMessage(_Msg):
    """Metrics of the current global model on the device's holdout rows."""

    metrics: dict[str, float]
    examples: int = Field(ge=0)


class WithdrawMessage(_Msg):
    """A device leaving a round it accepted, and why (its app failed, its data went away)."""

    reason: str = Field(min_length=1, max_length=2000)


class Accepted(_Msg):
    ok: bool = True
    detail: str = ""
    next: CheckinResponse | None = Field(
        default=None,
        description=(
            "the device's next check-in answer, when it sent the message with ?wait=SECONDS: the request"
            " is held, as a check-in with that wait is, until the device owes its next message (its task),"
            " or answers retry_after 0 when the hold ends with nothing to do"
        ),
    )


def masked_input_header(
    round_id: int,
    *,
    train_loss: float = 0.0,
    metrics: dict[str, float] | None = None,
    holdout_examples: int = 0,
) -> dict[str, Any]:
    """The codec header of a masked-input message (the vector itself is uint64, masked)."""
    return {
        "kind": "masked_input",
        "round_id": round_id,
        "train_loss": train_loss,
        "metrics": metrics or {},
        "holdout_examples": holdout_examples,
    }
