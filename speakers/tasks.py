"""Celery tasks of the speaker library. Tasks take ids and call services."""

from __future__ import annotations

import logging

from celery import Task, shared_task
from django.conf import settings

from speakers.services import REASON_ERROR, speaker_enrollment_fail, speaker_enrollment_run

logger = logging.getLogger("scaiecho.speakers")


@shared_task(
    bind=True,
    name="speakers.process_speaker_enrollment",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.SCAIECHO_JOB_SOFT_TIME_LIMIT_SECONDS,
    time_limit=settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS,
)
def process_speaker_enrollment(self: Task, speaker_id: str) -> None:
    """Embed the voice, verify the consent, and set the profile's status (on a worker)."""
    try:
        speaker_enrollment_run(speaker_id=speaker_id)
    except Exception:  # a bug or a broken model must end the enrollment visibly, not leave it pending
        logger.exception("speaker %s enrollment failed unexpectedly", speaker_id)
        speaker_enrollment_fail(speaker_id=speaker_id, reasons=[REASON_ERROR], scores={})
