"""Batch transcription end to end: the API, a real Celery worker, real Whisper on real speech."""

from __future__ import annotations

import hashlib
import time
import uuid

import httpx
import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from tenants.models import ApiKey, AuditEvent, Role, TenantPolicy, UsageRecord
from tests.factories import KeyFactory
from tests.tenants.test_auth import assert_error
from tests.voices import convert_audio, silence_wav, synth_speech, word_error_rate
from transcription.models import TranscriptionJob
from transcription.storage import staged_name

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TRANSCRIBE_URL = "/v1/modules/scaiecho/transcribe"
SPOKEN = (
    "Good morning everyone. Today we will review the quarterly budget and plan the next product release. "
    "Please send the report to the finance team before Friday."
)


def upload(name: str, data: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data)


def job_url(job_id: str) -> str:
    return f"{TRANSCRIBE_URL}/jobs/{job_id}"


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    return synth_speech(SPOKEN)


def key_with_policy(allowed: str, default: str, *, role: str = Role.TENANT_ADMIN):
    key = KeyFactory.issue(role=role)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends=allowed, default_backend=default)
    return key


def poll(api, key, job_id: str, *, timeout: float = 120) -> dict:
    """Wait on the job row (polling the API this often would run into the key's rate limit),
    then read the job once through the API, as its owner would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if TranscriptionJob.objects.filter(pk=job_id, status__in=TranscriptionJob.TERMINAL).exists():
            break
        time.sleep(0.2)
    return api.get(job_url(job_id), headers=key.headers).json()["data"]


def test_inline_transcription_on_backend_a(api, speech_worker, speech_wav):
    key = key_with_policy("A", "A")
    response = api.post(TRANSCRIBE_URL, {"file": upload("speech.wav", speech_wav), "language_hint": "en"}, format="multipart", headers=key.headers)
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert word_error_rate(SPOKEN, data["transcript"]) <= 0.15, data["transcript"]
    assert data["backend_used"] == "A"
    assert data["language_detected"] == "en"
    assert data["audio_bytes"] == len(speech_wav)
    assert abs(data["audio_duration_ms"] - len(speech_wav[44:]) / 2 / 22050 * 1000) < 200  # espeak: 22.05 kHz s16
    assert data["segments"]
    assert all(s["end"] > s["start"] for s in data["segments"])
    job = TranscriptionJob.objects.get(pk=data["job_id"])
    assert (job.status, job.is_async, job.audio_sha256) == ("completed", False, hashlib.sha256(speech_wav).hexdigest())
    assert job.api_key_id == key.key.pk
    assert job.user_id == key.membership.user_id
    assert not default_storage.exists(staged_name(job_id=str(job.id), ext="wav"))
    usage = UsageRecord.objects.get(reference=str(job.id))
    assert (usage.backend, usage.kind, usage.audio_duration_ms) == ("A", "batch", data["audio_duration_ms"])
    # The inline job can be polled later.
    polled = api.get(job_url(data["job_id"]), headers=key.headers).json()["data"]
    assert polled["status"] == "completed"
    assert polled["transcript"] == data["transcript"]
    assert polled["completed_at"].endswith("Z")


def test_language_detection_without_hint_and_mp3_upload(api, speech_worker, speech_wav):
    key = key_with_policy("A", "A")
    mp3 = convert_audio(speech_wav, "mp3")
    response = api.post(TRANSCRIBE_URL, {"file": upload("clip.bin", mp3)}, format="multipart", headers=key.headers)
    data = response.json()["data"]
    assert response.status_code == 200, data
    assert data["language_detected"] == "en"
    assert word_error_rate(SPOKEN, data["transcript"]) <= 0.15


def test_force_async_is_queued_then_completed(api, speech_worker, speech_wav):
    key = key_with_policy("A", "A")
    response = api.post(TRANSCRIBE_URL, {"file": upload("speech.flac", convert_audio(speech_wav, "flac")), "force_async": "true"}, format="multipart", headers=key.headers)
    assert response.status_code == 202, response.content
    data = response.json()["data"]
    assert data["status"] == "queued"
    assert data["note"] == "Long-form transcribe runs asynchronously. Poll GET /v1/modules/scaiecho/transcribe/jobs/{id}"
    done = poll(api, key, data["job_id"])
    assert done["status"] == "completed", done
    assert word_error_rate(SPOKEN, done["transcript"]) <= 0.15
    assert done["status_reason"] is None
    assert not default_storage.exists(staged_name(job_id=data["job_id"], ext="flac"))


def test_file_over_threshold_goes_async_on_its_own(api, speech_worker, speech_wav, settings):
    settings.SCAIECHO_ASYNC_AUDIO_THRESHOLD_BYTES = len(speech_wav) - 1
    key = key_with_policy("A", "A")
    response = api.post(TRANSCRIBE_URL, {"file": upload("speech.wav", speech_wav)}, format="multipart", headers=key.headers)
    assert response.status_code == 202
    job_id = response.json()["data"]["job_id"]
    assert TranscriptionJob.objects.get(pk=job_id).is_async
    assert poll(api, key, job_id)["status"] == "completed"


def test_seed_httpx_snippet_against_a_live_server(live_server, speech_worker, speech_wav, tmp_path):
    key = key_with_policy("AB", "A")
    path = tmp_path / "meeting.wav"
    path.write_bytes(speech_wav)
    with path.open("rb") as audio:
        resp = httpx.post(
            f"{live_server.url}/v1/modules/scaiecho/transcribe",
            headers={"Authorization": f"Bearer {key.secret}"},
            files={"file": ("meeting.wav", audio, "audio/wav")},
            data={"language_hint": "en"},
            timeout=120,
        )
    assert word_error_rate(SPOKEN, resp.json()["data"]["transcript"]) <= 0.15


@pytest.mark.parametrize(
    ("name", "make", "status", "code"),
    [
        ("empty.wav", lambda wav: b"", 415, "UNSUPPORTED_MEDIA"),
        ("notes.wav", lambda wav: b"these are meeting notes, not audio\n" * 20, 415, "UNSUPPORTED_MEDIA"),
        ("image.wav", lambda wav: b"\x89PNG\r\n\x1a\n" + bytes(200), 415, "UNSUPPORTED_MEDIA"),
        ("header.wav", lambda wav: wav[:44], 415, "UNSUPPORTED_MEDIA"),
        ("cut.flac", lambda wav: convert_audio(wav, "flac")[:2000], 415, "UNSUPPORTED_MEDIA"),
    ],
)
def test_bad_uploads_get_their_error_and_no_usage(api, speech_worker, speech_wav, name, make, status, code):
    key = key_with_policy("A", "A")
    response = api.post(TRANSCRIBE_URL, {"file": upload(name, make(speech_wav))}, format="multipart", headers=key.headers)
    assert_error(response, status, code)
    assert not UsageRecord.objects.filter(tenant=key.tenant).exists()
    failure = AuditEvent.objects.get(tenant_id=key.tenant.pk, action="transcription.create", outcome="FAILURE")
    assert failure.details["code"] == code


def test_corrupt_audio_in_an_async_job_fails_with_decode_failure(api, speech_worker, speech_wav):
    key = key_with_policy("A", "A")
    flac = convert_audio(speech_wav, "flac")
    corrupt = flac[: len(flac) // 2]  # a sound header: only decoding finds the file cut short
    response = api.post(TRANSCRIBE_URL, {"file": upload("c.flac", corrupt), "force_async": "1"}, format="multipart", headers=key.headers)
    assert response.status_code == 202, response.content
    done = poll(api, key, response.json()["data"]["job_id"])
    assert (done["status"], done["status_reason"]) == ("failed", "decode failure")
    assert done["transcript"] is None


def test_oversize_upload_is_413(api, speech_worker, speech_wav, settings):
    settings.SCAIECHO_MAX_UPLOAD_BYTES = len(speech_wav) - 1
    key = key_with_policy("A", "A")
    response = api.post(TRANSCRIBE_URL, {"file": upload("speech.wav", speech_wav)}, format="multipart", headers=key.headers)
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_too_long_audio_is_422_and_not_metered(api, speech_worker):
    """The worker's limit is 120 s (SCAIECHO_MAX_AUDIO_SECONDS in worker_env)."""
    key = key_with_policy("A", "A")
    long_audio = silence_wav(seconds=125)
    response = api.post(TRANSCRIBE_URL, {"file": upload("long.wav", long_audio)}, format="multipart", headers=key.headers)
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["field"] == "file"
    job = TranscriptionJob.objects.get(tenant=key.tenant)
    assert (job.status, job.status_reason) == ("failed", "audio too long")
    assert not UsageRecord.objects.filter(tenant=key.tenant).exists()


def test_jobs_are_visible_only_to_their_owner(api, speech_worker, speech_wav):
    owner = key_with_policy("A", "A")
    response = api.post(TRANSCRIBE_URL, {"file": upload("s.wav", speech_wav), "force_async": "true"}, format="multipart", headers=owner.headers)
    job_id = response.json()["data"]["job_id"]
    colleague = KeyFactory.issue(role=Role.TENANT_ADMIN, tenant=owner.tenant)
    other_tenant = KeyFactory.issue(role=Role.TENANT_ADMIN)
    same_user_other_key = KeyFactory.issue(membership=owner.membership)
    for key in (colleague, other_tenant):
        assert_error(api.get(job_url(job_id), headers=key.headers), 404, "NOT_FOUND")
    assert api.get(job_url(job_id), headers=same_user_other_key.headers).status_code == 200
    assert_error(api.get(job_url(str(uuid.uuid4())), headers=owner.headers), 404, "NOT_FOUND")
    assert_error(api.get(job_url("not-a-uuid"), headers=owner.headers), 404, "NOT_FOUND")
    assert poll(api, owner, job_id)["status"] == "completed"


def test_viewer_may_transcribe_but_tenant_user_may_not(api, speech_worker, speech_wav):
    user = key_with_policy("A", "A", role=Role.TENANT_USER)
    assert_error(api.post(TRANSCRIBE_URL, {"file": upload("s.wav", speech_wav)}, format="multipart", headers=user.headers), 403, "AUTHZ_PERMISSION_DENIED")
    viewer = key_with_policy("A", "A", role=Role.TENANT_VIEWER)
    assert api.post(TRANSCRIBE_URL, {"file": upload("s.wav", speech_wav)}, format="multipart", headers=viewer.headers).status_code == 200


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"language_hint": "eng"}, "language_hint"),
        ({"backend_preference": "fastest"}, "backend_preference"),
        ({"temperature": "1.5"}, "temperature"),
        ({}, "file"),
    ],
)
def test_invalid_fields_are_422(api, speech_worker, speech_wav, payload, field):
    key = key_with_policy("A", "A")
    body = {"file": upload("s.wav", speech_wav), **payload} if field != "file" else {"language_hint": "en"}
    response = api.post(TRANSCRIBE_URL, body, format="multipart", headers=key.headers)
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert field in {d["field"] for d in error["error"]["details"]}


def test_no_available_backend_is_502(api, no_worker_alive, transactional_db, speech_wav, settings):
    key = key_with_policy("A", "A")
    assert_error(api.post(TRANSCRIBE_URL, {"file": upload("s.wav", speech_wav)}, format="multipart", headers=key.headers), 502, "SCAIECHO_BACKEND_UNAVAILABLE")
    settings.SCAIECHO_RELAY_BASE_URL = ""
    other = key_with_policy("AB", "B")
    assert_error(api.post(TRANSCRIBE_URL, {"file": upload("s.wav", speech_wav)}, format="multipart", headers=other.headers), 502, "SCAIECHO_BACKEND_UNAVAILABLE")
    assert not TranscriptionJob.objects.exists()


def test_budget_exceeded_refuses_before_spending(api, speech_worker, speech_wav):
    from tenants.models import TenantBudget

    key = key_with_policy("A", "A")
    TenantBudget.objects.create(tenant=key.tenant, period="total", limit_audio_seconds=1, hard_action="block")
    UsageRecord.objects.create(tenant=key.tenant, backend="A", kind="batch", audio_duration_ms=2000, latency_ms=1, cost=0, reference="earlier")
    response = api.post(TRANSCRIBE_URL, {"file": upload("s.wav", speech_wav)}, format="multipart", headers=key.headers)
    assert_error(response, 429, "BUDGET_EXCEEDED")
    assert UsageRecord.objects.filter(tenant=key.tenant).count() == 1
    assert not TranscriptionJob.objects.filter(tenant=key.tenant).exists()


def test_budget_exhausted_between_enqueue_and_dispatch_fails_queued_job(api, speech_worker, speech_wav, worker_process):
    from tenants.models import TenantBudget

    key = key_with_policy("A", "A")
    job = TranscriptionJob.objects.create(
        tenant=key.tenant, user=key.membership.user, api_key=key.key, is_async=True,
        audio_sha256="0" * 64, audio_bytes=len(speech_wav), audio_ext="wav",
    )
    TenantBudget.objects.create(tenant=key.tenant, period="monthly", limit_audio_seconds=1, hard_action="block")
    UsageRecord.objects.create(tenant=key.tenant, backend="A", kind="batch", audio_duration_ms=5000, latency_ms=1, cost=0, reference="x")
    from transcription.tasks import process_transcribe_job

    process_transcribe_job.delay(str(job.id))
    done = poll(api, key, str(job.id))
    assert (done["status"], done["status_reason"]) == ("failed", "quota exceeded")


def test_every_call_is_audited(api, speech_worker, speech_wav):
    key = key_with_policy("A", "A")
    response = api.post(TRANSCRIBE_URL, {"file": upload("s.wav", speech_wav)}, format="multipart", headers={**key.headers, "X-Request-Id": "batch-req-0001"})
    job_id = response.json()["data"]["job_id"]
    api.get(job_url(job_id), headers={**key.headers, "X-Request-Id": "batch-req-0002"})
    assert AuditEvent.objects.get(request_id="batch-req-0001").resource_id == job_id
    assert AuditEvent.objects.get(request_id="batch-req-0002").action == "transcription.read"
    assert ApiKey.objects.get(pk=key.key.pk).last_used_at is not None
