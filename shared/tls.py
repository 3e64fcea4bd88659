"""TLS verification settings for the HTTP clients (agent and operator CLI)."""

from __future__ import annotations

import ssl


def verify_setting(ca_cert: str | None) -> ssl.SSLContext | bool:
    """Verify against ``ca_cert`` when given (a private CA), else against the system's CAs."""
    return ssl.create_default_context(cafile=ca_cert) if ca_cert else True
