"""Celery tasks of the transcription app. Tasks take ids and call services."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection

from transcription.failures import DatabaseLost, JobTimeLimit
from transcription.services import (
    JobBusyElsewhere,
    RetryJob,
    TenantYields,
    job_fail_running,
    job_release_claim,
    job_run,
    piece_fail_running,
    piece_release_claim,
    piece_run,
    worker_claimant,
)
from transcription.webhooks import delivery_attempt

logger = logging.getLogger("scaiecho.transcription")


class JobTask(Task):
    """Retries honour the backend's own ``Retry-After`` when it gave one, else exponential backoff."""

    def retry(self, *args: Any, exc: BaseException | None = None, countdown: float | None = None, **kwargs: Any) -> Any:
        if isinstance(exc, RetryJob):
            logger.warning("job %s: transient %s, retry %d", self.request.args, exc.error.code, self.request.retries + 1)
            if exc.error.retry_after:
                countdown = exc.error.retry_after
        return super().retry(*args, exc=exc, countdown=countdown, **kwargs)


# Jobs and the pieces of long jobs share one delivery and retry policy: a dead worker's task is
# redelivered (acks_late), and a transient error retries that task alone, with backoff.
DELIVERY = {
    "bind": True,
    "base": JobTask,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (RetryJob,),
    "max_retries": settings.SCAIECHO_JOB_MAX_RETRIES,
    "retry_backoff": settings.SCAIECHO_JOB_RETRY_BACKOFF_SECONDS,
    "retry_backoff_max": 60,
    "retry_jitter": False,
    "soft_time_limit": settings.SCAIECHO_JOB_SOFT_TIME_LIMIT_SECONDS,
    "time_limit": settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS,
}


@shared_task(name="transcription.process_transcribe_job", **DELIVERY)
def process_transcribe_job(self: Task, job_id: str, yields: int = 0) -> None:
    """Resolve the backend at dispatch, transcribe, and write the result into the job row
    (or, for a long file, split it into pieces that go to the queue this job came from).
    ``yields``: how often this job has already let another tenant go first."""
    claimant = worker_claimant(node=self.request.hostname)
    try:
        job_run(
            job_id=job_id,
            worker_id=claimant,
            retries_left=self.request.retries < self.max_retries,
            queue=_queue_of(self),
            may_yield=yields < settings.SCAIECHO_FAIR_MAX_YIELDS,
        )
    except TenantYields:
        _yield_turn(self, job_id, yields)
    except JobBusyElsewhere:
        # Not a failure, and not one of the job's retries: come back (same queue, same retry count)
        # once the other worker has finished or its heartbeat has lapsed. ``self.retry`` would count
        # against max_retries and give up on a job whose dead worker's heartbeat outlived them.
        self.signature_from_request(
            self.request, (job_id,), {}, countdown=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS
        ).apply_async()
    except SoftTimeLimitExceeded:
        job_fail_running(job_id=job_id, error=JobTimeLimit())
    except (OperationalError, InterfaceError) as exc:
        _retry_after_database_loss(
            self,
            exc,
            release=lambda: job_release_claim(job_id=job_id, worker_id=claimant),
            fail=lambda: job_fail_running(job_id=job_id, error=DatabaseLost()),
        )


@shared_task(name="transcription.process_transcribe_piece", **DELIVERY)
def process_transcribe_piece(self: Task, piece_id: int, yields: int = 0) -> None:
    """Transcribe one piece of a long job; the last piece to finish joins them into the job row."""
    claimant = worker_claimant(node=self.request.hostname)
    try:
        piece_run(
            piece_id=piece_id,
            worker_id=claimant,
            retries_left=self.request.retries < self.max_retries,
            may_yield=yields < settings.SCAIECHO_FAIR_MAX_YIELDS,
        )
    except TenantYields:
        _yield_turn(self, piece_id, yields)
    except JobBusyElsewhere:
        # As for a job: not one of its retries; come back once the other worker could be gone.
        self.signature_from_request(
            self.request, (piece_id,), {}, countdown=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS
        ).apply_async()
    except SoftTimeLimitExceeded:
        piece_fail_running(piece_id=piece_id, error=JobTimeLimit())
    except (OperationalError, InterfaceError) as exc:
        _retry_after_database_loss(
            self,
            exc,
            release=lambda: piece_release_claim(piece_id=piece_id, worker_id=claimant),
            fail=lambda: piece_fail_running(piece_id=piece_id, error=DatabaseLost()),
        )


@shared_task(
    name="transcription.deliver_webhook",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    # The attempts are counted on the delivery row (SCAIECHO_WEBHOOK_MAX_ATTEMPTS), not by Celery.
    max_retries=None,
    soft_time_limit=settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS + 30,
    time_limit=settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS + 60,
)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    """One attempt of a job's webhook; a timeout, connection error or 5xx comes back after the
    delivery's exponential backoff."""
    outcome = delivery_attempt(delivery_id=delivery_id)
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)


def _retry_after_database_loss(
    task: Task, exc: DatabaseError, *, release: Callable[[], None], fail: Callable[[], None]
) -> None:
    """The database connection broke mid-task (a restart, a failover, ``pg_terminate_backend``).

    Nothing the task did after its claim was committed (a result and its usage record commit
    together), so it runs again on a fresh connection: the claim is handed back, then the task
    retries. On its last try the job fails instead (``database unavailable``). Left alone, the
    exception would end the task with the row still ``running`` under a claimant that is alive,
    which the sweep rightly leaves alone: the job would be stuck until the stale-job limit.
    """
    logger.warning("%s %s: the database connection was lost (%s)", task.name, task.request.args, exc)
    with contextlib.suppress(DatabaseError):
        connection.close()  # the broken one; the next query opens a new connection
    last_try = task.request.retries >= task.max_retries
    try:
        if last_try:
            fail()
            return None
        release()
    except DatabaseError:  # still down: the retry (or, on the last try, the stale-job sweep) finds it
        logger.warning("%s %s: the database is still unreachable", task.name, task.request.args)
        with contextlib.suppress(DatabaseError):
            connection.close()
        if last_try:
            raise exc from None
    raise task.retry(exc=exc, countdown=settings.SCAIECHO_JOB_RETRY_BACKOFF_SECONDS)


def _yield_turn(task: Task, row_id: Any, yields: int) -> None:
    """Put the task back (same queue, same retry count: a yield is neither a retry nor an
    attempt) for ``SCAIECHO_FAIR_YIELD_SECONDS``; meanwhile this worker takes the next task."""
    logger.info("%s %s: another tenant goes first (yield %d)", task.name, row_id, yields + 1)
    task.signature_from_request(
        task.request, (row_id,), {"yields": yields + 1}, countdown=settings.SCAIECHO_FAIR_YIELD_SECONDS
    ).apply_async()


def _queue_of(task: Task) -> str | None:
    """The queue this delivery came from (``None`` when run eagerly): a deployment that routes
    jobs to a queue keeps their pieces on the same workers."""
    return (task.request.delivery_info or {}).get("routing_key") or None
