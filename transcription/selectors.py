"""Reads: which speech backends can take work right now."""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from transcription.models import SpeechWorker


def whisper_workers_alive(*, kind: str = SpeechWorker.Kind.BATCH) -> bool:
    """Backend A is available while at least one worker's heartbeat has not expired."""
    return SpeechWorker.objects.filter(kind=kind, expires_at__gt=timezone.now()).exists()


def relay_configured() -> bool:
    """Backend B is available when the relay's URL and key are configured."""
    return bool(settings.SCAIECHO_RELAY_BASE_URL and settings.SCAIECHO_RELAY_API_KEY)
