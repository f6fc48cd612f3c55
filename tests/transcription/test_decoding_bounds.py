"""Decoding bounds through the API: refused formats, rates and durations answer in the envelope
before a job exists, and a worker stops decoding at the limit or the budget without billing."""

from __future__ import annotations

import time

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from tenants.models import BudgetAction, BudgetPeriod, Role, TenantBudget, TenantPolicy, UsageRecord
from tests.factories import KeyFactory
from tests.speech.test_audio import _png
from tests.speech.test_audio_bounds import FFCONCAT, WEBVTT, live_webm, pcm_wav
from tests.tenants.test_auth import assert_error
from transcription.models import TranscriptionJob
from transcription.storage import STAGING_PREFIX

TRANSCRIBE_URL = "/v1/modules/scaiecho/transcribe"
OPENAI_URL = "/oai/v1/audio/transcriptions"


def key_on_backend_a(role: str = Role.TENANT_ADMIN):
    key = KeyFactory.issue(role=role)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    return key


def post(api, key, data: bytes, *, url: str = TRANSCRIBE_URL, **fields: str):
    form = {"file": SimpleUploadedFile("meeting.wav", data), **fields}
    if url == OPENAI_URL:
        form["model"] = "whisper-1"
    return api.post(url, form, format="multipart", headers=key.headers)


def staged() -> set[str]:
    return set(default_storage.listdir(STAGING_PREFIX)[1]) if default_storage.exists(STAGING_PREFIX) else set()


REFUSED = [
    pytest.param(lambda: FFCONCAT, "not supported", id="ffconcat"),
    pytest.param(lambda: WEBVTT, "not supported", id="webvtt"),
    pytest.param(_png, "not supported", id="png"),
    pytest.param(lambda: pcm_wav(rate=1, samples=3600), "1 Hz", id="wav-1-hz"),
    pytest.param(lambda: pcm_wav(rate=4_000, samples=4_000), "4000 Hz", id="wav-4-khz"),
    pytest.param(lambda: pcm_wav(rate=384_000, samples=38_400), "384000 Hz", id="wav-384-khz"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("make", "says"), REFUSED)
@pytest.mark.parametrize("url", [TRANSCRIBE_URL, OPENAI_URL])
def test_refused_formats_and_rates_are_415_before_any_job(api, make, says: str, url: str) -> None:
    # A viewer key: the report's attacker needed nothing more.
    key = key_on_backend_a(Role.TENANT_VIEWER)
    before = staged()

    response = post(api, key, make(), url=url)

    body = assert_error(response, 415, "UNSUPPORTED_MEDIA")
    assert says in body["error"]["message"]
    assert not TranscriptionJob.objects.exists()
    assert not UsageRecord.objects.exists()
    assert not staged() - before  # nothing new (a worker may still be removing earlier tests' files)


@pytest.mark.django_db
@pytest.mark.parametrize("force_async", ["false", "true"])
def test_a_declared_duration_over_the_limit_is_422_before_any_job(api, settings, force_async: str) -> None:
    settings.SCAIECHO_MAX_AUDIO_SECONDS = 5
    key = key_on_backend_a()
    before = staged()

    response = post(api, key, pcm_wav(rate=16_000, samples=10 * 16_000), force_async=force_async)

    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert "10.0 s long" in body["error"]["message"]
    assert "at most 5 s" in body["error"]["message"]
    assert body["error"]["details"] == [{"field": "file", "message": "Audio longer than 5 s."}]
    assert not TranscriptionJob.objects.exists()
    assert not staged() - before  # nothing new (a worker may still be removing earlier tests' files)


@pytest.mark.django_db
def test_audio_longer_than_the_budget_left_is_429_at_intake(api) -> None:
    key = key_on_backend_a()
    TenantBudget.objects.create(
        tenant=key.tenant, period=BudgetPeriod.TOTAL, limit_audio_seconds=8, hard_action=BudgetAction.BLOCK
    )
    UsageRecord.objects.create(tenant=key.tenant, backend="A", kind="batch", audio_duration_ms=3000, latency_ms=1, cost=0, reference="earlier")

    too_long = post(api, key, pcm_wav(rate=16_000, samples=10 * 16_000), force_async="true")
    fits = post(api, key, pcm_wav(rate=16_000, samples=4 * 16_000), force_async="true")

    body = assert_error(too_long, 429, "BUDGET_EXCEEDED")
    assert "10.0 s long" in body["error"]["message"]
    assert "5.0 s of the budget are left" in body["error"]["message"]
    assert fits.status_code == 202, fits.content
    assert TranscriptionJob.objects.count() == 1  # only the one that fits
    assert UsageRecord.objects.count() == 1  # nothing billed beyond the earlier use


def wait_terminal(job_id: str, timeout: float = 120) -> TranscriptionJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = TranscriptionJob.objects.get(pk=job_id)
        if job.is_terminal:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status}")


@pytest.mark.slow
def test_a_worker_stops_decoding_at_the_limit_when_the_container_has_no_duration(api, speech_worker) -> None:
    # The worker runs with SCAIECHO_MAX_AUDIO_SECONDS=120 (tests/workers.py); a live WebM says no
    # length, so intake cannot refuse it and the worker must stop decoding at 120 s.
    key = key_on_backend_a()

    response = post(api, key, live_webm(150), force_async="true")

    assert response.status_code == 202, response.content
    job = wait_terminal(response.json()["data"]["job_id"])
    assert (job.status, job.status_reason, job.error_code) == ("failed", "audio too long", "VALIDATION_ERROR")
    assert job.audio_duration_ms is None
    assert not UsageRecord.objects.filter(tenant=key.tenant).exists()
    assert not default_storage.exists(job.staged_path)


@pytest.mark.slow
def test_a_worker_stops_decoding_at_the_budget_left(api, speech_worker) -> None:
    key = key_on_backend_a()
    TenantBudget.objects.create(
        tenant=key.tenant, period=BudgetPeriod.TOTAL, limit_audio_seconds=8, hard_action=BudgetAction.BLOCK
    )
    UsageRecord.objects.create(tenant=key.tenant, backend="A", kind="batch", audio_duration_ms=3000, latency_ms=1, cost=0, reference="earlier")

    # 20 s with no declared length: the web process cannot tell it is over the 5 s left.
    response = post(api, key, live_webm(20), force_async="true")

    assert response.status_code == 202, response.content
    job = wait_terminal(response.json()["data"]["job_id"])
    assert (job.status, job.status_reason, job.error_code) == ("failed", "quota exceeded", "BUDGET_EXCEEDED")
    assert list(UsageRecord.objects.filter(tenant=key.tenant).values_list("reference", flat=True)) == ["earlier"]
    polled = api.get(f"{TRANSCRIBE_URL}/jobs/{job.id}", headers=key.headers).json()["data"]
    assert (polled["status"], polled["status_reason"]) == ("failed", "quota exceeded")
