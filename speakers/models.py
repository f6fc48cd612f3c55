"""The speaker library: enrolled voices, their consent, the consent trail and erasure audits.

Voice embeddings and consent recordings are biometric personal data. They live only in
:class:`SpeakerEmbedding` (encrypted at rest) and in object storage (encrypted files named by
:class:`ConsentRecord`), never in logs, API bodies or the admin, and erasure destroys both.
:class:`ConsentEvent` and :class:`ErasureAudit` are append-only and keep the tenant, speaker and
actor as plain values, so they outlive everything they describe.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Speaker(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        READY = "ready"
        FAILED = "failed"
        PENDING_REVIEW = "pending_review"
        ERASED = "erased"

    class Stage(models.TextChoices):
        """How far the enrollment job has come, shown while the status is ``pending``."""

        QUEUED = "queued"
        EMBEDDING = "embedding"
        VERIFYING = "verifying"
        DONE = "done"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # PROTECT: deleting a tenant must not drop voice data without erasure (its files and audit).
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="speakers")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    display_name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    language_primary = models.CharField(max_length=2)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    stage = models.CharField(max_length=20, choices=Stage.choices, default=Stage.QUEUED)
    status_reasons = models.JSONField(default=list, blank=True)
    # The consent check's measurements: consent_wer, voice_similarity (scores, not biometrics).
    verification = models.JSONField(default=dict, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    erased_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "status"], name="speaker_tenant_status")]
        permissions = [("review_consent", "Can review consent, play consent recordings and erase speakers")]

    def __str__(self) -> str:
        return f"{self.display_name or '(erased)'} ({self.status})"

    @property
    def is_erased(self) -> bool:
        return self.status == self.Status.ERASED


class ConsentRecord(models.Model):
    """What the speaker agreed to, and where their two recordings are (encrypted)."""

    speaker = models.OneToOneField(Speaker, on_delete=models.CASCADE, related_name="consent")
    full_name = models.CharField(max_length=200)
    stated_purpose = models.TextField()
    consent_text = models.TextField()
    reference_path = models.CharField(max_length=300, blank=True)
    consent_path = models.CharField(max_length=300, blank=True)
    # SHA-256 of the recordings as uploaded; the erasure audit names what it destroyed by these.
    reference_sha256 = models.CharField(max_length=64, blank=True)
    consent_sha256 = models.CharField(max_length=64, blank=True)
    consent_transcript = models.TextField(blank=True)
    captured_at = models.DateTimeField(auto_now_add=True)
    request_id = models.CharField(max_length=128, blank=True)

    def __str__(self) -> str:
        return f"consent of {self.speaker_id}"


class SpeakerEmbedding(models.Model):
    """The voice embeddings, encrypted with the biometric key. Never shown, never returned.

    Two of one reference recording: as recorded (``ciphertext``) and through a simulated phone
    line (``phone_ciphertext``, see ``speech.audio.phone_band``), so that a speaker enrolled from
    a wideband clip is recognised on a call too. Speakers enrolled before the phone-band one was
    stored have none; both go with the row.
    """

    speaker = models.OneToOneField(Speaker, on_delete=models.CASCADE, related_name="embedding")
    ciphertext = models.BinaryField()
    sha256 = models.CharField(max_length=64, help_text="Of the plaintext vector, for the erasure audit.")
    phone_ciphertext = models.BinaryField(null=True, blank=True)
    phone_sha256 = models.CharField(max_length=64, blank=True, help_text="Of the phone-band plaintext vector.")
    model_name = models.CharField(max_length=100)
    dims = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"embedding of {self.speaker_id}"


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs: object) -> int:
        raise TypeError(f"{self.model.__name__} rows are append-only.")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError(f"{self.model.__name__} rows are append-only.")


class AppendOnlyModel(models.Model):
    """Inserted once, never updated or deleted (PostgreSQL enforces it too, with a trigger)."""

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def save(self, *args: object, **kwargs: object) -> None:
        if not self._state.adding:
            raise TypeError(f"{type(self).__name__} rows are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        raise TypeError(f"{type(self).__name__} rows are append-only.")


class ConsentEvent(AppendOnlyModel):
    class Kind(models.TextChoices):
        CAPTURED = "captured"
        VERIFIED = "verified"
        REJECTED = "rejected"
        REVIEWED = "reviewed"
        PROFILE_UPDATED = "profile_updated"
        ERASED = "erased"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    tenant_id = models.UUIDField(db_index=True)
    speaker_id = models.UUIDField(db_index=True)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_username = models.CharField(max_length=150, blank=True)
    api_key_id = models.UUIDField(null=True, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.kind} {self.speaker_id}"


class ErasureAudit(AppendOnlyModel):
    """Proof of an erasure: who, when, and the content hashes of everything destroyed."""

    erased_at = models.DateTimeField(auto_now_add=True, db_index=True)
    tenant_id = models.UUIDField(db_index=True)
    tenant_slug = models.CharField(max_length=100, blank=True)
    speaker_id = models.UUIDField(db_index=True)
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_username = models.CharField(max_length=150, blank=True)
    api_key_id = models.UUIDField(null=True, blank=True)
    via = models.CharField(max_length=20, help_text="api or admin")
    request_id = models.CharField(max_length=128, blank=True)
    # [{"item": "embedding" | "phone_embedding" | "reference_recording" | "consent_recording",
    #   "sha256": ..., ...}]
    destroyed = models.JSONField(default=list)

    class Meta:
        ordering = ["-erased_at", "-id"]

    def __str__(self) -> str:
        return f"erasure of {self.speaker_id} at {self.erased_at:%Y-%m-%d %H:%M:%S}"
