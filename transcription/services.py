"""Writes for the speech-worker registry."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from transcription.models import SpeechWorker


def worker_heartbeat(
    *, worker_id: str, kind: str = SpeechWorker.Kind.BATCH, hostname: str = "", model_name: str = "", device: str = ""
) -> SpeechWorker:
    """Announce a worker as alive for the next ``SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS``."""
    now = timezone.now()
    worker, _ = SpeechWorker.objects.update_or_create(
        worker_id=worker_id,
        defaults={
            "kind": kind,
            "hostname": hostname,
            "model_name": model_name,
            "device": device,
            "last_seen_at": now,
            "expires_at": now + timedelta(seconds=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS),
        },
    )
    return worker


def worker_retire(*, worker_id: str) -> None:
    """A worker shutting down cleanly stops counting at once instead of waiting out its TTL."""
    SpeechWorker.objects.filter(worker_id=worker_id).delete()
