"""Writes for transcription: the speech-worker registry and the life of a transcription job.

Permission checks happen in the API views before these are called. ``job_create`` owns the
transaction that inserts a job and enqueues its task after commit; ``job_run`` is what the Celery
task does on a worker. A long job is split there into pieces that ``piece_run`` transcribes on any
free worker; the last piece to finish joins them. ``_transcribe`` is the only place where a speech
backend is called, and ``_job_complete`` the only place a job is completed and metered.
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
from speech import splitting as pieces
from speech.audio import SAMPLE_RATE, decode_audio
from speech.engines.base import EncodedAudio, TranscribeOptions, TranscriptionResult
from tenants.context import ActorContext
from tenants.models import Backend
from tenants.services import budget_check, policy_get_or_provision, policy_resolve_backend, usage_record
from transcription.failures import JobAttemptsExhausted, JobTimeLimit, failure_of
from transcription.models import SpeechWorker, TranscriptionJob, TranscriptionPiece
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
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    vad_segmentation: bool = True,
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
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        vad_segmentation=vad_segmentation,
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


def job_run(*, job_id: str, worker_id: str, retries_left: bool, queue: str | None = None) -> None:
    """Run one job on this worker: resolve the backend, transcribe, store the result, meter it.

    Audio longer than ``SCAIECHO_LONG_AUDIO_SPLIT_SECONDS`` on Backend A is not transcribed here:
    it is cut into pieces whose tasks go to ``queue`` (the queue this job came from), and the job
    stays ``running`` until the last of them joins the results (:func:`piece_run`).

    A transient error (an unavailable or failing backend) raises :class:`RetryJob` while the task
    has ``retries_left``; every other error, and a transient one on the last try, ends the job
    through :func:`job_fail`.
    """
    if _pieces_resume(job_id=job_id, queue=queue):
        return
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
        cuts = _cut_points(backend=backend, samples=audio.samples)
        if cuts:
            _job_split(job=job, backend=backend, total=audio.samples.size, cuts=cuts, queue=queue)
            return
        original = EncodedAudio(data=data, filename=f"audio.{job.audio_ext}")
        result = _transcribe(job=job, backend=backend, samples=audio.samples, original=original)
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
    _job_complete(
        job=job,
        backend=backend,
        result=result,
        audio_duration_ms=round(audio.duration_s * 1000),
        latency_ms=int((time.monotonic() - started) * 1000),
    )


def _job_complete(
    *, job: TranscriptionJob, backend: str, result: TranscriptionResult, audio_duration_ms: int, latency_ms: int
) -> None:
    """Write the result into the job row and its one usage record, in one transaction (the
    caller's, when it has one); the staged audio goes once that has committed."""
    with transaction.atomic():
        job.status = TranscriptionJob.Status.COMPLETED
        job.status_reason = ""
        job.backend_used = backend
        job.transcript = result.text
        job.language_detected = result.language or ""
        job.audio_duration_ms = audio_duration_ms
        job.segments = _segments_json(result)
        job.completed_at = timezone.now()
        job.save(
            update_fields=[
                "status", "status_reason", "backend_used", "transcript", "language_detected",
                "audio_duration_ms", "segments", "completed_at",
            ]
        )
        usage_record(
            tenant=job.tenant,
            user=job.user,
            api_key=job.api_key,
            backend=backend,
            kind="batch",
            audio_duration_ms=audio_duration_ms,
            latency_ms=latency_ms,
            reference=str(job.id),
        )
        staged = job.staged_path
        transaction.on_commit(lambda: delete_staged(name=staged))


def _requeue(job: TranscriptionJob) -> None:
    """Back to ``queued`` while the task waits to retry, so the job's status tells the truth."""
    job.status = TranscriptionJob.Status.QUEUED
    job.save(update_fields=["status"])


def _transcribe(
    *, job: TranscriptionJob, backend: str, samples: Any, original: EncodedAudio | None
) -> TranscriptionResult:
    from scaiecho_site.engines import engine_for_backend

    options = TranscribeOptions(
        language=job.language_hint or None,
        temperature=job.temperature,
        # Diarization cuts segments between words where the speaker changes.
        word_timestamps=job.word_timestamps or job.diarize,
        prompt=job.prompt or None,
        original=original,
        vad_segmentation=job.vad_segmentation,
    )
    return engine_for_backend(backend).transcribe(samples, options=options)


# --- Long files: pieces on any free worker --------------------------------------------------------
# A long job is cut at pauses into pieces, each a row and a task of its own; a piece that fails
# transiently retries alone, and a piece whose worker died is redelivered (acks_late). The piece
# that finds all the others done joins them into the job row under the job's row lock, so the
# result and the usage record are written exactly once. Lock order everywhere: job, then piece.
#
# Only Backend A is split: the point is to spread our own workers' compute, and the relay does its
# compute elsewhere and gets the upload as sent. A diarized job is split too, and diarized once on
# the joined result (speakers must be matched across the whole file, not per piece).


def _cut_points(*, backend: str, samples: Any) -> list[int]:
    """Where to cut a long Backend A job (at pauses); empty when it runs whole."""
    threshold = settings.SCAIECHO_LONG_AUDIO_SPLIT_SECONDS
    if backend != Backend.A or threshold <= 0 or samples.size <= threshold * SAMPLE_RATE:
        return []
    return pieces.cut_points(samples, piece_seconds=settings.SCAIECHO_LONG_AUDIO_PIECE_SECONDS)


def _job_split(*, job: TranscriptionJob, backend: str, total: int, cuts: list[int], queue: str | None) -> None:
    """Insert the job's pieces and enqueue one task per piece after commit. The job stays
    ``running``; its staged audio stays until the pieces are joined (or the job fails)."""
    with transaction.atomic():
        TranscriptionPiece.objects.bulk_create(
            TranscriptionPiece(job=job, index=index, start_sample=start, end_sample=end, backend=backend)
            for index, (start, end) in enumerate(pieces.ranges(total=total, cuts=cuts))
        )
        _pieces_enqueue(job_id=job.id, queue=queue)
    logger.info("job %s split into %d pieces", job.id, len(cuts) + 1)


def _pieces_enqueue(*, job_id: Any, queue: str | None) -> None:
    """Enqueue the job's queued pieces once the transaction commits."""
    from transcription.tasks import process_transcribe_piece

    ids = list(
        TranscriptionPiece.objects.filter(job_id=job_id, status=TranscriptionPiece.Status.QUEUED).values_list("id", flat=True)
    )

    def enqueue() -> None:
        for piece_id in ids:
            process_transcribe_piece.apply_async(args=[piece_id], queue=queue)

    transaction.on_commit(enqueue)


def _pieces_resume(*, job_id: str, queue: str | None) -> bool:
    """For a redelivered job that was already split: enqueue its queued pieces again (their tasks
    may have been lost with the worker that split it; a duplicate finds its piece taken) and say
    that there is nothing else to do. ``False`` for a job that has no pieces."""
    with transaction.atomic():
        job = TranscriptionJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or not job.pieces.exists():
            return False
        if not job.is_terminal:
            _pieces_enqueue(job_id=job.id, queue=queue)
        return True


def _piece_claim(*, piece_id: int, worker_id: str) -> TranscriptionPiece | None:
    """Mark the piece running on this worker, or ``None`` when there is nothing left to do
    (the piece is done, or its job has finished or failed). As :func:`_claim` does for a job,
    a piece held by a worker that still looks alive raises :class:`JobBusyElsewhere`, and a piece
    delivered more than ``SCAIECHO_JOB_MAX_ATTEMPTS`` times fails its job."""
    job_id = TranscriptionPiece.objects.filter(pk=piece_id).values_list("job_id", flat=True).first()
    if job_id is None:
        return None
    with transaction.atomic():
        job = TranscriptionJob.objects.select_for_update().filter(pk=job_id).first()
        piece = TranscriptionPiece.objects.select_for_update().filter(pk=piece_id).first()
        if job is None or piece is None or job.is_terminal or piece.status == TranscriptionPiece.Status.COMPLETED:
            return None
        if piece.status == TranscriptionPiece.Status.RUNNING and piece.worker_id and piece.worker_id != worker_id:
            if SpeechWorker.objects.filter(worker_id=piece.worker_id, expires_at__gt=timezone.now()).exists():
                raise JobBusyElsewhere(piece.worker_id)
        piece.attempts += 1
        if piece.attempts > settings.SCAIECHO_JOB_MAX_ATTEMPTS:
            job_fail(job=job, error=JobAttemptsExhausted())
            return None
        piece.status = TranscriptionPiece.Status.RUNNING
        piece.worker_id = worker_id
        piece.started_at = timezone.now()
        piece.save(update_fields=["status", "worker_id", "started_at", "attempts"])
        piece.job = job
        return piece


def piece_run(*, piece_id: int, worker_id: str, retries_left: bool) -> None:
    """Transcribe one piece of a long job on this worker and store its result; the piece that
    completes the set joins them into the job (result, diarization, the one usage record).

    Errors follow :func:`job_run`: a transient one raises :class:`RetryJob` while the task has
    ``retries_left`` (this piece alone is retried; the job stays ``running``), and any other
    fails the whole job through :func:`job_fail`.
    """
    piece = _piece_claim(piece_id=piece_id, worker_id=worker_id)
    if piece is None:
        return
    job = piece.job
    try:
        data = read_staged(name=job.staged_path)
        samples = decode_audio(data, max_duration_s=settings.SCAIECHO_MAX_AUDIO_SECONDS).samples
        result = _transcribe(
            job=job, backend=piece.backend, samples=samples[piece.start_sample : piece.end_sample], original=None
        )
        start_s, end_s = piece.start_sample / SAMPLE_RATE, piece.end_sample / SAMPLE_RATE
        result = pieces.shifted(result, start_s=start_s, end_s=end_s)
    except errors.ApplicationError as exc:
        if exc.transient and retries_left:
            _piece_requeue(piece)
            raise RetryJob(exc) from exc
        job_fail_running(job_id=job.id, error=exc)
        return
    except Exception as exc:
        logger.exception("piece %s of job %s failed unexpectedly", piece.index, job.id)
        job_fail_running(job_id=job.id, error=exc)
        return
    try:
        _piece_complete(piece=piece, result=result, samples=samples)
    except Exception as exc:  # the join (diarization, most likely) must not leave the job running
        logger.exception("joining job %s failed unexpectedly", job.id)
        job_fail_running(job_id=job.id, error=exc)


def _piece_complete(*, piece: TranscriptionPiece, result: TranscriptionResult, samples: Any) -> None:
    """Store the piece's result and, when it is the last, join all of them into the job.

    Both happen in one transaction under the job's row lock: two pieces finishing together join
    once, and a worker that dies while joining leaves its piece to be redelivered and join again.
    """
    with transaction.atomic():
        job = TranscriptionJob.objects.select_for_update().filter(pk=piece.job_id).first()
        if job is None or job.is_terminal:  # another piece failed it meanwhile
            return
        piece.status = TranscriptionPiece.Status.COMPLETED
        piece.result = pieces.result_to_json(result)
        piece.completed_at = timezone.now()
        piece.save(update_fields=["status", "result", "completed_at"])
        rows = list(job.pieces.order_by("index"))
        if any(row.status != TranscriptionPiece.Status.COMPLETED for row in rows):
            return
        duration_s = rows[-1].end_sample / SAMPLE_RATE
        joined = pieces.joined([pieces.result_from_json(row.result) for row in rows], duration_s=duration_s)
        if job.diarize:
            joined = _diarize(job=job, audio=samples, result=joined)
        _job_complete(
            job=job,
            backend=piece.backend,
            result=joined,
            audio_duration_ms=round(duration_s * 1000),
            latency_ms=int((timezone.now() - job.started_at).total_seconds() * 1000),
        )
        # The job row now holds the transcript: no second copy in the pieces.
        job.pieces.update(result=None)
    logger.info("job %s joined from %d pieces", job.id, len(rows))


def _piece_requeue(piece: TranscriptionPiece) -> None:
    piece.status = TranscriptionPiece.Status.QUEUED
    piece.save(update_fields=["status"])


def piece_fail_running(*, piece_id: int, error: BaseException) -> None:
    """Fail the piece's job if it is still running (the piece's task hit its time limit)."""
    job_id = TranscriptionPiece.objects.filter(pk=piece_id).values_list("job_id", flat=True).first()
    if job_id is not None:
        job_fail_running(job_id=job_id, error=error)


def _diarize(*, job: TranscriptionJob, audio: Any, result: TranscriptionResult) -> TranscriptionResult:
    """Attribute each word to the tenant's enrolled speakers (or ``SPEAKER_n``), on this worker,
    by clustering the voices of the whole recording (``speakers.diarization.diarize_recording``).

    Whichever backend transcribed, the voices are compared here, with this worker's own speaker
    model: no voice data goes to the relay. The transcription asked for word timestamps (see
    ``_transcribe``) so that segments can be cut between words; they are dropped again unless
    the client asked for them.
    """
    from scaiecho_site.engines import speaker_encoder
    from speakers.diarization import diarize_recording
    from speakers.selectors import speaker_candidates

    segments = diarize_recording(
        audio,
        result.segments,
        encoder=speaker_encoder(),
        candidates=speaker_candidates(tenant_id=job.tenant_id, speaker_ids=job.speaker_ids),
        num_speakers=job.num_speakers,
        min_speakers=job.min_speakers,
        max_speakers=job.max_speakers,
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
    stale = (
        TranscriptionJob.objects.filter(status=TranscriptionJob.Status.RUNNING, started_at__lt=cutoff)
        # A split job lives as long as its pieces: waiting in the queue, or started recently.
        .exclude(pieces__status=TranscriptionPiece.Status.QUEUED)
        .exclude(pieces__started_at__gte=cutoff)
    )
    count = 0
    for job in stale:
        job_fail(job=job, error=JobTimeLimit())
        count += 1
    return count
