"""The one application-error hierarchy.

Every error a client can see is an :class:`ApplicationError` with a stable ``code`` and HTTP
status. The DRF exception handler (``scaiecho_site.envelope``) renders them into the contract's
envelope; the streaming consumer reuses ``code`` and ``message`` for its ``error`` frames.
This module imports nothing from Django so that worker-side code can raise these errors too.
"""

from __future__ import annotations

from typing import Any


class ApplicationError(Exception):
    code: str = "INTERNAL_ERROR"
    http_status: int = 500
    default_message: str = "An unexpected error occurred."
    # Transient errors are safe to retry (a worker retries them with backoff).
    transient: bool = False

    def __init__(
        self,
        message: str | None = None,
        *,
        details: list[dict[str, Any]] | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.retry_after = retry_after
        super().__init__(self.message)

    def as_error_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


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


class UnsupportedMedia(ApplicationError):
    code = "UNSUPPORTED_MEDIA"
    http_status = 415
    default_message = "The content could not be read as a supported type."


class ValidationError(ApplicationError):
    code = "VALIDATION_ERROR"
    http_status = 422
    default_message = "The request is not valid."


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


class BackendError(ApplicationError):
    code = "BACKEND_ERROR"
    http_status = 502
    default_message = "The speech backend failed."
    transient = True


class UpstreamShapeMismatch(BackendError):
    code = "UPSTREAM_SHAPE_MISMATCH"
    default_message = "The speech backend answered in an unexpected shape."
    transient = False


class BackendTimeout(ApplicationError):
    code = "BACKEND_TIMEOUT"
    http_status = 504
    default_message = "The speech backend did not answer in time."
    transient = True


class BackendRateLimited(ApplicationError):
    code = "BACKEND_RATE_LIMITED"
    http_status = 429
    default_message = "The speech backend is rate limiting this service."
    transient = True


class InternalError(ApplicationError):
    """Rendered for unexpected exceptions; the original is logged, never shown."""
