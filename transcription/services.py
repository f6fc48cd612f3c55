"""Writes for transcription: the speech-worker registry and the life of a transcription job.

Permission checks happen in the API views before these are called. ``job_create`` owns the
transaction that inserts a job and enqueues its task after commit; ``job_run`` is what the Celery
task does on a worker, and it is the only place where a speech backend is called.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from scaiecho_site import errors
from speech.audio import decode_audio
from speech.engines.base import EncodedAudio, TranscribeOptions, TranscriptionResult
from tenants.context import ActorContext
from tenants.services import budget_check, policy_get_or_provision, policy_resolve_backend, usage_record
from transcription.failures import JobAttemptsExhausted, JobTimeLimit, failure_of
from transcription.models import SpeechWorker, TranscriptionJob
from transcription.storage import delete_staged, read_staged, stage_upload

logger = logging.getLogger("scaiecho.transcription")



# --- Worker registry -----------------------------------------------------------------------------


def worker_heartbeat(
    *,
    worker_id: str,
    kind: str = SpeechWorker.Kind.BATCH,
    hostname: str = "",
    model_name: str = "",
    device: str = "",
    ttl_seconds: float | None = None,
) -> SpeechWorker:
    """Announce a worker as alive for the next ``ttl_seconds``
    (default ``SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS``)."""
    now = timezone.now()
    ttl = settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS if ttl_seconds is None else ttl_seconds
    worker, _ = SpeechWorker.objects.update_or_create(
        worker_id=worker_id,
        defaults={
            "kind": kind,
            "hostname": hostname,
            "model_name": model_name,
            "device": device,
            "last_seen_at": now,
            "expires_at": now + timedelta(seconds=ttl),
        },
    )
    return worker


def worker_retire(*, worker_id: str) -> None:
    """A worker shutting down cleanly stops counting at once instead of waiting out its TTL."""
    SpeechWorker.objects.filter(worker_id=worker_id).delete()


# --- Jobs ----------------------------------------------------------------------------------------


def job_create(
    *,
    ctx: ActorContext,
    data: bytes,
    ext: str,
    is_async: bool,
    backend_preference: str = "any",
    language_hint: str = "",
    temperature: float | None = None,
    word_timestamps: bool = False,
    prompt: str = "",
    source: str = TranscriptionJob.Source.API,
    diarize: bool = False,
    speaker_ids: list[str] | None = None,
) -> TranscriptionJob:
    """Stage the audio, insert the queued job, and enqueue ``process_transcribe_job`` after commit.

    The budget is checked first, so a tenant over a blocking budget gets ``BUDGET_EXCEEDED``
    before anything is stored or spent.
    """
    from transcription.tasks import process_transcribe_job

    tenant = ctx.tenant
    budget_check(tenant=tenant, ctx=ctx)
    job = TranscriptionJob(
        tenant=tenant,
        user=ctx.user,
        api_key=ctx.api_key,
        source=source,
        is_async=is_async,
        backend_preference=backend_preference,
        language_hint=language_hint,
        temperature=temperature,
        word_timestamps=word_timestamps,
        prompt=prompt,
        diarize=diarize,
        speaker_ids=list(speaker_ids or []),
        audio_sha256=hashlib.sha256(data).hexdigest(),
        audio_bytes=len(data),
        audio_ext=ext,
    )
    job.staged_path = stage_upload(job_id=str(job.id), ext=ext, data=data)
    try:
        with transaction.atomic():
            job.save()
            transaction.on_commit(lambda: process_transcribe_job.delay(str(job.id)))
    except Exception:
        delete_staged(name=job.staged_path)
        raise
    return job


def job_wait(*, job_id: Any, timeout_s: float) -> TranscriptionJob:
    """Wait for a job to finish on a worker (the inline path). Polls the row: it is the result."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        job = TranscriptionJob.objects.filter(pk=job_id).first()
        if job is None:  # deleted while we waited (its tenant was removed)
            raise errors.NotFound("The transcription job no longer exists.")
        if job.is_terminal or time.monotonic() >= deadline:
            return job
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def job_fail(*, job: TranscriptionJob, error: BaseException) -> None:
    """End ``job`` as failed with the reason and code :data:`transcription.failures.FAILURES` gives
    ``error``, and delete its staged audio. The one place a job fails."""
    reason, code = failure_of(error)
    job.status = TranscriptionJob.Status.FAILED
    job.status_reason = reason
    job.error_code = code
    job.completed_at = timezone.now()
    job.save(update_fields=["status", "status_reason", "error_code", "completed_at"])
    delete_staged(name=job.staged_path)


def job_fail_running(*, job_id: Any, error: BaseException) -> None:
    """Fail the job if it is still running (the task hit its time limit)."""
    with transaction.atomic():
        job = TranscriptionJob.objects.select_for_update().filter(pk=job_id, status=TranscriptionJob.Status.RUNNING).first()
        if job is not None:
            job_fail(job=job, error=error)


class JobBusyElsewhere(Exception):  # noqa: N818 - a state, like FileExistsError
    """Another live worker is running this job; look again once its heartbeat could lapse."""


def _claim(*, job_id: str, worker_id: str) -> TranscriptionJob | None:
    """Mark the job running on this worker, or ``None`` when there is nothing left to do.

    A redelivered job whose worker died is claimed again. While the worker that holds it still
    looks alive, ``JobBusyElsewhere`` asks the task to come back later, so a redelivery that
    arrives before the dead worker's heartbeat lapses does not drop the job.
    """
    with transaction.atomic():
        job = TranscriptionJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.is_terminal:
            return None
        if job.status == TranscriptionJob.Status.RUNNING and job.worker_id and job.worker_id != worker_id:
            if SpeechWorker.objects.filter(worker_id=job.worker_id, expires_at__gt=timezone.now()).exists():
                raise JobBusyElsewhere(job.worker_id)
        job.attempts += 1
        if job.attempts > settings.SCAIECHO_JOB_MAX_ATTEMPTS:
            job_fail(job=job, error=JobAttemptsExhausted())
            return None
        job.status = TranscriptionJob.Status.RUNNING
        job.worker_id = worker_id
        job.started_at = timezone.now()
        job.save(update_fields=["status", "worker_id", "started_at", "attempts"])
        return job


def _segments_json(result: TranscriptionResult) -> list[dict[str, Any]]:
    segments = []
    for segment in result.segments:
        item = {key: value for key, value in asdict(segment).items() if value is not None}
        if segment.speaker_label is not None:  # diarized: an anonymous voice keeps speaker_id null
            item["speaker_id"] = segment.speaker_id
        segments.append(item)
    return segments


class RetryJob(Exception):  # noqa: N818 - an instruction to the task, not a failure
    """A transient error the task retries (``autoretry_for``); the job is back in ``queued``."""

    def __init__(self, error: errors.ApplicationError) -> None:
        self.error = error
        super().__init__(f"{error.code}: {error.message}")


def job_run(*, job_id: str, worker_id: str, retries_left: bool) -> None:
    """Run one job on this worker: resolve the backend, transcribe, store the result, meter it.

    A transient error (an unavailable or failing backend) raises :class:`RetryJob` while the task
    has ``retries_left``; every other error, and a transient one on the last try, ends the job
    through :func:`job_fail`.
    """
    job = _claim(job_id=job_id, worker_id=worker_id)
    if job is None:
        return
    tenant = job.tenant
    started = time.monotonic()
    try:
        budget_check(tenant=tenant)
        backend = policy_resolve_backend(policy=policy_get_or_provision(tenant=tenant), preference=job.backend_preference)
        data = read_staged(name=job.staged_path)
        audio = decode_audio(data, max_duration_s=settings.SCAIECHO_MAX_AUDIO_SECONDS)
        result = _transcribe(job=job, backend=backend, data=data, audio=audio)
        if job.diarize:
            result = _diarize(job=job, audio=audio.samples, result=result)
    except errors.ApplicationError as exc:
        if exc.transient and retries_left:
            _requeue(job)
            raise RetryJob(exc) from exc
        job_fail(job=job, error=exc)
        return
    except Exception as exc:  # a bug must end the job visibly, not leave it running
        logger.exception("job %s failed unexpectedly", job.id)
        job_fail(job=job, error=exc)
        return
    latency_ms = int((time.monotonic() - started) * 1000)
    with transaction.atomic():
        job.status = TranscriptionJob.Status.COMPLETED
        job.status_reason = ""
        job.backend_used = backend
        job.transcript = result.text
        job.language_detected = result.language or ""
        job.audio_duration_ms = round(audio.duration_s * 1000)
        job.segments = _segments_json(result)
        job.completed_at = timezone.now()
        job.save(
            update_fields=[
                "status", "status_reason", "backend_used", "transcript", "language_detected",
                "audio_duration_ms", "segments", "completed_at",
            ]
        )
        usage_record(
            tenant=tenant,
            user=job.user,
            api_key=job.api_key,
            backend=backend,
            kind="batch",
            audio_duration_ms=job.audio_duration_ms,
            latency_ms=latency_ms,
            reference=str(job.id),
        )
    delete_staged(name=job.staged_path)


def _requeue(job: TranscriptionJob) -> None:
    """Back to ``queued`` while the task waits to retry, so the job's status tells the truth."""
    job.status = TranscriptionJob.Status.QUEUED
    job.save(update_fields=["status"])


def _transcribe(*, job: TranscriptionJob, backend: str, data: bytes, audio: Any) -> TranscriptionResult:
    from scaiecho_site.engines import engine_for_backend

    options = TranscribeOptions(
        language=job.language_hint or None,
        temperature=job.temperature,
        # Diarization cuts segments between words where the speaker changes.
        word_timestamps=job.word_timestamps or job.diarize,
        prompt=job.prompt or None,
        original=EncodedAudio(data=data, filename=f"audio.{job.audio_ext}"),
    )
    return engine_for_backend(backend).transcribe(audio.samples, options=options)


def _diarize(*, job: TranscriptionJob, audio: Any, result: TranscriptionResult) -> TranscriptionResult:
    """Attribute the segments to the tenant's enrolled speakers (or ``SPEAKER_n``), on this worker.

    Whichever backend transcribed, the voices are compared here, with this worker's own speaker
    model: no voice data goes to the relay.
    """
    from scaiecho_site.engines import speaker_encoder
    from speakers.diarization import SpeakerTracker, diarize_segments
    from speakers.selectors import speaker_candidates

    segments = diarize_segments(
        audio,
        result.segments,
        encoder=speaker_encoder(),
        tracker=SpeakerTracker(),
        candidates=speaker_candidates(tenant_id=job.tenant_id, speaker_ids=job.speaker_ids),
    )
    if not job.word_timestamps:
        segments = [replace(segment, words=None) for segment in segments]
    return replace(result, segments=segments)


def jobs_fail_stale(*, now: Any = None) -> int:
    """Fail jobs running far past the hard time limit (their worker vanished without a trace).

    Redelivery normally rescues a dead worker's job; this is the backstop that keeps any job
    from staying ``running`` forever.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS * 2)
    stale = TranscriptionJob.objects.filter(status=TranscriptionJob.Status.RUNNING, started_at__lt=cutoff)
    count = 0
    for job in stale:
        job_fail(job=job, error=JobTimeLimit())
        count += 1
    return count
