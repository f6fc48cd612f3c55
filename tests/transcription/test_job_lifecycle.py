"""A job never stays ``running`` forever, and a duplicate delivery does no work twice."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.factories import KeyFactory
from transcription.models import TranscriptionJob
from transcription.services import JobBusyElsewhere, _claim, jobs_fail_stale, worker_heartbeat

pytestmark = pytest.mark.django_db


def make_job(**fields) -> TranscriptionJob:
    key = KeyFactory.issue()
    return TranscriptionJob.objects.create(
        tenant=key.tenant, user=key.membership.user, audio_sha256="0" * 64, audio_bytes=10, audio_ext="wav", **fields
    )


def test_jobs_running_far_past_the_time_limit_fail(settings):
    settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS = 60
    stale = make_job(status="running", started_at=timezone.now() - timedelta(seconds=121), worker_id="gone@host")
    fresh = make_job(status="running", started_at=timezone.now() - timedelta(seconds=30), worker_id="w@host")
    assert jobs_fail_stale() == 1
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert (stale.status, stale.status_reason) == ("failed", "time limit exceeded")
    assert stale.completed_at is not None
    assert fresh.status == "running"


def test_finished_jobs_are_not_run_again():
    job = make_job(status="completed")
    assert _claim(job_id=str(job.id), worker_id="w2@host") is None
    assert TranscriptionJob.objects.get(pk=job.id).attempts == 0


def test_a_job_held_by_a_live_worker_is_left_to_it_and_a_dead_workers_job_is_taken_over():
    worker_heartbeat(worker_id="w1@host")
    job = make_job(status="running", worker_id="w1@host", attempts=1, started_at=timezone.now())
    with pytest.raises(JobBusyElsewhere):
        _claim(job_id=str(job.id), worker_id="w2@host")
    orphan = make_job(status="running", worker_id="dead@host", attempts=1, started_at=timezone.now())
    claimed = _claim(job_id=str(orphan.id), worker_id="w2@host")
    assert (claimed.worker_id, claimed.attempts, claimed.status) == ("w2@host", 2, "running")


def test_a_job_redelivered_too_often_fails(settings):
    settings.SCAIECHO_JOB_MAX_ATTEMPTS = 2
    job = make_job(status="running", worker_id="dead@host", attempts=2, started_at=timezone.now())
    assert _claim(job_id=str(job.id), worker_id="w2@host") is None
    job.refresh_from_db()
    assert (job.status, job.status_reason) == ("failed", "worker lost too many times")
