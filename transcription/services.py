"""Writes for transcription: the speech-worker registry and the life of a transcription job.

Permission checks happen in the API views before these are called. ``job_create`` owns the
transaction that inserts a job and enqueues its task after commit; ``job_run`` is what the Celery
task does on a worker. A long job is split there into pieces that ``piece_run`` transcribes on any
free worker; the last piece to finish joins them. ``_transcribe`` is the only place where a speech
backend is called, and ``job_complete`` the only place a job is completed and metered.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from scaiecho_site import errors
from scaiecho_site.celery import enqueue_or_raise
from scaiecho_site.metrics import observe_inference
from speakers.services import segments_anonymize, segments_without_erased_speakers
from speech import splitting as pieces
from speech.audio import SAMPLE_RATE, DecodedAudio, decode_audio, probe_audio
from speech.engines.base import EncodedAudio, TranscribeOptions, TranscriptionResult
from speech.errors import AudioOverBudget
from tenants.context import ActorContext
from tenants.models import Backend, Tenant
from tenants.selectors import Reservation
from tenants.services import (
    backend_candidates,
    budget_check,
    budget_reserve,
    policy_get_or_provision,
    policy_resolve_backend,
    usage_record,
)
from transcription.failures import JobAttemptsExhausted, JobQueuedTooLong, JobTimeLimit, failure_of
from transcription.models import SpeechWorker, TranscriptionJob, TranscriptionPiece, WebhookDelivery
from transcription.notify import job_done_publish, job_done_subscription
from transcription.selectors import dispatch_yields, jobs_reserved
from transcription.storage import delete_staged, read_staged, stage_upload
from transcription.webhooks import delivery_create

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


def worker_claimant(*, node: str) -> str:
    """Who claims a job: the worker node (its heartbeat row) and this process, ``node#pid``.

    Pool processes of one node share its heartbeat; the pid tells whether the very process that
    claimed a job is still there when its node is alive (a pool process killed alone)."""
    return f"{node}#{os.getpid()}"


def claimant_node(worker_id: str) -> str:
    """The node of a claim made by :func:`worker_claimant` (a bare node name stays itself)."""
    node, sep, pid = worker_id.rpartition("#")
    return node if sep and pid.isdigit() else worker_id


def _claimant_alive(holder: str, *, me: str = "") -> bool:
    """Whether the process that claimed a job may still be running it: its node's heartbeat is
    current and, when the node is this worker's own (so the same host), its process exists."""
    node = claimant_node(holder)
    if not SpeechWorker.objects.filter(worker_id=node, expires_at__gt=timezone.now()).exists():
        return False
    if me and node == claimant_node(me) and holder != node:
        return _process_exists(int(holder.rpartition("#")[2]))
    return True


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


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
    webhook_url: str | None = None,
) -> TranscriptionJob:
    """Stage the audio, insert the queued job, and enqueue ``process_transcribe_job`` after commit.

    ``webhook_url`` (checked by the caller: ``tenants.services.webhook_destination_accept``) is
    called when the job finishes; ``None`` takes the tenant policy's default, if any.

    The job reserves its declared audio duration (and that audio's cost at the highest price of
    the backends the tenant's policy and ``backend_preference`` allow) against the tenant's
    blocking budgets, in the transaction that inserts it, so parallel admissions cannot overspend
    together: what is left is the limit less the finished usage less what the tenant's other
    unfinished jobs hold. A tenant over a blocking budget, or audio longer than what is left, gets
    ``BUDGET_EXCEEDED`` before anything is stored: the check runs once before the upload is
    staged and again, under the budget rows' lock, with the insert (a request that loses a race
    there has its staged copy deleted at once). The reservation ends with the job: completed, its
    usage record counts instead; failed, nothing does.
    """
    from transcription.tasks import process_transcribe_job

    tenant = ctx.tenant
    budget_check(tenant=tenant, ctx=ctx)  # a used-up budget: 429 with retry_after, audited
    policy = policy_get_or_provision(tenant=tenant)
    backends = backend_candidates(
        allowed_backends=policy.allowed_backends, default_backend=policy.default_backend, preference=backend_preference
    )
    declared_s = probe_audio(data).duration_s  # headers only; None when the container does not say

    def reserve() -> Reservation:
        # Tenants may not import jobs, so the reservations of unfinished jobs are read here and
        # passed in; budget_reserve calls this once it holds the lock on the budget rows.
        return budget_reserve(
            tenant=tenant,
            audio_ms=None if declared_s is None else round(declared_s * 1000),
            longest_ms=settings.SCAIECHO_MAX_AUDIO_SECONDS * 1000,
            backends=backends,
            held=lambda: jobs_reserved(tenant_id=tenant.pk),
        )

    with transaction.atomic():
        _queue_room(ctx=ctx)
        reserve()  # refuse what does not fit before the upload is stored
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
        webhook_url=policy.webhook_url if webhook_url is None else webhook_url,
        audio_sha256=hashlib.sha256(data).hexdigest(),
        audio_bytes=len(data),
        audio_ext=ext,
    )
    job.staged_path = stage_upload(job_id=str(job.id), ext=ext, data=data)
    try:
        with transaction.atomic():
            _queue_room(ctx=ctx)
            reservation = reserve()
            job.reserved_audio_ms, job.reserved_cost = reservation.audio_ms, reservation.cost
            job.save()
            # Sent before the commit, not after it: a web process that dies in between then
            # leaves a task without a row (the worker waits for the row a moment, then drops it,
            # and the client never got an answer), never a queued row without a task. A broker
            # that cannot take it rolls the row back: 503, nothing stored, nothing billed.
            enqueue_or_raise(process_transcribe_job, str(job.id))
    except Exception:
        delete_staged(name=job.staged_path)
        raise
    return job


def _queue_room(*, ctx: ActorContext) -> None:
    """Refuse a new job when the key or the tenant already has as many unfinished (queued or
    running) jobs as ``SCAIECHO_MAX_UNFINISHED_JOBS_PER_KEY`` / ``_PER_TENANT`` allow: 429
    ``RATE_LIMITED``. Runs in the admitting transaction under a lock on the tenant's row, so that
    parallel admissions of one tenant take turns and cannot all pass together."""
    Tenant.objects.select_for_update().filter(pk=ctx.tenant.pk).first()
    unfinished = TranscriptionJob.objects.filter(
        tenant=ctx.tenant, status__in=(TranscriptionJob.Status.QUEUED, TranscriptionJob.Status.RUNNING)
    )
    limits = [("tenant", unfinished, settings.SCAIECHO_MAX_UNFINISHED_JOBS_PER_TENANT)]
    if ctx.api_key is not None:
        limits.insert(0, ("key", unfinished.filter(api_key=ctx.api_key), settings.SCAIECHO_MAX_UNFINISHED_JOBS_PER_KEY))
    for who, jobs, limit in limits:
        if jobs.count() >= limit:
            raise errors.RateLimited(
                f"This {who} already has {limit} unfinished transcription jobs; wait for some to finish.",
                retry_after=settings.SCAIECHO_QUEUE_FULL_RETRY_AFTER_SECONDS,
            )


def row_visible(model: Any, pk: Any) -> bool:
    """Whether the row ``pk`` exists, waiting up to ``SCAIECHO_TASK_ROW_WAIT_SECONDS`` for the
    transaction that sent its task (before committing) to commit it."""
    deadline = time.monotonic() + settings.SCAIECHO_TASK_ROW_WAIT_SECONDS
    while not model.objects.filter(pk=pk).exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def job_wait(*, job_id: Any, timeout_s: float, heartbeat: Callable[[], None] | None = None) -> TranscriptionJob:
    """Wait up to ``timeout_s`` for a job to finish on a worker (the inline path); the row is the
    result, returned finished or, at the deadline, as it stands.

    With Redis the wait blocks on the job's finished notification (:mod:`transcription.notify`),
    reading the row once subscribed (a job that finished before that is not missed) and then every
    ``SCAIECHO_INLINE_RECHECK_SECONDS`` (a lost notification costs at most that); without Redis it
    polls the row. The database connection is closed while it waits (unless the caller holds a
    transaction), so waiters do not pin connections. ``heartbeat`` is called each time it wakes
    (the inline request's slot refresh, :class:`transcription.limits.InlineWait`).
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    with job_done_subscription(job_id=job_id) as subscription:
        while True:
            job = TranscriptionJob.objects.filter(pk=job_id).first()
            if job is None:  # deleted while we waited (its tenant was removed)
                raise errors.NotFound("The transcription job no longer exists.")
            remaining = deadline - time.monotonic()
            if job.is_terminal or remaining <= 0:
                return job
            _release_connection()
            if heartbeat is not None:
                heartbeat()
            if subscription is not None and subscription.alive:
                subscription.wait(min(remaining, settings.SCAIECHO_INLINE_RECHECK_SECONDS))
            else:
                time.sleep(min(delay, remaining))
                delay = min(delay * 1.5, 0.1)


def _release_connection() -> None:
    """Close this thread's database connection while it only waits; the next query reopens one.
    Not inside a transaction: that belongs to the caller."""
    if not connection.in_atomic_block:
        connection.close()


def _notify_done(job: TranscriptionJob) -> None:
    """Wake the job's inline waiter once the transaction that finished the job has committed, and
    send its webhook (:mod:`transcription.webhooks`) if it has one."""
    job_id = job.id
    transaction.on_commit(lambda: job_done_publish(job_id=job_id))
    _webhook_send(job)


def _webhook_send(job: TranscriptionJob) -> None:
    """Write the finished job's webhook event with the change that finished it, and enqueue its
    delivery once that commits. Inline jobs too: a job with a webhook_url gets its call whichever
    way it was asked for. An event whose task cannot be queued stays pending until the sweep
    sends it again (:func:`_webhooks_resend_stalled`)."""
    from transcription.tasks import deliver_webhook

    delivery = delivery_create(job=job)
    if delivery is None:
        return
    delivery_id = str(delivery.id)

    def send() -> None:
        try:
            enqueue_or_raise(deliver_webhook, delivery_id)
        except errors.QueueUnavailable:
            logger.error("webhook %s of job %s: the queue is unavailable; the event stays pending", delivery_id, job.id)

    transaction.on_commit(send)


def job_fail(*, job: TranscriptionJob, error: BaseException) -> None:
    """End ``job`` as failed with the reason and code :data:`transcription.failures.FAILURES` gives
    ``error``, and delete its staged audio. The one place a job fails."""
    reason, code = failure_of(error)
    job.status = TranscriptionJob.Status.FAILED
    job.status_reason = reason
    job.error_code = code
    job.completed_at = timezone.now()
    with transaction.atomic():  # the failure and its webhook event, together
        job.save(update_fields=["status", "status_reason", "error_code", "completed_at"])
        delete_staged(name=job.staged_path)
        _notify_done(job)


def job_fail_running(*, job_id: Any, error: BaseException) -> None:
    """Fail the job if it is still running (the task hit its time limit)."""
    with transaction.atomic():
        job = (
            TranscriptionJob.objects.select_for_update()
            .filter(pk=job_id, status=TranscriptionJob.Status.RUNNING)
            .first()
        )
        if job is not None:
            job_fail(job=job, error=error)


def job_release_claim(*, job_id: Any, worker_id: str) -> None:
    """Put a job ``worker_id`` claimed back to ``queued``, for its task to run it again: what the
    task does when the database connection broke under it (nothing after the claim was
    committed). Without it a retry delivered to another process of the node would find the job
    ``running`` under a claimant that is still alive, and wait on it for ever."""
    TranscriptionJob.objects.filter(pk=job_id, status=TranscriptionJob.Status.RUNNING, worker_id=worker_id).update(
        status=TranscriptionJob.Status.QUEUED
    )


def piece_release_claim(*, piece_id: int, worker_id: str) -> None:
    """As :func:`job_release_claim`, for a piece of a long job."""
    TranscriptionPiece.objects.filter(
        pk=piece_id, status=TranscriptionPiece.Status.RUNNING, worker_id=worker_id
    ).update(status=TranscriptionPiece.Status.QUEUED)


class JobBusyElsewhere(Exception):  # noqa: N818 - a state, like FileExistsError
    """Another live worker is running this job; look again once its heartbeat could lapse."""


def _claim(*, job_id: str, worker_id: str, queue: str | None = None) -> TranscriptionJob | None:
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
            if _claimant_alive(job.worker_id, me=worker_id):
                raise JobBusyElsewhere(job.worker_id)
        job.attempts += 1
        if job.attempts > settings.SCAIECHO_JOB_MAX_ATTEMPTS:
            job_fail(job=job, error=JobAttemptsExhausted())
            return None
        job.status = TranscriptionJob.Status.RUNNING
        job.worker_id = worker_id
        job.queue = queue or ""
        job.started_at = timezone.now()
        job.save(update_fields=["status", "worker_id", "queue", "started_at", "attempts"])
        return job


def _segments_json(result: TranscriptionResult) -> list[dict[str, Any]]:
    segments = []
    for segment in result.segments:
        item = {key: value for key, value in asdict(segment).items() if value is not None}
        if segment.speaker_label is not None:  # diarized: an anonymous voice keeps speaker_id null
            item["speaker_id"] = segment.speaker_id
        segments.append(item)
    return segments


class TenantYields(Exception):  # noqa: N818 - an instruction to the task, like RetryJob
    """Another tenant with work waiting has had less of the workers: this task goes back to the
    queue for ``SCAIECHO_FAIR_YIELD_SECONDS`` (not a retry, not an attempt) and the worker moves on."""


def _dispatch_turn(*, tenant_id: Any, may_yield: bool) -> None:
    """Raise :class:`TenantYields` when this tenant should let another go first
    (:func:`transcription.selectors.dispatch_yields`). A task yields at most
    ``SCAIECHO_FAIR_MAX_YIELDS`` times (``may_yield`` says whether it still may), so work waits
    a bounded time even when the tenant it makes way for has nothing the broker can deliver yet
    (a retry's backoff, say)."""
    if may_yield and dispatch_yields(tenant_id=tenant_id):
        raise TenantYields(str(tenant_id))


class RetryJob(Exception):  # noqa: N818 - an instruction to the task, not a failure
    """A transient error the task retries (``autoretry_for``); the job is back in ``queued``."""

    def __init__(self, error: errors.ApplicationError) -> None:
        self.error = error
        super().__init__(f"{error.code}: {error.message}")


def job_run(
    *, job_id: str, worker_id: str, retries_left: bool, queue: str | None = None, may_yield: bool = False
) -> None:
    """Run one job on this worker: resolve the backend, transcribe, store the result, meter it.

    Audio longer than ``SCAIECHO_LONG_AUDIO_SPLIT_SECONDS`` on Backend A is not transcribed here:
    it is cut into pieces whose tasks go to ``queue`` (the queue this job came from), and the job
    stays ``running`` until the last of them joins the results (:func:`piece_run`).

    A transient error (an unavailable or failing backend) raises :class:`RetryJob` while the task
    has ``retries_left``; every other error, and a transient one on the last try, ends the job
    through :func:`job_fail`. Before it is claimed, a job whose tenant should let another tenant
    go first raises :class:`TenantYields` (while ``may_yield``).
    """
    if not row_visible(TranscriptionJob, job_id):
        logger.warning("job %s: no such row (its request never committed); task dropped", job_id)
        return
    if _pieces_resume(job_id=job_id, queue=queue):
        return
    waiting = (
        TranscriptionJob.objects.filter(pk=job_id, status=TranscriptionJob.Status.QUEUED)
        .values_list("tenant_id", flat=True)
        .first()
    )
    if waiting is not None:
        _dispatch_turn(tenant_id=waiting, may_yield=may_yield)
    job = _claim(job_id=job_id, worker_id=worker_id, queue=queue)
    if job is None:
        return
    tenant = job.tenant
    started = time.monotonic()
    try:
        # What the tenant's other unfinished jobs hold is not this job's to spend.
        budget = budget_check(tenant=tenant, held=jobs_reserved(tenant_id=tenant.pk, exclude_job_id=job.id))
        backend = policy_resolve_backend(
            policy=policy_get_or_provision(tenant=tenant), preference=job.backend_preference
        )
        data = read_staged(name=job.staged_path)
        audio = _audio_decode(data=data, budget_s=budget.remaining_audio_seconds_on(backend=backend))
        _job_hold_decoded(job=job, backend=backend, audio_ms=round(audio.duration_s * 1000))
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
        _reraise_shutdown(exc)
        logger.exception("job %s failed unexpectedly", job.id)
        job_fail(job=job, error=exc)
        return
    job_complete(
        job=job,
        backend=backend,
        result=result,
        audio_duration_ms=round(audio.duration_s * 1000),
        latency_ms=int((time.monotonic() - started) * 1000),
    )


def _reraise_shutdown(exc: BaseException) -> None:
    """A worker told to stop (SIGTERM: Celery raises ``SystemExit`` in the task) while a library
    was importing sees that exit wrapped in the library's own error ("Applying the VAD filter
    requires the onnxruntime package"). The exit is raised again, so the job is handed back to
    the broker as at any other stop, not failed as a bug."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, SystemExit | KeyboardInterrupt):
            raise cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def _job_hold_decoded(*, job: TranscriptionJob, backend: str, audio_ms: int) -> None:
    """Once the audio is decoded, the job holds its real length on the backend that will bill it
    instead of what it reserved at admission (the declared length at the highest price, or, with
    no declared length, all that was left): the rest is free for the tenant's next jobs. Under the
    budget rows' lock, as at admission; ``BUDGET_EXCEEDED`` when it no longer fits."""
    with transaction.atomic():
        reservation = budget_reserve(
            tenant=job.tenant,
            audio_ms=audio_ms,
            longest_ms=audio_ms,
            backends=[backend],
            held=lambda: jobs_reserved(tenant_id=job.tenant_id, exclude_job_id=job.id),
        )
        job.reserved_audio_ms, job.reserved_cost = reservation.audio_ms, reservation.cost
        job.save(update_fields=["reserved_audio_ms", "reserved_cost"])


def _audio_decode(*, data: bytes, budget_s: float | None) -> DecodedAudio:
    """Decode a job's audio within ``SCAIECHO_MAX_AUDIO_SECONDS`` and ``budget_s``: a declared
    duration over either is refused before decoding, and decoding stops where the audio passes them."""
    try:
        return decode_audio(data, max_duration_s=settings.SCAIECHO_MAX_AUDIO_SECONDS, budget_s=budget_s)
    except AudioOverBudget as exc:
        raise errors.BudgetExceeded(exc.message) from exc


def job_complete(
    *, job: TranscriptionJob, backend: str, result: TranscriptionResult, audio_duration_ms: int, latency_ms: int
) -> None:
    """Write the result into the job row and its one usage record, in one transaction (the
    caller's, when it has one); once that has committed the staged audio goes and the job's
    inline waiter is notified. What the worker calls (``job_run``, the last piece's join) once
    the backend has transcribed; it checks no permissions."""
    with transaction.atomic():
        job.status = TranscriptionJob.Status.COMPLETED
        job.status_reason = ""
        job.backend_used = backend
        job.transcript = result.text
        job.language_detected = result.language or ""
        job.audio_duration_ms = audio_duration_ms
        # A speaker erased while this job diarized is not named in what it stores.
        job.segments = segments_without_erased_speakers(tenant_id=job.tenant_id, segments=_segments_json(result))
        job.completed_at = timezone.now()
        job.save(
            update_fields=[
                "status",
                "status_reason",
                "backend_used",
                "transcript",
                "language_detected",
                "audio_duration_ms",
                "segments",
                "completed_at",
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
        _notify_done(job)


# The nil UUID matches no speaker: a job limited to erased speakers stays limited to none.
NO_SPEAKER = "00000000-0000-0000-0000-000000000000"


def jobs_forget_speaker(*, speaker: Any) -> list[dict[str, Any]]:
    """The speaker erasure hook (registered in ``TranscriptionConfig.ready``): the erased speaker's
    segments in the tenant's stored jobs become an anonymous ``SPEAKER_n`` with no id, and the id
    leaves the jobs' ``speaker_ids``. Runs inside ``speaker_erase``'s transaction."""
    speaker_id = str(speaker.pk)
    mentions = TranscriptionJob.objects.filter(tenant_id=speaker.tenant_id).filter(
        Q(segments__icontains=speaker_id) | Q(speaker_ids__icontains=speaker_id)
    )
    jobs = segments = 0
    for job in mentions.select_for_update():
        job.segments, changed = segments_anonymize(segments=job.segments or [], speaker_ids=[speaker_id])
        remaining = [value for value in job.speaker_ids if str(value) != speaker_id]
        if job.speaker_ids and not remaining and not job.is_terminal:
            remaining = [NO_SPEAKER]  # an empty list would mean every speaker of the tenant
        job.speaker_ids = remaining
        job.save(update_fields=["segments", "speaker_ids"])
        jobs += 1
        segments += changed
    return [{"item": "diarized_transcript_labels", "jobs": jobs, "segments": segments}] if jobs else []


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
        # Beam search for files (lower WER than greedy, issue 10); streams stay greedy for latency.
        beam_size=settings.SCAIECHO_WHISPER_BEAM_SIZE,
    )
    started = time.perf_counter()
    result = engine_for_backend(backend).transcribe(samples, options=options)
    observe_inference(
        kind="batch", backend=backend, compute_s=time.perf_counter() - started, audio_s=samples.size / SAMPLE_RATE
    )
    return result


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
        TranscriptionPiece.objects.filter(job_id=job_id, status=TranscriptionPiece.Status.QUEUED).values_list(
            "id", flat=True
        )
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
            if _claimant_alive(piece.worker_id, me=worker_id):
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


def piece_run(*, piece_id: int, worker_id: str, retries_left: bool, may_yield: bool = False) -> None:
    """Transcribe one piece of a long job on this worker and store its result; the piece that
    completes the set joins them into the job (result, diarization, the one usage record).

    Errors follow :func:`job_run`: a transient one raises :class:`RetryJob` while the task has
    ``retries_left`` (this piece alone is retried; the job stays ``running``), and any other
    fails the whole job through :func:`job_fail`. A piece yields to other tenants as a job does.
    """
    waiting = (
        TranscriptionPiece.objects.filter(pk=piece_id, status=TranscriptionPiece.Status.QUEUED)
        .values_list("job__tenant_id", flat=True)
        .first()
    )
    if waiting is not None:
        _dispatch_turn(tenant_id=waiting, may_yield=may_yield)
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
        _reraise_shutdown(exc)
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
        job_complete(
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


def jobs_sweep(*, now: Any = None, me: str = "") -> dict[str, int]:
    """What every worker's heartbeat runs, so that no job stays ``queued`` or ``running`` for good:

    - a running job or piece whose claiming process is gone (its node's heartbeat lapsed, or, for
      ``me``'s own node, the process no longer exists) goes back to ``queued`` with a new task:
      the embedded broker loses a dead worker's task, and a Redis broker would redeliver it only
      after its visibility timeout (an hour); a duplicate delivery finds the job taken or done;
    - a job queued longer than ``SCAIECHO_JOB_MAX_QUEUED_SECONDS`` fails ("queued too long");
    - a job running far past the hard time limit fails (:func:`jobs_fail_stale`);
    - a webhook event still pending well past its due attempt (its task was never queued, or was
      lost with a broker) is sent again (:func:`_webhooks_resend_stalled`).

    Rows are locked with ``SKIP LOCKED``, so the sweeps of several workers do not collide.
    """
    now = now or timezone.now()
    return {
        "requeued": _jobs_requeue_orphans(now=now, me=me),
        "pieces_requeued": _pieces_requeue_orphans(now=now, me=me),
        "queued_too_long": _jobs_fail_queued_too_long(now=now),
        "stale": jobs_fail_stale(now=now),
        "webhooks_resent": _webhooks_resend_stalled(now=now),
    }


# A pending webhook event whose attempt was due this long ago has lost its task: no attempt takes
# longer than SCAIECHO_WEBHOOK_TIMEOUT_SECONDS, and a task waiting out its backoff is due by then.
WEBHOOK_STALLED_AFTER = timedelta(minutes=10)


def _webhooks_resend_stalled(*, now: Any) -> int:
    """Send the delivery task again for pending events overdue by :data:`WEBHOOK_STALLED_AFTER`;
    the next resend of the same event waits as long again. A duplicate task that does come is
    harmless: each attempt claims the row, and receivers deduplicate on ``webhook-id``."""
    from transcription.tasks import deliver_webhook

    cutoff = now - WEBHOOK_STALLED_AFTER - timedelta(seconds=settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS)
    count = 0
    with transaction.atomic():
        stalled = (
            WebhookDelivery.objects.select_for_update(skip_locked=True)
            .filter(status=WebhookDelivery.Status.PENDING)
            .annotate(due_at=Coalesce("next_attempt_at", "created_at"))
            .filter(due_at__lt=cutoff)[:100]
        )
        for delivery in stalled:
            logger.warning("webhook %s of job %s: overdue; sent again", delivery.message_id, delivery.job_id)
            delivery.next_attempt_at = now
            delivery.save(update_fields=["next_attempt_at"])
            _send_later(deliver_webhook, str(delivery.id))
            count += 1
    return count


def _orphan_cutoff(now: Any) -> Any:
    # A claim younger than one heartbeat TTL may belong to a worker whose first beat is on its way.
    return now - timedelta(seconds=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS)


def _send_later(task: Any, *args: Any, queue: str = "") -> None:
    """Enqueue after commit (to ``queue``, "" for the default); a broker outage is logged and
    left to the next sweep."""

    def send() -> None:
        try:
            enqueue_or_raise(task, *args, queue=queue or None)
        except errors.QueueUnavailable:
            pass  # logged; the row stays queued and the queued-too-long sweep ends it if need be

    transaction.on_commit(send)


def _jobs_requeue_orphans(*, now: Any, me: str) -> int:
    from transcription.tasks import process_transcribe_job

    running = TranscriptionJob.objects.filter(
        status=TranscriptionJob.Status.RUNNING, started_at__lt=_orphan_cutoff(now), pieces__isnull=True
    )
    return _requeue_orphans(
        running, me=me, kind="job", send=lambda job: _send_later(process_transcribe_job, str(job.id), queue=job.queue)
    )


def _pieces_requeue_orphans(*, now: Any, me: str) -> int:
    from transcription.tasks import process_transcribe_piece

    running = TranscriptionPiece.objects.filter(
        status=TranscriptionPiece.Status.RUNNING, started_at__lt=_orphan_cutoff(now)
    )
    return _requeue_orphans(
        running,
        me=me,
        kind="piece",
        send=lambda piece: _send_later(process_transcribe_piece, piece.id, queue=piece.job.queue),
    )


def _requeue_orphans(running: Any, *, me: str, kind: str, send: Callable[[Any], None]) -> int:
    """Put each of the ``running`` rows (jobs or pieces) whose worker is gone back to ``queued``,
    and ``send`` its task again after commit. Rows another sweep holds are skipped."""
    model = running.model
    count = 0
    for row_id in list(running.values_list("id", flat=True)):
        with transaction.atomic():
            row = (
                model.objects.select_for_update(skip_locked=True).filter(pk=row_id, status=model.Status.RUNNING).first()
            )
            if row is None or _claimant_alive(row.worker_id, me=me):
                continue
            logger.warning("%s %s: its worker %s is gone; back to the queue", kind, row.id, row.worker_id)
            row.status = model.Status.QUEUED
            row.save(update_fields=["status"])
            send(row)
            count += 1
    return count


def _jobs_fail_queued_too_long(*, now: Any) -> int:
    """Fail jobs waiting in the queue (since creation, or since they were put back) too long."""
    cutoff = now - timedelta(seconds=settings.SCAIECHO_JOB_MAX_QUEUED_SECONDS)
    waiting = (
        TranscriptionJob.objects.filter(status=TranscriptionJob.Status.QUEUED)
        .annotate(waiting_since=Coalesce("started_at", "created_at"))
        .filter(waiting_since__lt=cutoff)
        .values_list("id", flat=True)
    )
    count = 0
    for job_id in list(waiting):
        with transaction.atomic():
            job = (
                TranscriptionJob.objects.select_for_update(skip_locked=True)
                .filter(pk=job_id, status=TranscriptionJob.Status.QUEUED)
                .first()
            )
            if job is None:
                continue
            job_fail(job=job, error=JobQueuedTooLong())
            count += 1
    return count


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
