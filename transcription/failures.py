"""How a transcription job fails: one table from errors to what the job row records, and back.

A job that fails stores a stable ``error_code`` and a short ``status_reason`` (contract section 2).
The worker records them with :func:`failure_of`; the inline API rebuilds the client's error from the
row with :func:`error_of`. Both read :data:`FAILURES`, so the two directions cannot drift apart.
"""

from __future__ import annotations

from scaiecho_site import errors


class JobTimeLimit(errors.BackendTimeout):
    """The job ran past its time limit (or its worker vanished and the sweep gave up on it)."""

    default_message = "The job ran past its time limit."
    transient = False


class JobAttemptsExhausted(errors.BackendError):
    """The job was delivered ``SCAIECHO_JOB_MAX_ATTEMPTS`` times and its worker died each time."""

    default_message = "The job's worker was lost too many times."
    transient = False


class JobQueuedTooLong(errors.QueueUnavailable):
    """The job waited in the queue longer than ``SCAIECHO_JOB_MAX_QUEUED_SECONDS`` (its task was
    lost, or the workers are that far behind); the sweep ends it rather than leave it waiting."""

    default_message = "The job waited in the queue too long."
    transient = False


class DatabaseLost(errors.InternalError):
    """The database connection broke mid-job on every try (a restart, a failover); what the job
    had not committed was lost with it, so it was run again, up to its retries."""

    default_message = "The database connection was lost."


# Most specific class first: an error takes the first row it is an instance of. The reason is the
# fixed text clients see; ``None`` there means the error's own message.
FAILURES: tuple[tuple[type[errors.ApplicationError], str | None], ...] = (
    (errors.AudioTooLong, "audio too long"),
    (errors.UnsupportedMedia, "decode failure"),
    (errors.BudgetExceeded, "quota exceeded"),
    (errors.BackendUnavailable, "backend unavailable"),
    (JobTimeLimit, "time limit exceeded"),
    (JobAttemptsExhausted, "worker lost too many times"),
    (JobQueuedTooLong, "queued too long"),
    (errors.QueueUnavailable, "queue unavailable"),
    (errors.ValidationError, None),
    (errors.UpstreamShapeMismatch, None),
    (errors.BackendError, None),
    (errors.BackendTimeout, None),
    (errors.BackendRateLimited, None),
    (DatabaseLost, "database unavailable"),
    (errors.InternalError, "internal error"),
)

_REASON_LIMIT = 200  # the column's width


def failure_of(exc: BaseException) -> tuple[str, str]:
    """``(status_reason, error_code)`` for an exception that ended a job."""
    for cls, reason in FAILURES:
        if isinstance(exc, cls):
            return (reason or exc.message)[:_REASON_LIMIT], exc.code
    return "internal error", errors.InternalError.code


def error_of(*, code: str, reason: str) -> errors.ApplicationError:
    """The error an inline request answers for a job that failed with ``code`` and ``reason``."""
    # The last row with a code is its most general class (codes are shared, e.g. AudioTooLong's).
    by_code: dict[str, type[errors.ApplicationError]] = {}
    for cls, _ in FAILURES:
        by_code[cls.code] = cls
    error_class = by_code.get(code, errors.InternalError)
    if error_class is errors.InternalError:
        return errors.InternalError()
    details = [{"field": "file", "message": reason}] if issubclass(error_class, errors.ValidationError) else None
    return error_class(f"Transcription failed: {reason}.", details=details)
