"""What an operator sees in the transcription admin: the dashboard, the job list and a job's result."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tests.factories import TenantFactory, UserFactory
from transcription.models import SpeechWorker, TranscriptionJob

pytestmark = pytest.mark.django_db

JOBS_URL = "/admin/transcription/transcriptionjob/"
WORKERS_URL = "/admin/transcription/speechworker/"


def make_job(**fields: Any) -> TranscriptionJob:
    defaults: dict[str, Any] = {
        "audio_sha256": "0" * 64,
        "audio_bytes": 1000,
        "audio_ext": "wav",
    }
    if "tenant" not in fields:
        defaults["tenant"] = TenantFactory()
    job = TranscriptionJob.objects.create(**{**defaults, **fields})
    if "created_at" in fields:  # auto_now_add ignores the value given to create()
        TranscriptionJob.objects.filter(pk=job.pk).update(created_at=fields["created_at"])
    return job


def make_worker(worker_id: str, *, expires_in: timedelta, **fields: Any) -> SpeechWorker:
    now = timezone.now()
    return SpeechWorker.objects.create(
        worker_id=worker_id, last_seen_at=now - timedelta(seconds=5), expires_at=now + expires_in, **fields
    )


def listed_ids(admin_client, query: str = "") -> set[str]:
    response = admin_client.get(JOBS_URL + query)
    assert response.status_code == 200
    return set(re.findall(r'href="/admin/transcription/transcriptionjob/([0-9a-f-]{36})/change/', response.content.decode()))


def cell(page: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}">([^<]*)<', page)
    assert match, f"{element_id} not on the page"
    return match.group(1).strip()


@pytest.fixture
def jobs() -> dict[str, TranscriptionJob]:
    acme = TenantFactory(slug="acme")
    globex = TenantFactory(slug="globex")
    now = timezone.now()
    return {
        "done_a": make_job(tenant=acme, status="completed", backend_used="A", completed_at=now, audio_duration_ms=4200),
        "done_b": make_job(tenant=globex, status="completed", backend_used="B", completed_at=now, is_async=True),
        "failed": make_job(tenant=acme, status="failed", error_code="UNSUPPORTED_MEDIA", completed_at=now),
        "timeout": make_job(tenant=globex, status="failed", error_code="BACKEND_TIMEOUT", completed_at=now, source="openai"),
        "queued": make_job(tenant=acme, status="queued", is_async=True, audio_sha256="ab" * 32),
    }


def ids(jobs: dict[str, TranscriptionJob], *names: str) -> set[str]:
    return {str(jobs[name].pk) for name in names}


def test_list_filters_return_the_right_jobs(admin_client, jobs):
    acme = jobs["done_a"].tenant
    assert listed_ids(admin_client) == ids(jobs, *jobs)
    assert listed_ids(admin_client, "?status__exact=failed") == ids(jobs, "failed", "timeout")
    assert listed_ids(admin_client, "?backend_used__exact=B") == ids(jobs, "done_b")
    assert listed_ids(admin_client, f"?tenant__id__exact={acme.pk}") == ids(jobs, "done_a", "failed", "queued")
    assert listed_ids(admin_client, "?error_code=BACKEND_TIMEOUT") == ids(jobs, "timeout")
    assert listed_ids(admin_client, "?has_error=yes") == ids(jobs, "failed", "timeout")
    assert listed_ids(admin_client, "?has_error=no") == ids(jobs, "done_a", "done_b", "queued")
    assert listed_ids(admin_client, "?is_async__exact=1") == ids(jobs, "done_b", "queued")
    assert listed_ids(admin_client, "?source__exact=openai") == ids(jobs, "timeout")


def test_search_by_id_tenant_username_and_hash(admin_client, jobs):
    user = UserFactory(username="carol")
    jobs["done_b"].user = user
    jobs["done_b"].save(update_fields=["user"])
    assert listed_ids(admin_client, f"?q={jobs['failed'].pk}") == ids(jobs, "failed")
    assert listed_ids(admin_client, "?q=globex") == ids(jobs, "done_b", "timeout")
    assert listed_ids(admin_client, "?q=carol") == ids(jobs, "done_b")
    assert listed_ids(admin_client, f"?q={'ab' * 32}") == ids(jobs, "queued")


def test_list_shows_duration_in_seconds(admin_client, jobs):
    page = admin_client.get(JOBS_URL).content.decode()
    assert '<td class="field-audio_duration">4.2</td>' in page


def test_dashboard_shows_backlog_workers_and_last_day(admin_client):
    tenant = TenantFactory()
    now = timezone.now()
    for _ in range(3):
        make_job(tenant=tenant, status="queued")
    make_job(tenant=tenant, status="queued", created_at=now - timedelta(minutes=10))
    make_job(tenant=tenant, status="running", started_at=now)
    make_job(tenant=tenant, status="completed", completed_at=now - timedelta(hours=1))
    make_job(tenant=tenant, status="completed", completed_at=now - timedelta(hours=2))
    make_job(tenant=tenant, status="completed", completed_at=now - timedelta(hours=30))  # older than a day
    make_job(tenant=tenant, status="failed", error_code="BACKEND_ERROR", completed_at=now - timedelta(hours=3))
    make_worker("batch@gpu-1", expires_in=timedelta(seconds=20), model_name="large-v3", device="cuda")
    make_worker("batch@gone", expires_in=timedelta(seconds=-1), model_name="small", device="cpu")

    page = admin_client.get(JOBS_URL).content.decode()

    assert cell(page, "backlog-queued") == "4"
    assert cell(page, "backlog-running") == "1"
    assert cell(page, "completed-24h") == "2"
    assert cell(page, "failed-24h") == "1"
    oldest = cell(page, "oldest-queued")
    assert oldest.endswith(" s")
    assert 600 <= int(oldest.removesuffix(" s")) < 700
    live = re.findall(r'class="live-worker" data-worker="([^"]+)"', page)
    assert live == ["batch@gpu-1"]
    assert "large-v3" in page
    assert "cuda" in page


def test_dashboard_with_nothing_queued_and_only_expired_workers(admin_client):
    make_worker("batch@gone", expires_in=timedelta(seconds=-1))
    page = admin_client.get(JOBS_URL).content.decode()
    assert cell(page, "backlog-queued") == "0"
    assert cell(page, "oldest-queued") == "none queued"
    assert 'id="no-live-workers"' in page
    assert "batch@gone" not in page


def test_detail_page_shows_transcript_and_segments_and_no_audio(admin_client):
    job = make_job(
        status="completed",
        backend_used="A",
        transcript="Please send the report to the finance team before Friday.",
        segments=[
            {"start": 0.0, "end": 2.5, "text": "Please send the report"},
            {"start": 2.5, "end": 5.25, "text": "to the finance team before Friday."},
        ],
        staged_path="scaiecho/transcribe_jobs/x.wav",
        completed_at=timezone.now(),
    )
    response = admin_client.get(f"{JOBS_URL}{job.pk}/change/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "Please send the report to the finance team before Friday." in page
    assert "<td>2.50</td><td>5.25</td><td>to the finance team before Friday.</td>" in page
    assert "audio deleted after completion" in page
    assert "scaiecho/transcribe_jobs/x.wav" not in page
    # Read-only: no form to save, no delete link.
    assert 'name="_save"' not in page
    assert "/delete/" not in page


def test_detail_page_of_a_queued_job_shows_where_its_audio_is_staged(admin_client):
    job = make_job(status="queued", staged_path="scaiecho/transcribe_jobs/y.wav")
    page = admin_client.get(f"{JOBS_URL}{job.pk}/change/").content.decode()
    assert "scaiecho/transcribe_jobs/y.wav" in page
    assert "audio deleted after completion" not in page


def test_jobs_and_workers_cannot_be_added_changed_or_deleted(admin_client):
    job = make_job(status="failed", error_code="BACKEND_ERROR", completed_at=timezone.now())
    worker = make_worker("batch@gpu-1", expires_in=timedelta(seconds=20))
    assert admin_client.get(f"{JOBS_URL}add/").status_code == 403
    assert admin_client.get(f"{WORKERS_URL}add/").status_code == 403
    assert admin_client.post(f"{JOBS_URL}{job.pk}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.post(f"{WORKERS_URL}{worker.pk}/delete/", {"post": "yes"}).status_code == 403
    response = admin_client.post(f"{JOBS_URL}{job.pk}/change/", {"status": "completed", "transcript": "forged"})
    assert response.status_code == 403
    job.refresh_from_db()
    assert (job.status, job.transcript) == ("failed", "")
    bulk = admin_client.post(JOBS_URL, {"action": "delete_selected", "_selected_action": [str(job.pk)], "post": "yes"})
    assert bulk.status_code in (200, 302)
    assert TranscriptionJob.objects.filter(pk=job.pk).exists()


def test_worker_list_marks_expired_workers_as_not_alive(admin_client):
    make_worker("batch@gpu-1", expires_in=timedelta(seconds=20))
    make_worker("batch@gone", expires_in=timedelta(seconds=-1))
    page = admin_client.get(WORKERS_URL).content.decode()
    rows = dict(re.findall(r'<a href="[^"]+">(batch@[\w-]+)</a>.*?<td class="field-alive"><img src="[^"]*icon-(yes|no)', page, re.S))
    assert rows == {"batch@gpu-1": "yes", "batch@gone": "no"}
