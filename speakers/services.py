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
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from scaiecho_site import errors
from speakers import crypto
from speakers.models import ConsentEvent, ConsentRecord, ErasureAudit, Speaker, SpeakerEmbedding
from speakers.preflight import preflight_reference
from speakers.verification import consent_verdict
from speech.audio import decode_audio
from speech.engines.base import TranscribeOptions
from tenants.context import ActorContext
from tenants.services import audit_record, policy_get_or_provision

logger = logging.getLogger("scaiecho.speakers")

STORAGE_PREFIX = "scaiecho/speakers"
REASON_UNREADABLE = "recording_unreadable"
REASON_ERROR = "enrollment_error"


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
            transaction.on_commit(lambda: process_speaker_enrollment.delay(str(speaker.pk)))
    except Exception:
        for name in stored:
            recording_destroy(name=name)
        raise
    return speaker


def _set_stage(speaker_id: Any, stage: str) -> None:
    Speaker.objects.filter(pk=speaker_id, status=Speaker.Status.PENDING).update(stage=stage, updated_at=timezone.now())


def speaker_enrollment_run(*, speaker_id: str) -> None:
    """The enrollment job, on a worker: embed both recordings, verify the consent, decide.

    The consent recording is transcribed by this worker's own Whisper model whatever the tenant's
    backend policy: biometric recordings never leave our workers for a third-party relay. A speaker
    erased while this ran is left erased, and nothing computed here is kept.
    """
    from scaiecho_site.engines import speaker_encoder, whisper_engine
    from speech.embedding import MODEL_NAME, cosine_similarity, embedding_to_bytes

    with transaction.atomic():
        speaker = Speaker.objects.select_for_update().filter(pk=speaker_id).first()
        if speaker is None or speaker.status != Speaker.Status.PENDING:
            return
        speaker.attempts += 1
        speaker.stage = Speaker.Stage.EMBEDDING
        speaker.save(update_fields=["attempts", "stage", "updated_at"])
    consent = ConsentRecord.objects.get(speaker_id=speaker.pk)
    try:
        reference = decode_audio(recording_read(name=consent.reference_path)).samples
        spoken = decode_audio(recording_read(name=consent.consent_path)).samples
    except errors.UnsupportedMedia:
        speaker_enrollment_fail(speaker_id=speaker.pk, reasons=[REASON_UNREADABLE], scores={})
        return
    encoder = speaker_encoder()
    voice = encoder.embed(reference)
    consent_voice = encoder.embed(spoken)
    similarity = cosine_similarity(voice, consent_voice)
    _set_stage(speaker.pk, Speaker.Stage.VERIFYING)
    # Speech windows (VAD) as batch jobs decode them: a pause in the reading cannot make Whisper loop.
    options = TranscribeOptions(language=speaker.language_primary or None, vad_segmentation=True)
    result = whisper_engine().transcribe(spoken, options=options)
    verdict = consent_verdict(
        consent_text=consent.consent_text,
        transcript=result.text,
        voice_similarity=similarity,
        language=speaker.language_primary,
    )
    review = policy_get_or_provision(tenant=speaker.tenant).speaker_review_required
    vector = embedding_to_bytes(voice)
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


@transaction.atomic
def speaker_erase(*, ctx: ActorContext, speaker_id: Any, via: str) -> Speaker:
    """Destroy a speaker's embedding and both recordings; leave a tombstone and an ErasureAudit.

    The files are deleted inside the transaction, before it commits: if storage fails, nothing is
    marked erased and the call can be repeated; if the commit fails after the files are gone, a
    repeated erasure finds them gone and records that. The tombstone keeps the id, the tenant and
    the dates; the name, description and consent transcript are cleared with the biometrics.
    The stated purpose and consent text stay, with the consent trail, as the record of what was
    agreed. Erasing an erased speaker changes nothing and returns the tombstone.
    """
    speaker = Speaker.objects.select_for_update().select_related("tenant").get(pk=speaker_id)
    if speaker.is_erased:
        return speaker
    destroyed: list[dict[str, Any]] = []
    embedding = SpeakerEmbedding.objects.filter(speaker=speaker).first()
    if embedding is not None:
        destroyed.append({"item": "embedding", "sha256": embedding.sha256, "model": embedding.model_name, "dims": embedding.dims})
        embedding.delete()
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
