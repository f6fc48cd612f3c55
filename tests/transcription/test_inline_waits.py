"""Inline waits (issue 11): how many inline requests may wait, per process and per tenant, and how a
waiter learns that its job finished (a Redis notification, with a row re-check as a safety net).

No speech worker runs here: a job is finished from another thread through the very service the
worker ends a job with (``job_complete``), so the timing is the wait's own, not Whisper's.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from rest_framework.test import APIClient

from speech.engines.base import Segment, TranscriptionResult
from tenants.context import ActorContext
from tenants.models import AuditEvent, UsageRecord
from tests.processes import ManagedProcess
from tests.tenants.test_auth import assert_error
from tests.transcription.test_batch_api import key_with_policy
from tests.voices import silence_wav
from transcription.apis import ASYNC_NOTE
from transcription.models import TranscriptionJob
from transcription.services import job_complete, job_create, job_wait, worker_heartbeat
from transcription.storage import staged_name

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("jobs_nobody_takes")]

TRANSCRIBE_URL = "/v1/modules/scaiecho/transcribe"
OAI_URL = "/oai/v1/audio/transcriptions"
SAID = "the quarterly budget is approved"

# Another web process: it takes inline-wait slots of a tenant in the shared cache and holds them
# (as requests waiting there would) until it is killed.
HOLDER = """
import sys, time
import django
django.setup()
from transcription.limits import inline_wait_acquire
for _ in range(int(sys.argv[2])):
    inline_wait_acquire(tenant_id=sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def wav() -> bytes:
    return silence_wav(seconds=2.0)


@pytest.fixture(autouse=True)
def _backend_a_alive(transactional_db: None) -> None:
    # Backend A counts as available while a worker's heartbeat is current; none runs jobs here.
    worker_heartbeat(worker_id="inline-waits@test")


@pytest.fixture
def holder(tmp_path: Path, settings) -> Iterator[Callable[..., ManagedProcess]]:
    started: list[ManagedProcess] = []

    def start(*, tenant_id: str, slots: int) -> ManagedProcess:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "scaiecho_site.settings",
            "SCAIECHO_INLINE_MAX_WAITING_PER_TENANT": str(settings.SCAIECHO_INLINE_MAX_WAITING_PER_TENANT),
            "SCAIECHO_INLINE_SLOT_TTL_SECONDS": str(settings.SCAIECHO_INLINE_SLOT_TTL_SECONDS),
        }
        process = ManagedProcess(
            command=[sys.executable, "-c", HOLDER, tenant_id, str(slots)], env=env, log_path=tmp_path / f"holder{len(started)}.log"
        )
        started.append(process)
        process.wait_for_log(b"holding", timeout=60, what="the slot holder")
        return process

    yield start
    for process in started:
        process.kill()
        process.stop()


def oai(client: APIClient, key, wav: bytes):
    return client.post(OAI_URL, {"file": SimpleUploadedFile("a.wav", wav), "model": "whisper-1"}, format="multipart", headers=key.headers)


def native(client: APIClient, key, wav: bytes, **fields: str):
    return client.post(TRANSCRIBE_URL, {"file": SimpleUploadedFile("a.wav", wav), **fields}, format="multipart", headers=key.headers)


def _result() -> TranscriptionResult:
    return TranscriptionResult(text=SAID, language="en", duration_s=2.0, segments=[Segment(start=0.0, end=2.0, text=SAID)])


def _job_of(tenant, *, timeout: float = 30) -> TranscriptionJob:
    """The tenant's inline job, once its request has created it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = TranscriptionJob.objects.filter(tenant=tenant, is_async=False, status=TranscriptionJob.Status.QUEUED).first()
        if job is not None:
            return job
        time.sleep(0.02)
    raise AssertionError("no job was created")


class Finisher(threading.Thread):
    """Finishes the tenant's next job ``after`` seconds once it exists, as a worker would
    (``notify=False``: the row is written without the service, so no notification goes out)."""

    def __init__(self, tenant, *, after: float = 0.5, notify: bool = True) -> None:
        super().__init__(daemon=True)
        self.tenant, self.after, self.notify = tenant, after, notify
        self.finished_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            job = _job_of(self.tenant)
            time.sleep(self.after)
            self.finished_at = time.monotonic()
            if self.notify:
                job_complete(job=job, backend="A", result=_result(), audio_duration_ms=2000, latency_ms=5)
            else:
                TranscriptionJob.objects.filter(pk=job.pk).update(status=TranscriptionJob.Status.COMPLETED, transcript=SAID, backend_used="A", audio_duration_ms=2000)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connection.close()

    def result(self) -> float:
        self.join(timeout=30)
        assert self.error is None, self.error
        assert self.finished_at is not None
        return self.finished_at


class Request(threading.Thread):
    """An inline request sent from another thread (it waits there while the test goes on)."""

    def __init__(self, send: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.send = send
        self.response: object = None
        self.done_at: float | None = None

    def run(self) -> None:
        try:
            self.response = self.send()
            self.done_at = time.monotonic()
        finally:
            connection.close()


@dataclass(frozen=True)
class Answered:
    response: Any
    answered_at: float  # time.monotonic() when the response came back
    completed_at: float  # and when the job was finished


def answered_inline(tenant, send: Callable[[], Any], *, after: float = 0.2, notify: bool = True) -> Answered:
    """``send()`` an inline request of ``tenant`` while a :class:`Finisher` finishes its job ``after``
    seconds after the request created it; the request must be answered 200."""
    finisher = Finisher(tenant, after=after, notify=notify)
    finisher.start()
    response = send()
    answered_at = time.monotonic()
    completed_at = finisher.result()
    assert response.status_code == 200, response.content
    return Answered(response, answered_at, completed_at)


def assert_nothing_consumed(tenant, *, jobs_before: int) -> None:
    assert TranscriptionJob.objects.filter(tenant=tenant).count() == jobs_before
    assert not UsageRecord.objects.filter(tenant=tenant).exists()


def test_over_the_tenant_cap_native_goes_async_and_openai_gets_429(api, wav, holder, settings):
    settings.SCAIECHO_INLINE_MAX_WAITING_PER_TENANT = 2
    key = key_with_policy("A", "A")
    other = key_with_policy("A", "A")
    # Given another web process with two inline requests of this tenant waiting.
    holder(tenant_id=str(key.tenant.pk), slots=2)

    # The native endpoint takes the documented async path: the same 202 as force_async.
    response = native(api, key, wav)
    assert response.status_code == 202, response.content
    data = response.json()["data"]
    assert (data["status"], data["audio_bytes"], data["note"]) == ("queued", len(wav), ASYNC_NOTE)
    assert TranscriptionJob.objects.get(pk=data["job_id"]).is_async is True

    # The OpenAI-compatible endpoint cannot take a 202: 429 with Retry-After, before any job exists.
    jobs_before = TranscriptionJob.objects.filter(tenant=key.tenant).count()
    response = oai(api, key, wav)
    body = assert_error(response, 429, "RATE_LIMITED")
    assert body["error"]["retry_after"] == 5
    assert response["Retry-After"] == "5"
    assert "SCAIECHO_INLINE_MAX_WAITING_PER_TENANT" in body["error"]["message"]
    assert_nothing_consumed(key.tenant, jobs_before=jobs_before)
    assert AuditEvent.objects.filter(tenant_id=key.tenant.pk, action="transcription.create", outcome=AuditEvent.Outcome.FAILURE).exists()

    # Another tenant is not held up: its inline request waits for its job and gets the transcript.
    response = answered_inline(other.tenant, lambda: oai(api, other, wav)).response
    assert response.json()["text"] == SAID


def test_over_the_process_cap_requests_of_any_tenant_are_turned_away_until_the_waiter_is_done(api, wav, settings):
    settings.SCAIECHO_INLINE_MAX_WAITING_PER_PROCESS = 1
    first, second = key_with_policy("A", "A"), key_with_policy("A", "A")
    # Given one inline request waiting in this process.
    waiting = Request(lambda: oai(APIClient(), first, wav))
    waiting.start()
    _job_of(first.tenant)

    # Another tenant's requests (its own cap is far away) find the process full.
    response = native(api, second, wav)
    assert response.status_code == 202, response.content
    assert response.json()["data"]["status"] == "queued"
    jobs_before = TranscriptionJob.objects.filter(tenant=second.tenant).count()
    body = assert_error(oai(api, second, wav), 429, "RATE_LIMITED")
    assert "SCAIECHO_INLINE_MAX_WAITING_PER_PROCESS" in body["error"]["message"]
    assert_nothing_consumed(second.tenant, jobs_before=jobs_before)

    # When the waiter's job finishes, it gets its transcript and its place is free again.
    Finisher(first.tenant, after=0).start()
    waiting.join(timeout=30)
    assert waiting.response.status_code == 200, waiting.response.content
    response = answered_inline(second.tenant, lambda: native(api, second, wav)).response
    assert response.json()["data"]["transcript"] == SAID


def test_a_slot_held_by_a_crashed_web_process_expires(api, wav, holder, settings):
    settings.SCAIECHO_INLINE_MAX_WAITING_PER_TENANT = 1
    settings.SCAIECHO_INLINE_SLOT_TTL_SECONDS = 2
    key = key_with_policy("A", "A")
    crashed = holder(tenant_id=str(key.tenant.pk), slots=1)
    # The web process dies (SIGKILL) with a request of this tenant waiting: its slot is not given back...
    crashed.kill()
    assert_error(oai(api, key, wav), 429, "RATE_LIMITED")

    # ...but it lapses within its TTL, and the tenant's inline requests go through again.
    time.sleep(2.5)
    response = answered_inline(key.tenant, lambda: oai(api, key, wav)).response
    assert response.json()["text"] == SAID


def test_the_waiter_is_woken_as_soon_as_its_job_completes(api, wav, settings):
    # The row re-check is far off: only the notification can end this wait in time.
    settings.SCAIECHO_INLINE_RECHECK_SECONDS = 30
    key = key_with_policy("A", "A")
    answer = answered_inline(key.tenant, lambda: native(api, key, wav, language_hint="en"), after=1.0)

    data = answer.response.json()["data"]
    assert (data["transcript"], data["backend_used"], data["audio_duration_ms"]) == (SAID, "A", 2000)
    late = answer.answered_at - answer.completed_at
    assert late < 0.5, f"answered {late:.2f} s after the job completed"


def test_a_lost_notification_is_caught_by_the_row_recheck(api, wav, settings):
    settings.SCAIECHO_INLINE_RECHECK_SECONDS = 1
    key = key_with_policy("A", "A")
    # The job's row is finished but nothing is published (a worker killed between its commit and
    # the notification, or a message Redis dropped).
    started = time.monotonic()
    answer = answered_inline(key.tenant, lambda: oai(api, key, wav), after=0.3, notify=False)

    assert answer.response.json()["text"] == SAID
    late = answer.answered_at - answer.completed_at
    assert late < 1.0 + 0.6, f"answered {late:.2f} s after the job completed"
    assert answer.answered_at - started < 10


def test_a_job_finished_before_the_wait_subscribes_is_not_missed(wav, settings):
    settings.SCAIECHO_INLINE_RECHECK_SECONDS = 30
    key = key_with_policy("A", "A")
    ctx = ActorContext(tenant=key.tenant, user=key.membership.user, api_key=key.key)
    job = job_create(ctx=ctx, data=wav, ext="wav", is_async=False)
    job_complete(job=job, backend="A", result=_result(), audio_duration_ms=2000, latency_ms=5)

    started = time.monotonic()
    finished = job_wait(job_id=job.id, timeout_s=20)
    assert finished.status == TranscriptionJob.Status.COMPLETED
    assert time.monotonic() - started < 0.5
    assert not default_storage.exists(staged_name(job_id=str(job.id), ext="wav"))


def _connections_to_this_database() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


def test_a_waiting_request_holds_no_database_connection(wav, settings):
    settings.SCAIECHO_INLINE_RECHECK_SECONDS = 30
    key = key_with_policy("A", "A")
    alone = _connections_to_this_database()
    waiting = Request(lambda: oai(APIClient(), key, wav))
    waiting.start()
    _job_of(key.tenant)

    # While it waits, the database sees this test's own connection and no other.
    deadline = time.monotonic() + 5
    while _connections_to_this_database() > alone and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _connections_to_this_database() == alone
    assert waiting.is_alive()

    finisher = Finisher(key.tenant, after=0)
    finisher.start()
    waiting.join(timeout=30)
    finisher.result()
    assert waiting.response.status_code == 200, waiting.response.content
