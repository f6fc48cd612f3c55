"""Celery tasks of the transcription app. Tasks take ids and call services."""

from __future__ import annotations

import logging

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from scaiecho_site import errors
from transcription import worker  # noqa: F401  (wires the worker's heartbeat and model preload)
from transcription.models import TranscriptionJob
from transcription.services import REASON_TIMEOUT, JobBusyElsewhere, job_run

logger = logging.getLogger("scaiecho.transcription")


def retry_delay(*, retries: int, error: errors.ApplicationError) -> int:
    """Exponential backoff, or the backend's own ``Retry-After`` when it gave one."""
    if error.retry_after:
        return error.retry_after
    return min(60, settings.SCAIECHO_JOB_RETRY_BACKOFF_SECONDS * 2**retries)


@shared_task(
    bind=True,
    name="transcription.process_transcribe_job",
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=settings.SCAIECHO_JOB_MAX_RETRIES,
    soft_time_limit=settings.SCAIECHO_JOB_SOFT_TIME_LIMIT_SECONDS,
    time_limit=settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS,
)
def process_transcribe_job(self: Task, job_id: str) -> None:
    """Resolve the backend at dispatch, transcribe, and write the result into the job row."""
    try:
        job_run(job_id=job_id, worker_id=self.request.hostname, final_attempt=self.request.retries >= self.max_retries)
    except JobBusyElsewhere:
        # Not a failure, and not one of the job's retries: come back (same queue, same retry count)
        # once the other worker has finished or its heartbeat has lapsed. ``self.retry`` would count
        # against max_retries and give up on a job whose dead worker's heartbeat outlived them.
        self.signature_from_request(
            self.request, (job_id,), {}, countdown=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS
        ).apply_async()
    except errors.ApplicationError as exc:
        if not exc.transient:
            raise
        logger.warning("job %s: transient %s, retry %d", job_id, exc.code, self.request.retries + 1)
        raise self.retry(exc=exc, countdown=retry_delay(retries=self.request.retries, error=exc)) from exc
    except SoftTimeLimitExceeded:
        TranscriptionJob.objects.filter(pk=job_id, status=TranscriptionJob.Status.RUNNING).update(
            status=TranscriptionJob.Status.FAILED, status_reason=REASON_TIMEOUT, error_code=errors.BackendTimeout.code
        )
