"""The coordinator's settings: one class, read from flags or ``AICFL_`` environment variables."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.pacing import Pacing, online_window


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AICFL_", extra="ignore")

    db: str | None = Field(default=None, description="database URL; default: SQLite under data_dir")
    data_dir: Path = Path("aicfl-data")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    signing_key_file: Path | None = Field(
        default=None,
        description="the model-signing key (PEM); default data_dir/coordinator_key.pem; replicas share one",
    )
    signature_window: float = Field(
        default=300.0, gt=0, description="seconds a signed device request stays valid"
    )
    tick_interval: float = Field(default=0.25, gt=0)
    # -- check-in pacing and long polls (coordinator.pacing, server.longpoll) --
    eligibility_window: float = Field(
        default=30.0,
        gt=0,
        description=(
            "a device checked in within this (or holding a check-in) counts as online; raised to at"
            " least the longest wait a device can be told (idle_retry + 10 %) + 10 % + 2 s"
        ),
    )
    idle_retry: float = Field(
        default=60.0,
        gt=0,
        description=(
            "seconds between check-ins of a device that does not long-poll while no job could select it"
            " (±10 %)"
        ),
    )
    poll_retry: float = Field(
        default=2.0,
        gt=0,
        description=(
            "seconds between check-ins of a device that does not long-poll while a job may select it"
            " (±10 %; never more than idle_retry)"
        ),
    )
    active_retry: float = Field(
        default=0.5,
        gt=0,
        description="seconds between check-ins of a device in a running round that does not long-poll",
    )
    long_poll: float = Field(
        default=55.0,
        ge=0,
        description=(
            "longest a check-in is held until its device has a task (the agent's wait is capped at"
            " this); keep it under the idle timeout of any proxy in front (often 60 s); 0: no holds"
        ),
    )
    long_poll_max_held: int = Field(
        default=10_000,
        ge=0,
        description="check-ins one process holds at once; beyond it they are answered at once with retry_after",
    )
    max_body_bytes: int = Field(
        default=512 * 1024 * 1024,
        gt=0,
        description="largest device upload (model update, masked input), operator model or reference data",
    )
    max_json_bytes: int = Field(
        default=1024 * 1024, gt=0, description="largest body of any other request (JSON, mostly)"
    )
    max_audit_report_bytes: int = Field(
        default=16 * 1024 * 1024,
        gt=0,
        description="largest audit report (with its PNG plots) or AutoML baseline an operator uploads",
    )
    max_enroll_bytes: int = Field(default=16 * 1024, gt=0, description="largest enrollment request")
    max_form_bytes: int = Field(default=8 * 1024, gt=0, description="largest dashboard form post (/ui/)")
    body_read_timeout: float = Field(
        default=60.0,
        gt=0,
        description=(
            "seconds a request body may take to arrive, plus 1 s per 16 KiB received, and the longest"
            " it may pause; then 408 (a client trickling a body cannot hold a connection or an upload slot)"
        ),
    )
    enroll_rate_per_minute: float = Field(
        default=10.0, gt=0, description="enrollment attempts a source address may make per minute"
    )
    enroll_unlimited_networks: list[str] = Field(
        default=["127.0.0.0/8", "::1/128"],
        description="source networks exempt from the enrollment rate limit (JSON list in the environment)",
    )
    upload_slots: int = Field(
        default=8,
        gt=0,
        description=(
            "device uploads over 1 MiB (model updates, masked inputs) read and handled at once;"
            " the others wait unread, so the coordinator's memory stays bounded however many arrive"
        ),
    )
    blob_store: str | None = Field(
        default=None,
        description=(
            "where models, masked inputs and audit plots go: s3://BUCKET[/PREFIX], an S3-compatible"
            " bucket that every replica shares (credentials and region from the AWS environment);"
            " default: the folder data_dir/blobs"
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="the S3 API of a store other than AWS (MinIO, Ceph RGW...), e.g. http://minio:9000",
    )
    log_level: str = "info"

    @field_validator("blob_store", "s3_endpoint_url")
    @classmethod
    def _unset_when_empty(cls, value: str | None) -> str | None:
        # An empty variable (a ConfigMap's placeholder) means the default, not a URL to refuse.
        if value is None or not value.strip():
            return None
        return value.strip()

    @field_validator("enroll_unlimited_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP network such as 10.0.0.0/8") from None
        return value

    @model_validator(mode="after")
    def _online_window(self) -> ServerSettings:
        # A device told to come back in T seconds must still count as online when it does.
        self.eligibility_window = online_window(
            self.eligibility_window,
            Pacing(self.idle_retry, self.poll_retry, self.active_retry, self.long_poll),
        )
        return self

    def database_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'coordinator.db').resolve()}"
