"""The speaker library's API without a worker: consent gating, preflight, permissions, scoping,
profile edits, erasure of a pending enrollment, and the append-only trails."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction
from django.db.utils import DatabaseError

from speakers import crypto
from speakers.models import ConsentEvent, ConsentRecord, ErasureAudit, Speaker
from speakers.services import STORAGE_PREFIX
from speech.audio import decode_audio
from tenants.models import PERM_ENROLL, AuditEvent, Role
from tests.factories import KeyFactory
from tests.speakers.voices import ALICE, BORIS, CONSENT_TEXT, REFERENCE_TEXT, SPEAKERS_URL, enroll, enrollment_form, say
from tests.tenants.test_auth import assert_error
from tests.voices import silence_wav

pytestmark = pytest.mark.django_db


def wav_of(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def stored_files() -> list[str]:
    if not default_storage.exists(STORAGE_PREFIX):
        return []
    folders, _ = default_storage.listdir(STORAGE_PREFIX)
    return [f"{folder}/{name}" for folder in folders for name in default_storage.listdir(f"{STORAGE_PREFIX}/{folder}")[1]]


def assert_nothing_stored() -> None:
    assert Speaker.objects.count() == 0
    assert ConsentRecord.objects.count() == 0
    assert ConsentEvent.objects.count() == 0
    assert stored_files() == []


@pytest.fixture(autouse=True)
def _own_media_root(settings, tmp_path):
    """Files outlive a test's rolled-back transaction: each test gets its own storage."""
    settings.MEDIA_ROOT = str(tmp_path / "media")


@pytest.fixture
def enroller():
    return KeyFactory.issue(role=Role.TENANT_USER, grants=[PERM_ENROLL])


def test_enrollment_stores_consent_and_encrypted_recordings_and_queues_the_job(api, enroller):
    response = enroll(api, enroller, ALICE)
    assert response.status_code == 202, response.content
    data = response.json()["data"]
    assert data["status"] == "pending"
    assert data["enrollment"] == {"stage": "queued", "attempts": 0}
    assert data["consent"]["stated_purpose"].startswith("Attribute speech")
    assert data["consent"]["consent_text"] == CONSENT_TEXT
    speaker = Speaker.objects.get(pk=data["id"])
    assert speaker.tenant_id == enroller.tenant.pk
    consent = ConsentRecord.objects.get(speaker=speaker)
    uploads = {consent.reference_path: say(ALICE, REFERENCE_TEXT), consent.consent_path: say(ALICE, CONSENT_TEXT)}
    for name, uploaded in uploads.items():
        with default_storage.open(name, "rb") as handle:
            stored = handle.read()
        assert not stored.startswith(b"RIFF"), "recordings are encrypted at rest"
        assert uploaded[1000:2000] not in stored
        assert crypto.decrypt(stored) == uploaded
    [event] = ConsentEvent.objects.filter(speaker_id=speaker.pk)
    assert event.kind == "captured"
    assert event.request_id == response["X-Request-Id"]
    assert event.details["stated_purpose"] == data["consent"]["stated_purpose"]
    assert AuditEvent.objects.filter(action="speaker.enroll", resource_id=str(speaker.pk), outcome="SUCCESS").exists()


@pytest.mark.parametrize(
    "missing", ["consent_user_full_name", "consent_stated_purpose", "consent_text", "consent", "reference", "display_name"]
)
def test_nothing_is_stored_without_every_consent_field_and_both_recordings(api, enroller, missing):
    response = api.post(SPEAKERS_URL, enrollment_form(ALICE, **{missing: None}), format="multipart", headers=enroller.headers)
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert missing in {detail["field"] for detail in body["error"]["details"]}
    assert_nothing_stored()


def test_blank_consent_text_is_refused(api, enroller):
    response = api.post(SPEAKERS_URL, enrollment_form(ALICE, consent_text="  "), format="multipart", headers=enroller.headers)
    assert_error(response, 422, "VALIDATION_ERROR")
    assert_nothing_stored()


def preflight_failure(api, key, reference: bytes) -> dict:
    form = enrollment_form(ALICE, reference=SimpleUploadedFile("reference.wav", reference))
    body = assert_error(api.post(SPEAKERS_URL, form, format="multipart", headers=key.headers), 422, "SCAIECHO_SPEAKER_PREFLIGHT_FAILED")
    assert_nothing_stored()
    return body["error"]


def test_preflight_rejects_silence(api, enroller):
    error = preflight_failure(api, enroller, silence_wav(seconds=6))
    assert {"too_little_speech", "too_quiet"} & set(error["fail_reasons"]), error
    assert [detail["field"] for detail in error["details"]] == ["reference"] * len(error["fail_reasons"])


def test_preflight_rejects_a_too_short_clip(api, enroller):
    speech = decode_audio(say(ALICE, REFERENCE_SHORT)).samples[: 16000]
    error = preflight_failure(api, enroller, wav_of(speech))
    assert "too_short" in error["fail_reasons"]
    assert error["measurements"]["duration_s"] == pytest.approx(1.0, abs=0.05)


REFERENCE_SHORT = "Hello there, this is a short greeting."


def test_preflight_rejects_clipped_audio(api, enroller):
    speech = decode_audio(say(ALICE, "The quick brown fox jumps over the lazy dog, twice, to be sure.")).samples
    error = preflight_failure(api, enroller, wav_of(np.clip(speech * 12, -1, 1)))
    assert "clipped" in error["fail_reasons"]


def test_unreadable_recordings_are_unsupported_media(api, enroller):
    form = enrollment_form(ALICE, consent=SimpleUploadedFile("consent.wav", b"RIFF....WAVEfmt not really audio" * 20))
    body = assert_error(api.post(SPEAKERS_URL, form, format="multipart", headers=enroller.headers), 415, "UNSUPPORTED_MEDIA")
    assert body["error"]["details"][0]["field"] == "consent"
    assert_nothing_stored()


def test_oversize_recordings_are_refused(api, enroller, settings):
    # The reference is one byte over; the whole body stays within the route's body limit (two
    # recordings), so the answer names the file.
    settings.SCAIECHO_SPEAKER_MAX_UPLOAD_BYTES = len(say(ALICE, REFERENCE_TEXT)) - 1
    body = assert_error(enroll(api, enroller, ALICE), 413, "PAYLOAD_TOO_LARGE")
    assert body["error"]["details"][0]["field"] == "reference"
    assert_nothing_stored()


@pytest.mark.parametrize("role", [Role.TENANT_VIEWER, Role.TENANT_USER])
def test_enrollment_needs_the_enroll_permission(api, role):
    key = KeyFactory.issue(role=role)
    assert_error(enroll(api, key, ALICE), 403, "AUTHZ_PERMISSION_DENIED")
    assert_error(api.get(SPEAKERS_URL, headers=key.headers), 403, "AUTHZ_PERMISSION_DENIED")
    assert_nothing_stored()
    assert AuditEvent.objects.filter(action="speaker.enroll", outcome="FAILURE").exists()


def test_list_is_paginated_and_tenant_scoped(api, enroller):
    ids = [enroll(api, enroller, voice).json()["data"]["id"] for voice in (ALICE, BORIS, ALICE)]
    other = KeyFactory.issue(grants=[PERM_ENROLL])
    enroll(api, other, BORIS)
    first = api.get(SPEAKERS_URL, {"limit": 2}, headers=enroller.headers).json()["data"]
    assert (first["count"], first["limit"], first["offset"], first["next_offset"]) == (3, 2, 0, 2)
    second = api.get(SPEAKERS_URL, {"limit": 2, "offset": 2}, headers=enroller.headers).json()["data"]
    assert second["next_offset"] is None
    listed = [item["id"] for item in first["items"] + second["items"]]
    assert sorted(listed) == sorted(ids)
    assert_error(api.get(SPEAKERS_URL, {"limit": 0}, headers=enroller.headers), 422, "VALIDATION_ERROR")
    pending = api.get(SPEAKERS_URL, {"status": "ready"}, headers=enroller.headers).json()["data"]
    assert pending["count"] == 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"offset": "17853679132044494724514447360"}, "offset"),  # was a 500 (bigint out of range)
        ({"offset": "1000000001"}, "offset"),
        ({"status": ""}, "status"),
        ({"limit": ""}, "limit"),
        ({"offset": "0.0"}, "offset"),  # DRF's IntegerField took it as 0; the schema says integer
        ({"limit": "2.0"}, "limit"),
    ],
)
def test_list_parameters_out_of_range_or_blank_are_refused(api, enroller, query, field):
    body = assert_error(api.get(SPEAKERS_URL, query, headers=enroller.headers), 422, "VALIDATION_ERROR")
    assert [detail["field"] for detail in body["error"]["details"]] == [field]


def test_other_tenants_speakers_are_not_found(api, enroller):
    theirs = KeyFactory.issue(grants=[PERM_ENROLL])
    speaker_id = enroll(api, theirs, BORIS).json()["data"]["id"]
    url = f"{SPEAKERS_URL}/{speaker_id}"
    assert_error(api.get(url, headers=enroller.headers), 404, "NOT_FOUND")
    assert_error(api.patch(url, {"display_name": "Mine now"}, format="json", headers=enroller.headers), 404, "NOT_FOUND")
    assert_error(api.delete(url, headers=enroller.headers), 404, "NOT_FOUND")
    assert_error(api.get(f"{SPEAKERS_URL}/not-a-uuid", headers=enroller.headers), 404, "NOT_FOUND")
    speaker = Speaker.objects.get(pk=speaker_id)
    assert (speaker.display_name, speaker.status) == ("Boris", "pending")
    assert len(stored_files()) == 2


def test_profile_edits_change_only_display_fields_and_are_in_the_consent_trail(api, enroller):
    speaker_id = enroll(api, enroller, ALICE).json()["data"]["id"]
    url = f"{SPEAKERS_URL}/{speaker_id}"
    response = api.patch(url, {"display_name": "Alice Smith", "description": "Chair"}, format="json", headers=enroller.headers)
    assert response.status_code == 200, response.content
    assert (response.json()["data"]["display_name"], response.json()["data"]["description"]) == ("Alice Smith", "Chair")
    body = assert_error(api.patch(url, {"status": "ready"}, format="json", headers=enroller.headers), 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["field"] == "status"
    assert_error(api.patch(url, {"language_primary": "english"}, format="json", headers=enroller.headers), 422, "VALIDATION_ERROR")
    # A number is not a name (found by the schema fuzz: 0.0 was stored as "0.0").
    body = assert_error(api.patch(url, {"display_name": 0.0, "description": 7}, format="json", headers=enroller.headers), 422, "VALIDATION_ERROR")
    assert {detail["field"] for detail in body["error"]["details"]} == {"display_name", "description"}
    assert Speaker.objects.get(pk=speaker_id).display_name == "Alice Smith"
    assert Speaker.objects.get(pk=speaker_id).status == "pending"
    update = ConsentEvent.objects.get(speaker_id=speaker_id, kind="profile_updated")
    assert update.details == {"fields": ["description", "display_name"]}
    assert update.request_id == response["X-Request-Id"]


def test_erasing_a_pending_enrollment_destroys_both_recordings_and_leaves_a_tombstone(api, enroller):
    created = enroll(api, enroller, ALICE)
    speaker_id = created.json()["data"]["id"]
    consent = ConsentRecord.objects.get(speaker_id=speaker_id)
    paths = [consent.reference_path, consent.consent_path]
    assert all(default_storage.exists(path) for path in paths)
    response = api.delete(f"{SPEAKERS_URL}/{speaker_id}", headers=enroller.headers)
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert (data["status"], data["display_name"]) == ("erased", None)
    assert data["consent"]["user_full_name"] is None
    assert not any(default_storage.exists(path) for path in paths)
    assert stored_files() == []
    [audit] = ErasureAudit.objects.filter(speaker_id=speaker_id)
    assert {item["item"] for item in audit.destroyed} == {"reference_recording", "consent_recording"}
    assert audit.request_id == response["X-Request-Id"]
    assert audit.via == "api"
    assert {item["sha256"] for item in audit.destroyed} == {consent.reference_sha256, consent.consent_sha256}
    assert ConsentEvent.objects.filter(speaker_id=speaker_id, kind="erased").exists()
    # The tombstone stays readable, and erasing again changes nothing.
    assert api.get(f"{SPEAKERS_URL}/{speaker_id}", headers=enroller.headers).json()["data"]["status"] == "erased"
    assert api.delete(f"{SPEAKERS_URL}/{speaker_id}", headers=enroller.headers).status_code == 200
    assert ErasureAudit.objects.filter(speaker_id=speaker_id).count() == 1
    assert_error(api.patch(f"{SPEAKERS_URL}/{speaker_id}", {"display_name": "Back"}, format="json", headers=enroller.headers), 404, "NOT_FOUND")


def test_consent_events_and_erasure_audits_are_append_only(api, enroller):
    speaker_id = enroll(api, enroller, ALICE).json()["data"]["id"]
    api.delete(f"{SPEAKERS_URL}/{speaker_id}", headers=enroller.headers)
    event = ConsentEvent.objects.filter(speaker_id=speaker_id).first()
    audit = ErasureAudit.objects.get(speaker_id=speaker_id)
    for row, manager in ((event, ConsentEvent.objects), (audit, ErasureAudit.objects)):
        with pytest.raises(TypeError):
            row.save()
        with pytest.raises(TypeError):
            row.delete()
        with pytest.raises(TypeError):
            manager.filter(pk=row.pk).delete()
        with pytest.raises(TypeError):
            manager.filter(pk=row.pk).update(request_id="forged")
    for table in ("speakers_consentevent", "speakers_erasureaudit"):
        for statement in (f"UPDATE {table} SET request_id = 'forged'", f"DELETE FROM {table}"):
            with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(statement)
    assert ConsentEvent.objects.filter(speaker_id=speaker_id).count() == 2


def test_diarize_needs_the_diarize_permission_and_the_tenants_own_speakers(api):
    transcriber = KeyFactory.issue(role=Role.TENANT_VIEWER)
    form = {"file": SimpleUploadedFile("a.wav", say(ALICE, "Hello there.")), "diarize": "true"}
    assert_error(api.post("/v1/modules/scaiecho/transcribe", form, format="multipart", headers=transcriber.headers), 403, "AUTHZ_PERMISSION_DENIED")
    admin = KeyFactory.issue(role=Role.TENANT_ADMIN)
    theirs = KeyFactory.issue(grants=[PERM_ENROLL])
    foreign_id = enroll(api, theirs, BORIS).json()["data"]["id"]
    form = {"file": SimpleUploadedFile("a.wav", say(ALICE, "Hello there.")), "diarize": "true", "speaker_ids": foreign_id}
    body = assert_error(api.post("/v1/modules/scaiecho/transcribe", form, format="multipart", headers=admin.headers), 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["field"] == "speaker_ids"
    form = {"file": SimpleUploadedFile("a.wav", say(ALICE, "Hello there.")), "response_format": "diarized_json"}
    assert_error(api.post("/oai/v1/audio/transcriptions", form, format="multipart", headers=transcriber.headers), 403, "AUTHZ_PERMISSION_DENIED")


def test_a_tenant_with_voice_profiles_cannot_be_deleted_past_erasure(api, enroller):
    """Deleting the tenant would drop the rows but leave the recordings and no erasure audit."""
    from django.db.models import ProtectedError

    enroll(api, enroller, ALICE)
    with pytest.raises(ProtectedError):
        enroller.tenant.delete()
    assert len(stored_files()) == 2
