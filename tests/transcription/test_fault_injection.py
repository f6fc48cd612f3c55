"""Faults injected into real processes mid-job (issue 11, "Done when": Redis restarted mid-job,
PostgreSQL connections dropped mid-job, SIGKILL of the web process during an inline wait).

Each test runs a real Celery worker process (and, for the web process, a real daphne server) on
the test database, starts a job of about twenty seconds of speech, breaks something while the
worker transcribes it, and then checks what a client would see: the job ends ``completed``, or
``failed`` with a reason, within the sweep's reach (never left ``queued``/``running``); it is
billed at most once (exactly once when completed); and the service still takes the next job.

Redis: the shared Redis of the test run is never restarted. The test starts a redis-server of its
own on a free port as the worker's broker and cache, SIGKILLs it mid-job and starts it again on
the same port, empty (no persistence), as a crashed Redis without a disk would come back.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from django.db import connection

from scaiecho_site.celery import app as celery_app
from tenants.models import Role, TenantPolicy, UsageRecord
from tests.factories import IssuedKey, KeyFactory, staged_job
from tests.processes import ManagedProcess
from tests.transcription.test_worker_crash import SPOKEN, wait_for
from tests.voices import synth_speech, word_error_rate
from tests.workers import DaphneServer, WorkerProcess
from transcription.models import TranscriptionJob
from transcription.services import worker_heartbeat
from transcription.tasks import process_transcribe_job

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

QUEUE = "fault-injection"  # only this module's workers listen here, not the session's worker
SHORT = "Please send the quarterly report to the finance team before Friday."
# The sweep runs every third of the heartbeat TTL (6 s for the test workers); a job still
# queued or running this long after the fault is stuck.
SETTLE_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tenant_on_backend_a() -> IssuedKey:
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    return key


def enqueue(job: TranscriptionJob, broker_url: str | None = None) -> None:
    if broker_url is None:
        process_transcribe_job.apply_async(args=[str(job.id)], queue=QUEUE)
        return
    with celery_app.connection_for_write(broker_url) as conn:
        process_transcribe_job.apply_async(args=[str(job.id)], queue=QUEUE, connection=conn)


def wait_running(job: TranscriptionJob, worker: WorkerProcess) -> None:
    wait_for(
        lambda: TranscriptionJob.objects.filter(pk=job.id, status="running", worker_id__startswith=f"{worker.node}#").exists(),
        timeout=90,
        what="the worker to start the job",
    )


def settled(job: TranscriptionJob, *, log: Path) -> TranscriptionJob:
    """The job once it is completed or failed; fails the test if it stays queued/running."""
    done = TranscriptionJob.objects.filter(pk=job.id, status__in=TranscriptionJob.TERMINAL).first
    try:
        return wait_for(done, timeout=SETTLE_S, what=f"job {job.id} to end")
    except AssertionError:
        row = TranscriptionJob.objects.get(pk=job.id)
        raise AssertionError(f"job stuck {row.status} ({row.worker_id}):\n{log.read_text()[-3000:]}") from None


def assert_ended_once(job: TranscriptionJob, *, spoken: str) -> None:
    """Completed with the right words and billed once, or failed with a reason and not billed."""
    billed = UsageRecord.objects.filter(tenant=job.tenant, reference=str(job.id)).count()
    if job.status == "completed":
        assert billed == 1
        assert word_error_rate(spoken, job.transcript) <= 0.2, job.transcript
    else:
        assert job.status == "failed"
        assert job.status_reason
        assert billed == 0


@pytest.fixture
def fault_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``start(**env)``: a Celery worker (concurrency 1) on this module's queue, ready and announced."""
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        name = f"fault{len(started)}"
        worker = WorkerProcess(name=name, env={**worker_env, **env}, log_path=tmp_path / f"{name}.log", queue=QUEUE, concurrency=1)
        started.append(worker)
        worker.wait_ready()
        worker_heartbeat(worker_id=worker.node)
        return worker

    yield start
    for worker in started:
        worker.stop()


class RedisServer(ManagedProcess):
    """A private redis-server on ``port``, without persistence: a restart comes back empty."""

    def __init__(self, *, port: int, log_path: Path) -> None:
        self.port = port
        super().__init__(
            command=["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            env={},
            log_path=log_path,
        )
        self.wait_until(self._answers, timeout=20, what="redis-server")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


# --- (a) Redis restarted mid-job -------------------------------------------------------------------


def test_a_redis_restarted_mid_job_loses_no_job_and_bills_once(fault_worker, tmp_path):
    # Given a worker whose broker and cache are a Redis of this test's own
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis = RedisServer(port=port, log_path=tmp_path / "redis1.log")
    try:
        worker = fault_worker(REDIS_URL=redis_url, CELERY_BROKER_URL=redis_url)
        key = tenant_on_backend_a()
        job = staged_job(key, synth_speech(SPOKEN))
        enqueue(job, redis_url)
        wait_running(job, worker)

        # When Redis dies (SIGKILL) while the worker transcribes, and comes back empty on the same port
        time.sleep(1.0)
        redis.kill()
        time.sleep(2.0)
        redis = RedisServer(port=port, log_path=tmp_path / "redis2.log")

        # Then the job ends, completed or failed with its reason, and is billed at most once
        done = settled(job, log=worker.log_path)
        assert_ended_once(done, spoken=SPOKEN)
        # And the worker took up the restarted broker (it declares its queue again on
        # reconnecting; a message sent before that has no queue to go to): the next job completes
        wait_for(
            lambda: worker.log_path.read_bytes().count(b"Connected to redis://") >= 2,
            timeout=60,
            what="the worker to reconnect to the restarted Redis",
        )
        after = staged_job(key, synth_speech(SHORT))
        enqueue(after, redis_url)
        assert settled(after, log=worker.log_path).status == "completed"
        assert_ended_once(TranscriptionJob.objects.get(pk=after.id), spoken=SHORT)
    finally:
        redis.stop()


# --- (b) PostgreSQL connections dropped mid-job ---------------------------------------------------


def terminate_other_connections() -> int:
    """What a database restart or failover does to every client: their connections end."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_postgresql_connections_dropped_mid_job_lose_no_job_and_bill_once(fault_worker):
    # Given a worker transcribing a job
    worker = fault_worker()
    key = tenant_on_backend_a()
    job = staged_job(key, synth_speech(SPOKEN))
    enqueue(job)
    wait_running(job, worker)

    # When every other connection to the database is terminated mid-job (twice: the worker's
    # heartbeat and its task each hold one, and the task may not have had its own open yet)
    time.sleep(1.0)
    assert terminate_other_connections() >= 1
    time.sleep(1.0)
    terminate_other_connections()

    # Then the job ends, billed at most once; the database answers again at once, so the job is
    # run again on a fresh connection and completes (nothing of the first try was committed)
    done = settled(job, log=worker.log_path)
    assert_ended_once(done, spoken=SPOKEN)
    assert done.status == "completed", (done.status_reason, worker.log_path.read_text()[-2000:])
    # And the worker reconnects: the next job completes
    after = staged_job(key, synth_speech(SHORT))
    enqueue(after)
    assert settled(after, log=worker.log_path).status == "completed"


# --- (c) SIGKILL of the web process during an inline wait ------------------------------------------


def test_a_web_process_killed_during_an_inline_wait_leaves_its_job_to_finish_once(speech_worker, worker_env, tmp_path):
    # Given a real daphne server of this test's own (the session's worker takes its jobs)
    server = DaphneServer(env=worker_env, log_path=tmp_path / "daphne.log")
    try:
        key = tenant_on_backend_a()
        wav = synth_speech(SPOKEN)

        # When an inline request waits for its job and the web process is SIGKILLed meanwhile
        def post() -> int | str:
            try:
                return httpx.post(
                    f"{server.url}/v1/modules/scaiecho/transcribe",
                    headers=key.headers,
                    files={"file": ("speech.wav", wav, "audio/wav")},
                    data={"language_hint": "en"},
                    timeout=120,
                ).status_code
            except httpx.TransportError as exc:
                return type(exc).__name__

        with ThreadPoolExecutor(max_workers=1) as pool:
            answer = pool.submit(post)
            # (Once a worker runs it: its task was on the queue. A web process killed between the
            # row's commit and the enqueue leaves a queued job without a task; see the report.)
            job = wait_for(
                lambda: TranscriptionJob.objects.filter(tenant=key.tenant, status="running").first(),
                timeout=60,
                what="the inline request's job to run",
            )
            assert not job.is_async
            assert not answer.done()  # the request is waiting inline for it
            server.kill()
            # The client saw its connection drop, not an answer
            assert isinstance(answer.result(timeout=60), str), answer.result()

        # Then the job still ends, once: completed and billed once (or failed with its reason)
        done = settled(job, log=speech_worker.log_path)
        assert_ended_once(done, spoken=SPOKEN)
        assert TranscriptionJob.objects.filter(tenant=key.tenant).count() == 1
    finally:
        server.stop()
