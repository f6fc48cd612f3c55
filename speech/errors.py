"""The errors the speech layer raises, and the base of the service's one error hierarchy.

Every error a client can see is an :class:`ApplicationError` with a stable ``code`` and HTTP
status. The speech layer raises the ones it can know about itself (unreadable media, an invalid
option, a failing backend); ``speech.errors`` re-exports them beside the service's own
(authentication, permissions, budgets), and its DRF exception handler renders them all into the
contract's envelope. Nothing here imports Django.
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


class UnsupportedMedia(ApplicationError):
    code = "UNSUPPORTED_MEDIA"
    http_status = 415
    default_message = "The content could not be read as a supported type."


class ValidationError(ApplicationError):
    code = "VALIDATION_ERROR"
    http_status = 422
    default_message = "The request is not valid."


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


class AudioTooLong(ValidationError):
    """The audio is longer than the configured maximum duration (422)."""


class AudioOverBudget(ApplicationError):
    """The audio is longer than what is left of the caller's budget (429, the contract's
    ``BUDGET_EXCEEDED``). The speech layer knows only the seconds it was given; the apps raise
    their own ``BudgetExceeded`` (the same code) where they record why work was refused."""

    code = "BUDGET_EXCEEDED"
    http_status = 429
    default_message = "The audio is longer than what is left of the budget."
