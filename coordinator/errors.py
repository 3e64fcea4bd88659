"""Typed errors of the federation engine; the API turns each into an RFC 9457 problem."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class: ``status`` is the HTTP status the API answers with."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class Invalid(CoordinatorError):
    status = 422
    title = "Invalid input"


class NotFound(CoordinatorError):
    status = 404
    title = "Not found"


class Conflict(CoordinatorError):
    status = 409
    title = "Conflict"


class Unauthorized(CoordinatorError):
    status = 401
    title = "Unauthorized"


class Forbidden(CoordinatorError):
    status = 403
    title = "Forbidden"


class Gone(CoordinatorError):
    status = 410
    title = "Gone"


class TooLarge(CoordinatorError):
    status = 413
    title = "Content too large"


class SigningKeyMismatch(Conflict):
    """The shared blob store holds another coordinator's public key: this one must not start (``keys``)."""

    title = "Signing key mismatch"
