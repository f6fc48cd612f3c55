"""A worker killed with SIGKILL in the middle of a job does not lose it."""

from __future__ import annotations

import time
import uuid

import pytest

from tenants.models import Role, TenantPolicy
from tests.factories import KeyFactory
from tests.voices import synth_speech, word_error_rate
from tests.workers import WorkerProcess
from transcription.models import TranscriptionJob
from transcription.services import claimant_node, worker_heartbeat
from transcription.storage import stage_upload
from transcription.tasks import process_transcribe_job

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Only this test's workers listen here, not the session's worker. A fresh name each run: the killed
# worker's task stays unacknowledged in Redis and goes back to its queue, so with one name for every
# run the next run's worker was fed the last run's task (its job long gone), redelivered again and
# again at the 3 s visibility timeout, and did not reach this run's job within a minute.
QUEUE = f"crash-test-{uuid.uuid4().hex[:12]}"
# Long enough to kill the worker mid-job, and never repeating itself: Whisper reads repeated text
# as a decoding loop (compression ratio) and falls back to sampling, whose output is random.
SPOKEN = " ".join(
    [
        "Good morning everyone. Today we will review the quarterly budget and plan the next product release.",
        "Please send the report to the finance team before Friday.",
        "We need the numbers for the board meeting next week.",
        "The new office opens in March, and the movers will arrive on the second Monday.",
        "Lunch is provided on Thursday for anyone who stays for the training session.",
        "Finally, remember to update your passwords before the end of the month.",
    ]
)


def wait_for(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_killed_worker_job_completes_on_a_new_worker(worker_env, tmp_path):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    wav = synth_speech(SPOKEN)
    env = {
        **worker_env,
        # The replacement worker puts unacknowledged jobs back on the queue after 3 s (default 1 h).
        "SCAIECHO_BROKER_VISIBILITY_TIMEOUT": "3",
        "SCAIECHO_BROKER_RESTORE_INTERVAL": "1",
        "SCAIECHO_BROKER_RESTORE_THROTTLE": "1",
    }
    first = WorkerProcess(name="crash1", env=env, log_path=tmp_path / "crash1.log", queue=QUEUE, concurrency=1)
    second = None
    try:
        first.wait_ready()
        worker_heartbeat(worker_id=first.node)
        job = TranscriptionJob(
            tenant=key.tenant, user=key.membership.user, api_key=key.key, is_async=True,
            audio_sha256="0" * 64, audio_bytes=len(wav), audio_ext="wav",
        )
        job.staged_path = stage_upload(job_id=str(job.id), ext="wav", data=wav)
        job.save()
        process_transcribe_job.apply_async(args=[str(job.id)], queue=QUEUE)

        wait_for(
            lambda: TranscriptionJob.objects.filter(pk=job.id, status="running", worker_id__startswith=f"{first.node}#").exists(),
            timeout=60,
            what="the first worker to start the job",
        )
        time.sleep(1.0)  # well inside the ~5 s of inference
        first.kill()
        assert TranscriptionJob.objects.get(pk=job.id).status == "running"

        second = WorkerProcess(name="crash2", env=env, log_path=tmp_path / "crash2.log", queue=QUEUE, concurrency=1)
        second.wait_ready()
        done = wait_for(
            lambda: TranscriptionJob.objects.filter(pk=job.id, status__in=["completed", "failed"]).first(),
            timeout=120,
            what="the job to finish on the second worker",
        )
        assert done.status == "completed", (done.status_reason, second.log_path.read_text()[-2000:])
        assert claimant_node(done.worker_id) == second.node
        assert done.attempts == 2
        assert word_error_rate(SPOKEN, done.transcript) <= 0.15
    finally:
        first.stop()
        if second is not None:
            second.stop()
