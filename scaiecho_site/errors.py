"""The one application-error hierarchy.

Every error a client can see is an :class:`ApplicationError` with a stable ``code`` and HTTP
status. The DRF exception handler (``scaiecho_site.envelope``) renders them into the contract's
envelope; the streaming consumer reuses ``code`` and ``message`` for its ``error`` frames. The base
class and the errors the speech layer raises itself live in :mod:`speech.errors` and are re-exported
here, so the apps name every error from one place. This module imports nothing from Django.
"""

from __future__ import annotations

from typing import Any

from speech.errors import (
    ApplicationError,
    AudioTooLong,
    BackendError,
    BackendRateLimited,
    BackendTimeout,
    UnsupportedMedia,
    UpstreamShapeMismatch,
    ValidationError,
)

__all__ = [
    "ApplicationError",
    "AudioTooLong",
    "BackendError",
    "BackendRateLimited",
    "BackendTimeout",
    "UnsupportedMedia",
    "UpstreamShapeMismatch",
    "ValidationError",
    "AuthTokenMissing",
    "AuthTokenInvalid",
    "PermissionDenied",
    "ModuleNotEnabled",
    "NotFound",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "SpeakerPreflightFailed",
    "RateLimited",
    "BudgetExceeded",
    "BackendUnavailable",
    "QueueUnavailable",
    "InternalError",
]


class AuthTokenMissing(ApplicationError):
    code = "AUTH_TOKEN_MISSING"
    http_status = 401
    default_message = "No API key was sent. Use 'Authorization: Bearer sgk_...'."


class AuthTokenInvalid(ApplicationError):
    code = "AUTH_TOKEN_INVALID"
    http_status = 401
    default_message = "The API key is not valid or has been revoked."


class PermissionDenied(ApplicationError):
    code = "AUTHZ_PERMISSION_DENIED"
    http_status = 403
    default_message = "This API key lacks the permission this call needs."


class ModuleNotEnabled(ApplicationError):
    code = "MODULE_NOT_ENABLED"
    http_status = 403
    default_message = "The scaiecho module is not enabled for this tenant."


class NotFound(ApplicationError):
    code = "NOT_FOUND"
    http_status = 404
    default_message = "Not found."


class MethodNotAllowed(ApplicationError):
    code = "METHOD_NOT_ALLOWED"
    http_status = 405
    default_message = "This method is not allowed on this resource."


class PayloadTooLarge(ApplicationError):
    code = "PAYLOAD_TOO_LARGE"
    http_status = 413
    default_message = "The request body is larger than this service accepts."


class SpeakerPreflightFailed(ValidationError):
    """The reference recording is unfit for a voice profile; ``fail_reasons`` says why."""

    code = "SCAIECHO_SPEAKER_PREFLIGHT_FAILED"
    default_message = "The reference recording did not pass the quality checks."

    def __init__(self, message: str | None = None, *, fail_reasons: list[str], measurements: dict[str, float]) -> None:
        self.fail_reasons = fail_reasons
        self.measurements = measurements
        super().__init__(message, details=[{"field": "reference", "message": reason} for reason in fail_reasons])

    def as_error_body(self) -> dict[str, Any]:
        return {**super().as_error_body(), "fail_reasons": self.fail_reasons, "measurements": self.measurements}


class RateLimited(ApplicationError):
    code = "RATE_LIMITED"
    http_status = 429
    default_message = "Too many requests. Retry after the indicated number of seconds."


class BudgetExceeded(ApplicationError):
    code = "BUDGET_EXCEEDED"
    http_status = 429
    default_message = "The tenant's transcription budget is exhausted."


class BackendUnavailable(ApplicationError):
    code = "SCAIECHO_BACKEND_UNAVAILABLE"
    http_status = 502
    default_message = "No speech backend allowed for this tenant is available."
    transient = True


class QueueUnavailable(ApplicationError):
    """The job queue (the Celery broker) could not take the work; nothing was started or billed."""

    code = "SCAIECHO_QUEUE_UNAVAILABLE"
    http_status = 503
    default_message = "The job queue is unavailable; try again shortly."
    transient = True


class InternalError(ApplicationError):
    """Rendered for unexpected exceptions; the original is logged, never shown."""
