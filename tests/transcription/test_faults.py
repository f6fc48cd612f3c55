"""Faults (issue 11, point 6): no job is ever stuck.

A broker that cannot take a job answers 503 and the job ends at once (nothing ran, nothing billed);
a job whose worker process is gone goes back to the queue and a live worker finishes it; a job
that waits in the queue too long ends with its reason instead of waiting for ever.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from scaiecho_site.celery import app as celery_app
from tenants.models import Role, TenantPolicy, UsageRecord
from tests.factories import KeyFactory
from tests.tenants.test_auth import assert_error
from tests.voices import synth_speech, word_error_rate
from transcription.models import TranscriptionJob
from transcription.services import jobs_sweep, worker_claimant, worker_heartbeat
from transcription.storage import STAGING_PREFIX, stage_upload

TRANSCRIBE_URL = "/v1/modules/scaiecho/transcribe"
SPOKEN = "Please send the quarterly report to the finance team before Friday."


def make_job(key, **fields) -> TranscriptionJob:
    return TranscriptionJob.objects.create(
        tenant=key.tenant, user=key.membership.user, api_key=key.key, audio_sha256="0" * 64, audio_bytes=10,
        audio_ext="wav", **fields,
    )


def staged_files() -> list[str]:
    try:
        return default_storage.listdir(STAGING_PREFIX)[1]
    except FileNotFoundError:
        return []


def dead_pid() -> int:
    """The pid of a process that has just exited (not reused within a test)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def broker_down() -> Iterator[None]:
    """The Celery broker unreachable (nothing listens on port 1), as in a Redis outage."""
    saved = (celery_app.conf.broker_write_url, celery_app._pool, celery_app.amqp._producer_pool)
    celery_app._pool = celery_app.amqp._producer_pool = None
    celery_app.conf.broker_write_url = "redis://127.0.0.1:1/0"
    try:
        yield
    finally:
        if celery_app._pool is not None:
            celery_app._pool.force_close_all()  # the unreachable broker's pool only
        celery_app.conf.broker_write_url, celery_app._pool, celery_app.amqp._producer_pool = saved


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("force_async", [True, False])
def test_a_broker_outage_at_enqueue_answers_503_and_leaves_no_job_waiting(api, broker_down, force_async):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    worker_heartbeat(worker_id="w@host")  # Backend A is up; only its queue is not
    before = staged_files()
    data = {"file": SimpleUploadedFile("a.wav", synth_speech(SPOKEN))}
    if force_async:
        data["force_async"] = "true"

    started = time.monotonic()
    response = api.post(TRANSCRIBE_URL, data, headers=key.headers, format="multipart")

    assert time.monotonic() - started < 15  # not the inline wait's 300 s
    body = assert_error(response, 503, "SCAIECHO_QUEUE_UNAVAILABLE")
    assert "queue" in body["error"]["message"].lower()
    # Nothing is left waiting: the job was never stored, its upload is gone, nothing is billed.
    assert not TranscriptionJob.objects.filter(tenant=key.tenant).exists()
    assert not [name for name in staged_files() if name not in before]
    assert not UsageRecord.objects.filter(tenant=key.tenant).exists()


@pytest.mark.django_db(transaction=True)
def test_a_task_whose_row_never_committed_is_dropped(settings):
    """A request that died after sending its task but before committing its row: the worker waits
    a moment for the row, then drops the task rather than fail or hang."""
    import uuid

    from transcription.services import job_run

    settings.SCAIECHO_TASK_ROW_WAIT_SECONDS = 0.3
    started = time.monotonic()
    job_run(job_id=str(uuid.uuid4()), worker_id=worker_claimant(node="w@host"), retries_left=False)
    assert 0.3 <= time.monotonic() - started < 5


@pytest.mark.django_db
def test_a_job_queued_too_long_fails_with_its_reason(settings):
    settings.SCAIECHO_JOB_MAX_QUEUED_SECONDS = 600
    key = KeyFactory.issue()
    old = make_job(key, status="queued")
    TranscriptionJob.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(seconds=601))
    young = make_job(key, status="queued")
    # Put back in the queue 5 minutes ago after its worker died: it waits since then, not since creation.
    requeued = make_job(key, status="queued", started_at=timezone.now() - timedelta(seconds=300))
    TranscriptionJob.objects.filter(pk=requeued.pk).update(created_at=timezone.now() - timedelta(days=1))

    assert jobs_sweep()["queued_too_long"] == 1

    old.refresh_from_db()
    assert (old.status, old.status_reason, old.error_code) == ("failed", "queued too long", "SCAIECHO_QUEUE_UNAVAILABLE")
    assert TranscriptionJob.objects.get(pk=young.pk).status == "queued"
    assert TranscriptionJob.objects.get(pk=requeued.pk).status == "queued"


@pytest.mark.django_db
def test_the_sweep_leaves_a_live_claim_alone_and_puts_a_dead_process_claim_back(settings):
    key = KeyFactory.issue()
    me = worker_claimant(node="w1@host")
    worker_heartbeat(worker_id="w1@host")
    long_ago = timezone.now() - timedelta(seconds=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS + 5)
    alive = make_job(key, status="running", worker_id=f"w1@host#{os.getpid()}", started_at=long_ago, attempts=1)
    just_started = make_job(key, status="running", worker_id="gone@host#1", started_at=timezone.now(), attempts=1)
    lost_process = make_job(key, status="running", worker_id=f"w1@host#{dead_pid()}", started_at=long_ago, attempts=1)
    lost_node = make_job(key, status="running", worker_id="gone@host#12", started_at=long_ago, attempts=1)

    assert jobs_sweep(me=me)["requeued"] == 2

    states = {j.pk: j.status for j in TranscriptionJob.objects.filter(tenant=key.tenant)}
    assert states[alive.pk] == "running"
    assert states[just_started.pk] == "running"  # its worker may not have beaten yet
    assert states[lost_process.pk] == "queued"
    assert states[lost_node.pk] == "queued"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_job_whose_worker_vanished_is_finished_by_a_live_worker(api, speech_worker, settings):
    """With the embedded broker a dead worker's task is gone with it: the sweep puts the job back
    and a live worker finishes it, billed once."""
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    wav = synth_speech(SPOKEN)
    long_ago = timezone.now() - timedelta(seconds=settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS + 5)
    job = make_job(key, status="running", worker_id="vanished@host#4242", started_at=long_ago, attempts=1)
    job.staged_path = stage_upload(job_id=str(job.id), ext="wav", data=wav)
    job.audio_bytes = len(wav)
    job.save(update_fields=["staged_path", "audio_bytes"])

    requeued = jobs_sweep()["requeued"]
    job.refresh_from_db()
    # Put back by this sweep, or already by the live worker's own periodic one (its heartbeat sweeps).
    assert requeued == 1 or job.worker_id != "vanished@host#4242", (requeued, job.status, job.worker_id)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status in TranscriptionJob.TERMINAL:
            break
        time.sleep(0.2)
    assert job.status == "completed", job.status_reason
    assert job.attempts == 2
    assert word_error_rate(SPOKEN, job.transcript) <= 0.2, job.transcript
    assert UsageRecord.objects.filter(tenant=key.tenant, reference=str(job.id)).count() == 1
