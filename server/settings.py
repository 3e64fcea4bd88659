"""The coordinator's settings: one class, read from flags or ``AICFL_`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    eligibility_window: float = Field(
        default=30.0, gt=0, description="a device checked in within this counts as online"
    )
    idle_retry: float = Field(default=2.0, gt=0)
    active_retry: float = Field(default=0.5, gt=0)
    max_body_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    upload_slots: int = Field(
        default=8,
        gt=0,
        description=(
            "device uploads over 1 MiB (model updates, masked inputs) read and handled at once;"
            " the others wait unread, so the coordinator's memory stays bounded however many arrive"
        ),
    )
    log_level: str = "info"

    def database_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'coordinator.db').resolve()}"
