"""Celery tasks of the transcription app. Tasks take ids and call services."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from transcription.failures import JobTimeLimit
from transcription.services import JobBusyElsewhere, RetryJob, job_fail_running, job_run, piece_fail_running, piece_run

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
def process_transcribe_job(self: Task, job_id: str) -> None:
    """Resolve the backend at dispatch, transcribe, and write the result into the job row
    (or, for a long file, split it into pieces that go to the queue this job came from)."""
    try:
        job_run(
            job_id=job_id,
            worker_id=self.request.hostname,
            retries_left=self.request.retries < self.max_retries,
            queue=_queue_of(self),
        )
    except JobBusyElsewhere:
        # Not a failure, and not one of the job's retries: come back (same queue, same retry count)
        # once the other worker has finished or its heartbeat has lapsed. ``self.retry`` would count
        # against max_retries and give up on a job whose dead worker's heartbeat outlived them.
        self.signature_from_request(
            self.request, (job_id,), {}, countdown=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS
        ).apply_async()
    except SoftTimeLimitExceeded:
        job_fail_running(job_id=job_id, error=JobTimeLimit())


@shared_task(name="transcription.process_transcribe_piece", **DELIVERY)
def process_transcribe_piece(self: Task, piece_id: int) -> None:
    """Transcribe one piece of a long job; the last piece to finish joins them into the job row."""
    try:
        piece_run(piece_id=piece_id, worker_id=self.request.hostname, retries_left=self.request.retries < self.max_retries)
    except JobBusyElsewhere:
        # As for a job: not one of its retries; come back once the other worker could be gone.
        self.signature_from_request(
            self.request, (piece_id,), {}, countdown=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS
        ).apply_async()
    except SoftTimeLimitExceeded:
        piece_fail_running(piece_id=piece_id, error=JobTimeLimit())


def _queue_of(task: Task) -> str | None:
    """The queue this delivery came from (``None`` when run eagerly): a deployment that routes
    jobs to a queue keeps their pieces on the same workers."""
    return (task.request.delivery_info or {}).get("routing_key") or None
