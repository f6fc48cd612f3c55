"""Erasure also forgets the speaker in stored diarized transcripts: their segments become an
anonymous SPEAKER_n (not colliding with the transcript's other labels) without their id, seen
through the API's job GET afterwards."""

from __future__ import annotations

import pytest

from speakers.models import ErasureAudit, Speaker
from speakers.services import segments_without_erased_speakers
from tenants.models import PERM_ENROLL, Role
from tests.factories import KeyFactory
from tests.transcription.test_batch_api import job_url
from transcription.models import TranscriptionJob

pytestmark = pytest.mark.django_db

SPEAKERS_URL = "/v1/modules/scaiecho/speakers"


@pytest.fixture
def owner():
    return KeyFactory.issue(role=Role.TENANT_ADMIN, grants=[PERM_ENROLL])


def ready_speaker(tenant, name: str) -> Speaker:
    return Speaker.objects.create(tenant=tenant, display_name=name, language_primary="en", status=Speaker.Status.READY)


def diarized_job(owner, segments: list[dict], *, status: str = TranscriptionJob.Status.COMPLETED, speaker_ids=()) -> TranscriptionJob:
    return TranscriptionJob.objects.create(
        tenant=owner.tenant,
        user=owner.membership.user,
        api_key=owner.key,
        status=status,
        diarize=True,
        speaker_ids=[str(value) for value in speaker_ids],
        audio_sha256="0" * 64,
        audio_bytes=10,
        audio_ext="wav",
        transcript="hello there general kenobi",
        segments=segments,
    )


def test_erasure_anonymizes_the_speaker_in_stored_transcripts(api, owner):
    alice, bob = ready_speaker(owner.tenant, "Alice Example"), ready_speaker(owner.tenant, "Bob Builder")
    job = diarized_job(
        owner,
        [
            {"start": 0.0, "end": 1.0, "text": "hello", "speaker_id": str(alice.pk), "speaker_label": "Alice Example"},
            {"start": 1.0, "end": 2.0, "text": "there", "speaker_id": None, "speaker_label": "SPEAKER_1"},
            {"start": 2.0, "end": 3.0, "text": "general", "speaker_id": str(bob.pk), "speaker_label": "Bob Builder"},
            {"start": 3.0, "end": 4.0, "text": "kenobi", "speaker_id": str(alice.pk), "speaker_label": "Alice Example"},
        ],
        speaker_ids=[alice.pk, bob.pk],
    )
    before = api.get(job_url(job.pk), headers=owner.headers).json()["data"]
    assert before["segments"][0]["speaker_label"] == "Alice Example"

    assert api.delete(f"{SPEAKERS_URL}/{alice.pk}", headers=owner.headers).status_code == 200

    response = api.get(job_url(job.pk), headers=owner.headers)
    assert response.status_code == 200
    assert "Alice" not in response.content.decode()
    assert str(alice.pk) not in response.content.decode()
    segments = response.json()["data"]["segments"]
    assert [(s["speaker_id"], s["speaker_label"]) for s in segments] == [
        (None, "SPEAKER_2"),  # a new anonymous voice: SPEAKER_1 is someone else
        (None, "SPEAKER_1"),
        (str(bob.pk), "Bob Builder"),
        (None, "SPEAKER_2"),  # the same anonymous voice throughout
    ]
    assert [s["text"] for s in segments] == ["hello", "there", "general", "kenobi"]
    assert TranscriptionJob.objects.get(pk=job.pk).speaker_ids == [str(bob.pk)]
    audit = ErasureAudit.objects.get(speaker_id=alice.pk)
    assert {"item": "diarized_transcript_labels", "jobs": 1, "segments": 2} in audit.destroyed


def test_a_queued_job_limited_to_the_erased_speaker_stays_limited(api, owner):
    alice = ready_speaker(owner.tenant, "Alice Example")
    ready_speaker(owner.tenant, "Bob Builder")
    queued = diarized_job(owner, None, status=TranscriptionJob.Status.QUEUED, speaker_ids=[alice.pk])
    assert api.delete(f"{SPEAKERS_URL}/{alice.pk}", headers=owner.headers).status_code == 200
    # Not the empty list, which would let the job match every speaker of the tenant.
    assert TranscriptionJob.objects.get(pk=queued.pk).speaker_ids == ["00000000-0000-0000-0000-000000000000"]


def test_other_tenants_transcripts_are_untouched(api, owner):
    alice = ready_speaker(owner.tenant, "Alice Example")
    other = KeyFactory.issue(role=Role.TENANT_ADMIN)
    theirs = diarized_job(other, [{"start": 0.0, "end": 1.0, "text": "hi", "speaker_id": str(alice.pk), "speaker_label": "Alice Example"}])
    api.delete(f"{SPEAKERS_URL}/{alice.pk}", headers=owner.headers)
    assert TranscriptionJob.objects.get(pk=theirs.pk).segments[0]["speaker_label"] == "Alice Example"


def test_a_result_stored_after_the_erasure_is_anonymized_too(api, owner):
    """A job that diarized with candidates read before the erasure stores no name after it."""
    alice = ready_speaker(owner.tenant, "Alice Example")
    api.delete(f"{SPEAKERS_URL}/{alice.pk}", headers=owner.headers)
    stored = segments_without_erased_speakers(
        tenant_id=owner.tenant.pk,
        segments=[
            {"start": 0.0, "end": 1.0, "text": "hi", "speaker_id": str(alice.pk), "speaker_label": "Alice Example"},
            {"start": 1.0, "end": 2.0, "text": "yo", "speaker_id": None, "speaker_label": "SPEAKER_1"},
        ],
    )
    assert [(s["speaker_id"], s["speaker_label"]) for s in stored] == [(None, "SPEAKER_2"), (None, "SPEAKER_1")]
