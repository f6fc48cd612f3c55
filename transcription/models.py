"""Speech workers announce themselves here; the policy resolver reads who is alive."""

from __future__ import annotations

from django.db import models


class SpeechWorker(models.Model):
    """One live Whisper worker process (Backend A). Its heartbeat keeps ``expires_at`` ahead.

    The registry lives in the database so that it works the same with the embedded defaults
    (web and worker are separate processes sharing SQLite) and in production (PostgreSQL).
    """

    class Kind(models.TextChoices):
        BATCH = "batch"
        STREAM = "stream"

    worker_id = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.BATCH)
    hostname = models.CharField(max_length=200, blank=True)
    model_name = models.CharField(max_length=50, blank=True)
    device = models.CharField(max_length=20, blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.worker_id
