"""Speech workers and transcription jobs."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models


class SpeechWorker(models.Model):
    """One live Whisper worker process (Backend A). Its heartbeat keeps ``expires_at`` ahead.

    The registry lives in the database so that it works the same with the embedded defaults
    (web and worker are separate processes sharing SQLite) and in production (PostgreSQL).
    """

    class Kind(models.TextChoices):
        BATCH = "batch"
        STREAM = "stream"
        WEBHOOK = "webhook"  # delivers webhooks only: no model, never Backend A

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


class TranscriptionJob(models.Model):
    """One batch transcription, inline or asynchronous. The row is the result: no result backend."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"

    TERMINAL = (Status.COMPLETED, Status.FAILED)

    class Source(models.TextChoices):
        API = "api"
        OPENAI = "openai"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="transcription_jobs")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey("tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.API)
    is_async = models.BooleanField(default=False)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    status_reason = models.CharField(max_length=200, blank=True)
    error_code = models.CharField(max_length=50, blank=True, db_index=True)

    # What the client asked for.
    backend_preference = models.CharField(max_length=20, default="any")
    language_hint = models.CharField(max_length=2, blank=True)
    temperature = models.FloatField(null=True, blank=True)
    word_timestamps = models.BooleanField(default=False)
    prompt = models.TextField(blank=True)
    diarize = models.BooleanField(default=False)
    # Diarization hints (pyannote/whisperX style): an exact count, or bounds for the estimate.
    num_speakers = models.PositiveSmallIntegerField(null=True, blank=True)
    min_speakers = models.PositiveSmallIntegerField(null=True, blank=True)
    max_speakers = models.PositiveSmallIntegerField(null=True, blank=True)
    # Decode speech regions found by VAD one window at a time (the default); off decodes the file
    # as one stream, for comparison.
    vad_segmentation = models.BooleanField(default=True)
    # Limits diarization to these enrolled speakers (ids as strings); empty: all ready speakers.
    speaker_ids = models.JSONField(default=list, blank=True)
    # Called when the job completes or fails: the request's webhook_url, else the tenant's default
    # at the time the job was created; empty: no webhook.
    webhook_url = models.CharField(max_length=2048, blank=True)

    # The audio.
    audio_sha256 = models.CharField(max_length=64)
    audio_bytes = models.BigIntegerField()
    audio_ext = models.CharField(max_length=8)
    staged_path = models.CharField(max_length=300, blank=True)
    # What the job holds against the tenant's budgets while it is queued or running: its declared
    # length at admission (the real one once a worker has decoded it) and that audio's cost at the
    # highest price of the backends it may use. A finished job's usage record counts instead; the
    # columns stay as they were, for the record.
    reserved_audio_ms = models.BigIntegerField(default=0)
    reserved_cost = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))

    # The result.
    backend_used = models.CharField(max_length=1, blank=True)
    language_detected = models.CharField(max_length=16, blank=True)
    audio_duration_ms = models.BigIntegerField(null=True, blank=True)
    transcript = models.TextField(blank=True)
    segments = models.JSONField(null=True, blank=True)

    attempts = models.PositiveIntegerField(default=0)
    worker_id = models.CharField(max_length=200, blank=True)
    # The Celery queue the job's task came from ("" for the default): its pieces, and a job or
    # piece the sweep puts back, go to the same queue and so to the same workers.
    queue = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "user", "-created_at"], name="job_tenant_user_created"),
            # Fair dispatch reads the jobs finished in the last hour.
            models.Index(fields=["completed_at"], name="job_completed_at"),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class TranscriptionPiece(models.Model):
    """One slice of a long job, transcribed by its own task on whichever worker is free.

    A job longer than ``SCAIECHO_LONG_AUDIO_SPLIT_SECONDS`` is cut at pauses into pieces; each
    piece stores its result here (timestamps already shifted to the whole file's clock) and the
    piece that finds all of them done joins them into the job row, which stays the one result.
    The sample range is in the job's decoded audio (16 kHz mono), so a piece re-reads the staged
    upload rather than a copy of its slice.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"

    job = models.ForeignKey(TranscriptionJob, on_delete=models.CASCADE, related_name="pieces")
    index = models.PositiveIntegerField()
    start_sample = models.BigIntegerField()
    end_sample = models.BigIntegerField()
    # The backend resolved once, when the job was split: every piece of a job uses the same one.
    backend = models.CharField(max_length=1)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    # {"text": ..., "language": ..., "segments": [...]}, segments and words on the job's clock.
    result = models.JSONField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    worker_id = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="piece_job_index_unique")]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.index} ({self.status})"


class WebhookDelivery(models.Model):
    """One webhook event of a job (``transcription.completed`` or ``transcription.failed``) and
    its delivery: the body is fixed when the job finishes, so every attempt sends the same bytes
    under the same ``webhook-id`` (each with its own timestamp and signature)."""

    class Status(models.TextChoices):
        PENDING = "pending"  # the first attempt, or a retry, is still to come
        DELIVERED = "delivered"  # a 2xx answer
        FAILED = "failed"  # a 4xx or 3xx answer, a refused destination, or attempts used up

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="webhook_deliveries")
    job = models.ForeignKey(TranscriptionJob, on_delete=models.CASCADE, related_name="webhook_deliveries")
    event_type = models.CharField(max_length=50)
    url = models.CharField(max_length=2048)
    body = models.TextField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # While an attempt waits for the receiver: until when (a worker that died mid-attempt holds it
    # no longer than that). Bounds the tenant's attempts in flight (SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT).
    in_flight_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["tenant", "in_flight_until"], name="webhook_tenant_in_flight")]

    def __str__(self) -> str:
        return f"{self.event_type} for job {self.job_id} ({self.status})"

    @property
    def message_id(self) -> str:
        """The ``webhook-id`` header, the same for every attempt."""
        return f"msg_{self.id.hex}"


class WebhookAttempt(models.Model):
    """One POST of a delivery, as the receiver answered it (or why it got no answer)."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_rows")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    response_excerpt = models.TextField(blank=True)
    next_retry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [models.UniqueConstraint(fields=["delivery", "number"], name="webhook_attempt_delivery_number_unique")]

    def __str__(self) -> str:
        return f"attempt {self.number}: {self.status_code or self.error}"
