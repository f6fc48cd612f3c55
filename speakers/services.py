"""Writes for the speaker library: enrollment, its verification, review, profile edits, erasure.

Permission checks happen in the API views (``scaiecho:enroll``) and the admin (staff custodians)
before these are called. Each service owns its transaction, and every consent event is written in
the same transaction as the change it records. The enrollment's model work (embeddings, the
consent transcript) runs in :func:`speaker_enrollment_run` on a Celery worker, never in the web
process.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from scaiecho_site import errors
from scaiecho_site.celery import enqueue_or_raise
from speakers import crypto
from speakers.models import ConsentEvent, ConsentRecord, ErasureAudit, Speaker, SpeakerEmbedding
from speakers.preflight import preflight_reference
from speakers.verification import consent_verdict
from speech.audio import decode_audio, phone_band
from speech.engines.base import TranscribeOptions
from tenants.context import ActorContext
from tenants.services import audit_record, policy_get_or_provision

logger = logging.getLogger("scaiecho.speakers")

STORAGE_PREFIX = "scaiecho/speakers"
REASON_UNREADABLE = "recording_unreadable"
REASON_ERROR = "enrollment_error"
REASON_QUEUE_UNAVAILABLE = "queue_unavailable"  # the broker could not take the enrollment
REASON_ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # SCAIECHO_ENROLLMENT_MAX_ATTEMPTS deliveries


# --- Consent events --------------------------------------------------------------------------------


def consent_event_record(*, speaker: Speaker, kind: str, ctx: ActorContext, details: dict[str, Any] | None = None) -> ConsentEvent:
    """Append one consent event. Call it inside the transaction of the change it records."""
    user = ctx.user
    return ConsentEvent.objects.create(
        tenant_id=speaker.tenant_id,
        speaker_id=speaker.pk,
        kind=kind,
        actor_id=user.pk if user is not None else None,
        actor_username=user.get_username() if user is not None else ctx.user_agent[:150],
        api_key_id=ctx.api_key.pk if ctx.api_key else None,
        request_id=ctx.request_id,
        details=details or {},
    )


# --- Encrypted recordings ----------------------------------------------------------------------


def recording_name(*, speaker_id: Any, which: str) -> str:
    return f"{STORAGE_PREFIX}/{speaker_id}/{which}.enc"


def recording_store(*, speaker_id: Any, which: str, data: bytes) -> str:
    return default_storage.save(recording_name(speaker_id=speaker_id, which=which), ContentFile(crypto.encrypt(data)))


def recording_read(*, name: str) -> bytes:
    with default_storage.open(name, "rb") as handle:
        return crypto.decrypt(handle.read())


def recording_destroy(*, name: str) -> bool:
    """Delete one stored recording; ``True`` when there was one to delete."""
    if name and default_storage.exists(name):
        default_storage.delete(name)
        return True
    return False


# --- Enrollment --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrollmentInput:
    display_name: str
    language_primary: str
    description: str
    consent_user_full_name: str
    consent_stated_purpose: str
    consent_text: str
    reference: bytes
    consent: bytes


def _decode(data: bytes, *, field: str) -> np.ndarray:
    try:
        return decode_audio(data, max_duration_s=settings.SCAIECHO_SPEAKER_MAX_SECONDS * 2).samples
    except errors.UnsupportedMedia as exc:
        raise errors.UnsupportedMedia(
            f"The {field} recording is not readable audio.", details=[{"field": field, "message": exc.message}]
        ) from exc
    except errors.ValidationError as exc:
        raise errors.ValidationError(exc.message, details=[{"field": field, "message": exc.message}]) from exc


def speaker_enroll(*, ctx: ActorContext, data: EnrollmentInput) -> Speaker:
    """Preflight the reference, then store the consent record and both (encrypted) recordings and
    enqueue the enrollment job after commit.

    Both recordings are decoded here (no model is loaded): a reference that fails preflight is
    refused with ``SCAIECHO_SPEAKER_PREFLIGHT_FAILED`` and nothing is stored.
    """
    from speakers.tasks import process_speaker_enrollment

    reference = _decode(data.reference, field="reference")
    _decode(data.consent, field="consent")
    preflight = preflight_reference(reference)
    if not preflight.ok:
        raise errors.SpeakerPreflightFailed(
            f"The reference recording failed preflight: {', '.join(preflight.fail_reasons)}.",
            fail_reasons=preflight.fail_reasons,
            measurements=preflight.measurements(),
        )
    speaker = Speaker(
        tenant=ctx.tenant,
        created_by=ctx.user,
        display_name=data.display_name,
        description=data.description,
        language_primary=data.language_primary,
    )
    stored: list[str] = []
    try:
        stored.append(recording_store(speaker_id=speaker.pk, which="reference", data=data.reference))
        stored.append(recording_store(speaker_id=speaker.pk, which="consent", data=data.consent))
        with transaction.atomic():
            speaker.save()
            ConsentRecord.objects.create(
                speaker=speaker,
                full_name=data.consent_user_full_name,
                stated_purpose=data.consent_stated_purpose,
                consent_text=data.consent_text,
                reference_path=stored[0],
                consent_path=stored[1],
                reference_sha256=hashlib.sha256(data.reference).hexdigest(),
                consent_sha256=hashlib.sha256(data.consent).hexdigest(),
                request_id=ctx.request_id,
            )
            consent_event_record(
                speaker=speaker,
                kind=ConsentEvent.Kind.CAPTURED,
                ctx=ctx,
                details={
                    "stated_purpose": data.consent_stated_purpose,
                    "consent_text_sha256": hashlib.sha256(data.consent_text.encode()).hexdigest(),
                    "preflight": preflight.measurements(),
                },
            )
            audit_record(ctx=ctx, action="speaker.enroll", resource_type="speaker", resource_id=str(speaker.pk))
            # Sent before the commit (as a transcription job is): a broker that cannot take it
            # rolls the enrollment back (503, nothing kept), and a process that dies in between
            # leaves a task without a row, never a pending enrollment without a task.
            enqueue_or_raise(process_speaker_enrollment, str(speaker.pk))
    except Exception:
        for name in stored:
            recording_destroy(name=name)
        raise
    return speaker


def _set_stage(speaker_id: Any, stage: str) -> None:
    Speaker.objects.filter(pk=speaker_id, status=Speaker.Status.PENDING).update(stage=stage, updated_at=timezone.now())


def speaker_enrollment_run(*, speaker_id: str) -> None:
    """The enrollment job, on a worker: embed both recordings, verify the consent, decide.

    The reference is embedded twice, as recorded and through a simulated phone line, so that a
    speaker enrolled from a wideband clip is recognised on a call as well (diarization matches the
    better of the two); the consent check compares the recordings as they are.

    The consent recording is transcribed by this worker's own Whisper model whatever the tenant's
    backend policy: biometric recordings never leave our workers for a third-party relay. A speaker
    erased while this ran is left erased, and nothing computed here is kept.
    """
    from scaiecho_site.engines import speaker_encoder, whisper_engine
    from speech.embedding import MODEL_NAME, cosine_similarity, embedding_to_bytes

    deadline = time.monotonic() + settings.SCAIECHO_TASK_ROW_WAIT_SECONDS
    while not Speaker.objects.filter(pk=speaker_id).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # the request that sent this task commits its row right after
    with transaction.atomic():
        speaker = Speaker.objects.select_for_update().filter(pk=speaker_id).first()
        if speaker is None or speaker.status != Speaker.Status.PENDING:
            return
        speaker.attempts += 1
        if speaker.attempts > settings.SCAIECHO_ENROLLMENT_MAX_ATTEMPTS:
            exhausted = True
        else:
            exhausted = False
            speaker.stage = Speaker.Stage.EMBEDDING
            speaker.save(update_fields=["attempts", "stage", "updated_at"])
    if exhausted:  # its worker died on it every time: a recording that kills workers
        speaker_enrollment_fail(speaker_id=speaker.pk, reasons=[REASON_ATTEMPTS_EXHAUSTED], scores={})
        return
    consent = ConsentRecord.objects.get(speaker_id=speaker.pk)
    try:
        reference = decode_audio(recording_read(name=consent.reference_path)).samples
        spoken = decode_audio(recording_read(name=consent.consent_path)).samples
    except errors.UnsupportedMedia:
        speaker_enrollment_fail(speaker_id=speaker.pk, reasons=[REASON_UNREADABLE], scores={})
        return
    encoder = speaker_encoder()
    voice = encoder.embed(reference)
    phone_voice = encoder.embed(phone_band(reference))
    consent_voice = encoder.embed(spoken)
    similarity = cosine_similarity(voice, consent_voice)
    _set_stage(speaker.pk, Speaker.Stage.VERIFYING)
    # Speech windows (VAD) and the beam width as batch jobs decode them: a pause in the reading cannot
    # make Whisper loop.
    options = TranscribeOptions(
        language=speaker.language_primary or None,
        vad_segmentation=True,
        beam_size=settings.SCAIECHO_WHISPER_BEAM_SIZE,
    )
    result = whisper_engine().transcribe(spoken, options=options)
    verdict = consent_verdict(
        consent_text=consent.consent_text,
        transcript=result.text,
        voice_similarity=similarity,
        language=speaker.language_primary,
    )
    review = policy_get_or_provision(tenant=speaker.tenant).speaker_review_required
    vector = embedding_to_bytes(voice)
    phone_vector = embedding_to_bytes(phone_voice)
    with transaction.atomic():
        speaker = Speaker.objects.select_for_update().get(pk=speaker.pk)
        if speaker.status != Speaker.Status.PENDING:  # erased meanwhile: keep nothing
            return
        ctx = ActorContext(user=None, tenant=speaker.tenant, user_agent="enrollment worker")
        ConsentRecord.objects.filter(speaker=speaker).update(consent_transcript=result.text)
        speaker.verification = verdict.scores()
        speaker.stage = Speaker.Stage.DONE
        speaker.status_reasons = verdict.fail_reasons
        if verdict.passed:
            SpeakerEmbedding.objects.update_or_create(
                speaker=speaker,
                defaults={
                    "ciphertext": crypto.encrypt(vector),
                    "sha256": hashlib.sha256(vector).hexdigest(),
                    "phone_ciphertext": crypto.encrypt(phone_vector),
                    "phone_sha256": hashlib.sha256(phone_vector).hexdigest(),
                    "model_name": MODEL_NAME,
                    "dims": int(voice.shape[0]),
                },
            )
            speaker.status = Speaker.Status.PENDING_REVIEW if review else Speaker.Status.READY
            speaker.verified_at = timezone.now()
            kind = ConsentEvent.Kind.VERIFIED
        else:
            speaker.status = Speaker.Status.FAILED
            kind = ConsentEvent.Kind.REJECTED
        speaker.save(update_fields=["verification", "stage", "status_reasons", "status", "verified_at", "updated_at"])
        consent_event_record(
            speaker=speaker, kind=kind, ctx=ctx, details={**verdict.scores(), "fail_reasons": verdict.fail_reasons}
        )
    logger.info("speaker %s enrollment: %s", speaker.pk, speaker.status)


def speaker_enrollment_fail(*, speaker_id: Any, reasons: list[str], scores: dict[str, Any]) -> None:
    """End a pending enrollment as ``failed`` (unreadable recordings, or an unexpected error)."""
    with transaction.atomic():
        speaker = Speaker.objects.select_for_update().filter(pk=speaker_id).first()
        if speaker is None or speaker.status != Speaker.Status.PENDING:
            return
        speaker.status = Speaker.Status.FAILED
        speaker.stage = Speaker.Stage.DONE
        speaker.status_reasons = reasons
        speaker.save(update_fields=["status", "stage", "status_reasons", "updated_at"])
        ctx = ActorContext(user=None, tenant=speaker.tenant, user_agent="enrollment worker")
        consent_event_record(speaker=speaker, kind=ConsentEvent.Kind.REJECTED, ctx=ctx, details={**scores, "fail_reasons": reasons})


def enrollments_sweep(*, now: Any = None) -> int:
    """Put back enrollments left ``pending`` with no progress for longer than an enrollment may run
    (``SCAIECHO_JOB_TIME_LIMIT_SECONDS``): their task was lost with a dead worker or broker. Each
    try counts (``SCAIECHO_ENROLLMENT_MAX_ATTEMPTS``), so a recording that kills its worker every
    time ends ``failed``; one the broker never took ends when it has waited as long as a queued job
    may (``SCAIECHO_JOB_MAX_QUEUED_SECONDS``). Runs with every worker's heartbeat."""
    from speakers.tasks import process_speaker_enrollment

    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS)
    queued_cutoff = now - timedelta(seconds=settings.SCAIECHO_JOB_MAX_QUEUED_SECONDS)
    count = 0
    stuck = Speaker.objects.filter(status=Speaker.Status.PENDING, updated_at__lt=cutoff).values_list("pk", flat=True)
    for speaker_id in list(stuck):
        with transaction.atomic():
            speaker = Speaker.objects.select_for_update(skip_locked=True).filter(pk=speaker_id).first()
            if speaker is None or speaker.status != Speaker.Status.PENDING or speaker.updated_at >= cutoff:
                continue
            never_started = speaker.stage == Speaker.Stage.QUEUED
            if never_started and speaker.updated_at < queued_cutoff:
                reason = REASON_QUEUE_UNAVAILABLE
            elif speaker.attempts >= settings.SCAIECHO_ENROLLMENT_MAX_ATTEMPTS:
                reason = REASON_ATTEMPTS_EXHAUSTED
            else:
                reason = None
            if reason is not None:
                transaction.on_commit(
                    lambda speaker_id=speaker.pk, reason=reason: speaker_enrollment_fail(
                        speaker_id=speaker_id, reasons=[reason], scores={}
                    )
                )
            else:
                logger.warning("speaker %s: enrollment made no progress; enqueued again", speaker.pk)
                speaker.save(update_fields=["updated_at"])  # the clock restarts with the new task

                def send(speaker_id: str = str(speaker.pk)) -> None:
                    try:
                        enqueue_or_raise(process_speaker_enrollment, speaker_id)
                    except errors.QueueUnavailable:
                        pass  # logged; the next sweep tries again

                transaction.on_commit(send)
            count += 1
    return count


# --- Review and profile edits --------------------------------------------------------------------


@transaction.atomic
def speaker_review(*, ctx: ActorContext, speaker_id: Any, approve: bool, note: str = "") -> Speaker:
    """A consent custodian's decision on a ``pending_review`` enrollment (from the admin)."""
    speaker = Speaker.objects.select_for_update().get(pk=speaker_id)
    if speaker.status != Speaker.Status.PENDING_REVIEW:
        raise errors.ValidationError(
            f"Only enrollments pending review can be reviewed; this one is {speaker.status}.",
            details=[{"field": "status", "message": speaker.status}],
        )
    speaker.status = Speaker.Status.READY if approve else Speaker.Status.FAILED
    if not approve:
        speaker.status_reasons = ["consent_review_rejected"]
    speaker.save(update_fields=["status", "status_reasons", "updated_at"])
    if not approve:  # a rejected voice is never matched: its embedding goes at once
        SpeakerEmbedding.objects.filter(speaker=speaker).delete()
    decision = "approved" if approve else "rejected"
    consent_event_record(speaker=speaker, kind=ConsentEvent.Kind.REVIEWED, ctx=ctx, details={"decision": decision, "note": note})
    audit_record(
        ctx=ctx,
        action="speaker.review",
        resource_type="speaker",
        resource_id=str(speaker.pk),
        tenant=speaker.tenant,
        details={"decision": decision},
    )
    return speaker


PROFILE_FIELDS = ("display_name", "description", "language_primary")


@transaction.atomic
def speaker_update(*, ctx: ActorContext, speaker: Speaker, changes: dict[str, str]) -> Speaker:
    """Change the profile's display fields; the consent trail records which fields changed."""
    speaker = Speaker.objects.select_for_update().get(pk=speaker.pk)
    if speaker.is_erased:
        raise errors.NotFound("No speaker with that id in this tenant.")
    changed = {name: value for name, value in changes.items() if name in PROFILE_FIELDS and getattr(speaker, name) != value}
    for name, value in changed.items():
        setattr(speaker, name, value)
    if changed:
        speaker.save(update_fields=[*changed, "updated_at"])
        consent_event_record(
            speaker=speaker, kind=ConsentEvent.Kind.PROFILE_UPDATED, ctx=ctx, details={"fields": sorted(changed)}
        )
    audit_record(
        ctx=ctx, action="speaker.update", resource_type="speaker", resource_id=str(speaker.pk), details={"fields": sorted(changed)}
    )
    return speaker


# --- Erasure -------------------------------------------------------------------------------------

# What layers above this one store about a speaker (transcription's diarized jobs) is forgotten
# through hooks they register at start-up (``AppConfig.ready``): this layer cannot import them.
# A hook runs inside the erasure's transaction, holding the speaker's row lock, and returns the
# entries it adds to the erasure audit's ``destroyed`` list (none when it changed nothing).
ErasureHook = Callable[..., list[dict[str, Any]]]
_erasure_hooks: list[ErasureHook] = []

_ANONYMOUS_LABEL = re.compile(r"SPEAKER_(\d+)")


def erasure_hook_register(hook: ErasureHook) -> None:
    """Call ``hook(speaker=...)`` in every erasure from now on (once, however often registered)."""
    if hook not in _erasure_hooks:
        _erasure_hooks.append(hook)


def segments_anonymize(*, segments: list[dict[str, Any]], speaker_ids: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """Relabel the segments of ``speaker_ids`` as anonymous voices; returns them and how many changed.

    Each speaker becomes one new ``SPEAKER_n`` numbered past every label in the transcript, so an
    erased speaker neither takes another voice's label nor stays linked to their name or id.
    """
    erased = {str(value) for value in speaker_ids}
    labels = {str(segment.get("speaker_label")) for segment in segments}
    numbers = [int(match.group(1)) for label in labels if (match := _ANONYMOUS_LABEL.fullmatch(label))]
    next_number = max(numbers, default=0) + 1
    renamed: dict[str, str] = {}
    changed = 0
    out = []
    for segment in segments:
        speaker_id = segment.get("speaker_id")
        if speaker_id is None or str(speaker_id) not in erased:
            out.append(segment)
            continue
        if str(speaker_id) not in renamed:
            while f"SPEAKER_{next_number}" in labels:
                next_number += 1
            renamed[str(speaker_id)] = f"SPEAKER_{next_number}"
            labels.add(renamed[str(speaker_id)])
        out.append({**segment, "speaker_id": None, "speaker_label": renamed[str(speaker_id)]})
        changed += 1
    return out, changed


def segments_without_erased_speakers(*, tenant_id: Any, segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anonymize the segments of speakers erased by now; call it in the transaction that stores them.

    Diarization read its candidates before an erasure that may commit before its result does: the
    speakers' row locks make this wait for such an erasure, whose hook could not yet see the result.
    """
    named = {str(segment["speaker_id"]) for segment in segments if segment.get("speaker_id")}
    if not named:
        return segments
    erased = Speaker.objects.select_for_update().filter(tenant_id=tenant_id, pk__in=named, status=Speaker.Status.ERASED)
    erased_ids = [str(pk) for pk in erased.values_list("pk", flat=True)]
    return segments_anonymize(segments=segments, speaker_ids=erased_ids)[0] if erased_ids else segments


@transaction.atomic
def speaker_erase(*, ctx: ActorContext, speaker_id: Any, via: str) -> Speaker:
    """Destroy a speaker's embeddings and both recordings; leave a tombstone and an ErasureAudit.

    The files are deleted inside the transaction, before it commits: if storage fails, nothing is
    marked erased and the call can be repeated; if the commit fails after the files are gone, a
    repeated erasure finds them gone and records that. The tombstone keeps the id, the tenant and
    the dates; the name, description and consent transcript are cleared with the biometrics, and
    the registered erasure hooks relabel the speaker in stored diarized transcripts as an anonymous
    ``SPEAKER_n``, in this transaction. The stated purpose and consent text stay, with the consent trail, as the record of what was
    agreed. Erasing an erased speaker changes nothing and returns the tombstone.
    """
    speaker = Speaker.objects.select_for_update().select_related("tenant").get(pk=speaker_id)
    if speaker.is_erased:
        return speaker
    destroyed: list[dict[str, Any]] = []
    embedding = SpeakerEmbedding.objects.filter(speaker=speaker).first()
    if embedding is not None:
        destroyed.append({"item": "embedding", "sha256": embedding.sha256, "model": embedding.model_name, "dims": embedding.dims})
        if embedding.phone_ciphertext:
            phone = {"sha256": embedding.phone_sha256, "model": embedding.model_name, "dims": embedding.dims}
            destroyed.append({"item": "phone_embedding", **phone})
        embedding.delete()  # the row holds both
    consent = ConsentRecord.objects.filter(speaker=speaker).first()
    if consent is not None:
        for item, path, digest in (
            ("reference_recording", consent.reference_path, consent.reference_sha256),
            ("consent_recording", consent.consent_path, consent.consent_sha256),
        ):
            if path:
                existed = recording_destroy(name=path)
                destroyed.append({"item": item, "sha256": digest, "storage_name": path, "existed": existed})
        consent.reference_path = ""
        consent.consent_path = ""
        consent.full_name = ""
        consent.consent_transcript = ""
        consent.save(update_fields=["reference_path", "consent_path", "full_name", "consent_transcript"])
    for hook in _erasure_hooks:
        destroyed.extend(hook(speaker=speaker))
    speaker.status = Speaker.Status.ERASED
    speaker.stage = Speaker.Stage.DONE
    speaker.display_name = ""
    speaker.description = ""
    speaker.verification = {}
    speaker.erased_at = timezone.now()
    speaker.save(update_fields=["status", "stage", "display_name", "description", "verification", "erased_at", "updated_at"])
    user = ctx.user
    ErasureAudit.objects.create(
        tenant_id=speaker.tenant_id,
        tenant_slug=speaker.tenant.slug,
        speaker_id=speaker.pk,
        actor_id=user.pk if user is not None else None,
        actor_username=user.get_username() if user is not None else ctx.user_agent[:150],
        api_key_id=ctx.api_key.pk if ctx.api_key else None,
        via=via,
        request_id=ctx.request_id,
        destroyed=destroyed,
    )
    consent_event_record(
        speaker=speaker, kind=ConsentEvent.Kind.ERASED, ctx=ctx, details={"via": via, "destroyed": [d["item"] for d in destroyed]}
    )
    audit_record(ctx=ctx, action="speaker.erase", resource_type="speaker", resource_id=str(speaker.pk), tenant=speaker.tenant)
    return speaker
