"""Reads: which speech backends can take work, and jobs as their owner may see them."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.utils import timezone

from scaiecho_site import errors
from transcription.models import SpeechWorker, TranscriptionJob


def whisper_workers_alive(*, kind: str = SpeechWorker.Kind.BATCH) -> bool:
    """Backend A is available while at least one worker's heartbeat has not expired."""
    return SpeechWorker.objects.filter(kind=kind, expires_at__gt=timezone.now()).exists()


def relay_configured() -> bool:
    """Backend B is available when the relay's URL and key are configured."""
    return bool(settings.SCAIECHO_RELAY_BASE_URL and settings.SCAIECHO_RELAY_API_KEY)


def job_for_owner(*, job_id: str, tenant_id: uuid.UUID, user_id: int) -> TranscriptionJob:
    """A job visible only to the user who created it, in the same tenant; anyone else gets 404."""
    try:
        return TranscriptionJob.objects.get(pk=uuid.UUID(job_id), tenant_id=tenant_id, user_id=user_id)
    except (ValueError, TranscriptionJob.DoesNotExist) as exc:
        raise errors.NotFound("No transcription job with that id.") from exc


def queue_backlog() -> dict[str, int]:
    """Jobs waiting and running, for the admin dashboard."""
    counts = {status: 0 for status in (TranscriptionJob.Status.QUEUED, TranscriptionJob.Status.RUNNING)}
    for status in counts:
        counts[status] = TranscriptionJob.objects.filter(status=status).count()
    return counts
