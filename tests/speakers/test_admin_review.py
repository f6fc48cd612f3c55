"""Consent custodians in the admin: pending enrollments with their consent and scores, the consent
recording played in the page, approve and reject with a note, and erasure through the service."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils.html import escape

from speakers.models import ConsentEvent, ErasureAudit, Speaker, SpeakerEmbedding
from speech.audio import decode_audio
from tenants.models import AuditEvent, Role, StaffTenant, TenantPolicy
from tests.factories import KeyFactory
from tests.speakers.voices import ALICE, BORIS, CONSENT_TEXT, PURPOSE, enroll, say, wait_enrolled

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def custodian(client, pending):
    user = User.objects.create_user("custodian", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_speaker", "review_consent", "view_consentevent", "view_erasureaudit"])
    )
    # Custody is granted per tenant, on the staff user's binding to it.
    StaffTenant.objects.create(user=user, tenant=pending[0].tenant, consent_custodian=True)
    client.force_login(user)
    return user


@pytest.fixture
def pending(api, speech_worker):
    """Two verified enrollments waiting for review in a tenant that requires it."""
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A", speaker_review_required=True)
    speakers = [wait_enrolled(enroll(api, key, voice).json()["data"]["id"]) for voice in (ALICE, BORIS)]
    assert [s.status for s in speakers] == ["pending_review", "pending_review"]
    return speakers


def test_custodian_reviews_pending_enrollments(client, custodian, pending):
    alice, boris = pending
    listing = client.get(reverse("admin:speakers_speaker_changelist"), {"review": "pending"})
    assert listing.status_code == 200
    assert "Alice" in listing.content.decode()
    assert "Boris" in listing.content.decode()

    page = client.get(reverse("admin:speakers_speaker_change", args=[alice.pk])).content.decode()
    assert escape(CONSENT_TEXT) in page
    assert escape(PURPOSE) in page
    assert "voice: similarity" in page
    assert "words: WER" in page
    play = reverse("admin:speakers_speaker_recording", args=[alice.pk, "consent"])
    assert f'src="{play}"' in page
    assert 'name="decision"' in page
    assert "ciphertext" not in page
    assert "embedding" not in page.lower().replace("embedding and", "")

    recording = client.get(play)
    assert recording.status_code == 200
    assert recording["Content-Type"] == "audio/wav"
    assert "no-store" in recording["Cache-Control"]
    assert recording.content == say(ALICE, CONSENT_TEXT)  # the decrypted recording, as uploaded
    assert decode_audio(recording.content).duration_s > 2
    assert AuditEvent.objects.filter(action="speaker.recording_played", resource_id=str(alice.pk)).exists()

    review = reverse("admin:speakers_speaker_review", args=[alice.pk])
    client.post(review, {"decision": "approve", "note": "Consent heard and matches the form."})
    assert Speaker.objects.get(pk=alice.pk).status == "ready"
    approved = ConsentEvent.objects.get(speaker_id=alice.pk, kind="reviewed")
    assert approved.details == {"decision": "approved", "note": "Consent heard and matches the form."}
    assert approved.actor_username == "custodian"

    reject = reverse("admin:speakers_speaker_review", args=[boris.pk])
    client.post(reject, {"decision": "reject", "note": ""})  # a rejection needs its reason
    assert Speaker.objects.get(pk=boris.pk).status == "pending_review"
    client.post(reject, {"decision": "reject", "note": "The purpose was not read out."})
    boris = Speaker.objects.get(pk=boris.pk)
    assert (boris.status, boris.status_reasons) == ("failed", ["consent_review_rejected"])
    assert not SpeakerEmbedding.objects.filter(speaker=boris).exists()
    assert ConsentEvent.objects.get(speaker_id=boris.pk, kind="reviewed").details["decision"] == "rejected"
    # A decided enrollment cannot be reviewed again.
    client.post(reject, {"decision": "approve", "note": "changed my mind"})
    assert Speaker.objects.get(pk=boris.pk).status == "failed"


def test_erasure_from_the_admin_goes_through_the_service(client, custodian, pending):
    alice, _ = pending
    erase = reverse("admin:speakers_speaker_erase", args=[alice.pk])
    assert "cannot be recovered" in client.get(erase).content.decode()
    client.post(erase)
    assert Speaker.objects.get(pk=alice.pk).status == "erased"
    assert not SpeakerEmbedding.objects.filter(speaker_id=alice.pk).exists()
    audit = ErasureAudit.objects.get(speaker_id=alice.pk)
    assert (audit.via, audit.actor_username) == ("admin", "custodian")
    assert client.get(reverse("admin:speakers_speaker_recording", args=[alice.pk, "consent"])).status_code == 404


def test_staff_without_the_custodian_permission_cannot_play_or_decide(client, pending):
    alice, _ = pending
    user = User.objects.create_user("viewer", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_speaker"))
    StaffTenant.objects.create(user=user, tenant=alice.tenant)  # sees the tenant, holds no custody
    client.force_login(user)
    page = client.get(reverse("admin:speakers_speaker_change", args=[alice.pk]))
    assert page.status_code == 200
    assert "consent-player" not in page.content.decode()
    assert client.get(reverse("admin:speakers_speaker_recording", args=[alice.pk, "consent"])).status_code == 403
    assert client.post(reverse("admin:speakers_speaker_review", args=[alice.pk]), {"decision": "approve"}).status_code == 403
    assert client.post(reverse("admin:speakers_speaker_erase", args=[alice.pk])).status_code == 403
    assert Speaker.objects.get(pk=alice.pk).status == "pending_review"
    # Consent events and erasure audits are read-only for everyone.
    assert client.get(reverse("admin:speakers_consentevent_add")).status_code == 403
