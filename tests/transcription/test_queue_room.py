"""Queue space (issue 11): how many unfinished jobs one key, and one tenant, may have at once.

A caller with no budget to run out of (Backend A costs nothing) could otherwise fill the queue
without end; over the bound the next upload is 429 ``RATE_LIMITED`` before anything is stored.
"""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tenants.models import Role, TenantPolicy, UsageRecord
from tests.factories import KeyFactory
from tests.tenants.test_auth import assert_error
from tests.voices import silence_wav
from transcription.models import TranscriptionJob
from transcription.services import worker_heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("jobs_nobody_takes")]

TRANSCRIBE_URL = "/v1/modules/scaiecho/transcribe"


def upload(api, key):
    form = {"file": SimpleUploadedFile("a.wav", silence_wav(seconds=1.0)), "force_async": "true"}
    return api.post(TRANSCRIBE_URL, form, format="multipart", headers=key.headers)


def test_a_key_and_a_tenant_with_a_full_queue_get_429_and_nothing_is_stored(api, settings):
    settings.SCAIECHO_MAX_UNFINISHED_JOBS_PER_KEY = 2
    settings.SCAIECHO_MAX_UNFINISHED_JOBS_PER_TENANT = 3
    worker_heartbeat(worker_id="queue-room@test")  # Backend A is up; no worker takes these jobs
    first = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=first.tenant, allowed_backends="A", default_backend="A")
    second = KeyFactory.issue(role=Role.TENANT_ADMIN, tenant=first.tenant)
    other_tenant = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=other_tenant.tenant, allowed_backends="A", default_backend="A")

    assert [upload(api, first).status_code for _ in range(2)] == [202, 202]
    refused = assert_error(upload(api, first), 429, "RATE_LIMITED")
    assert "key" in refused["error"]["message"]
    assert refused["error"]["retry_after"] == settings.SCAIECHO_QUEUE_FULL_RETRY_AFTER_SECONDS

    assert upload(api, second).status_code == 202  # the tenant's third
    refused = assert_error(upload(api, second), 429, "RATE_LIMITED")
    assert "tenant" in refused["error"]["message"]
    assert TranscriptionJob.objects.filter(tenant=first.tenant).count() == 3
    assert not UsageRecord.objects.filter(tenant=first.tenant).exists()

    assert upload(api, other_tenant).status_code == 202  # another tenant is not held back

    # A finished job makes room again.
    TranscriptionJob.objects.filter(api_key=first.key).update(status=TranscriptionJob.Status.FAILED)
    assert upload(api, first).status_code == 202
