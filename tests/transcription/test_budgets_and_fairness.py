"""Budgets and fairness (issue 11, point 5).

Batch jobs reserve their audio at admission, so parallel uploads cannot overspend a budget
together, and a finished or failed job gives its reservation back. One tenant's long jobs cannot
keep another tenant's short job waiting behind all of their pieces: with one worker, the short
job starts within the time of the piece that was running when it arrived.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIClient

from scaiecho_site import errors
from speech.audio import SAMPLE_RATE, wav_bytes
from tenants.models import BudgetAction, BudgetPeriod, Role, TenantBudget, TenantPolicy, UsageRecord
from tests.factories import KeyFactory, staged_job
from tests.speech.test_audio_bounds import live_webm, pcm_wav
from tests.tenants.test_auth import assert_error
from tests.transcription.test_decoding_bounds import key_on_backend_a, post, staged
from tests.transcription.test_long_files import LONG_FILES, LongSpeech, announce, long_speech, start_workers  # noqa: F401
from tests.transcription.test_worker_crash import wait_for
from tests.workers import WorkerProcess
from transcription.models import TranscriptionJob, TranscriptionPiece
from transcription.selectors import dispatch_yields
from transcription.services import job_fail
from transcription.tasks import process_transcribe_job

pytestmark = pytest.mark.django_db(transaction=True)


def total_budget(key: Any, *, seconds: int | None = None, cost: str | None = None) -> TenantBudget:
    return TenantBudget.objects.create(
        tenant=key.tenant,
        period=BudgetPeriod.TOTAL,
        limit_audio_seconds=seconds,
        limit_cost=None if cost is None else Decimal(cost),
        hard_action=BudgetAction.BLOCK,
    )


def post_all_at_once(key: Any, uploads: list[bytes]) -> list[Any]:
    """Each upload from its own thread (its own client and database connection), released together."""
    start = threading.Barrier(len(uploads))

    def send(data: bytes) -> Any:
        try:
            start.wait()
            return post(APIClient(), key, data, force_async="true")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=len(uploads)) as pool:
        return list(pool.map(send, uploads))


# --- Reservation at admission ---------------------------------------------------------------------


@pytest.mark.usefixtures("jobs_nobody_takes")  # a running worker would finish some and free their budget
def test_parallel_uploads_reserve_the_budget_so_only_those_that_fit_are_accepted() -> None:
    # Given a budget of 25 audio seconds, and ten 4 s uploads arriving at the same moment
    key = key_on_backend_a()
    total_budget(key, seconds=25)
    before = staged()

    answers = post_all_at_once(key, [pcm_wav(rate=16_000, samples=4 * 16_000)] * 10)

    # Then exactly six fit (24 s), the other four are refused, and nothing of theirs is kept
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [202] * 6 + [429] * 4, [answer.content for answer in answers]
    for refused in (answer for answer in answers if answer.status_code == 429):
        assert_error(refused, 429, "BUDGET_EXCEEDED")
    jobs = TranscriptionJob.objects.filter(tenant=key.tenant)
    assert jobs.count() == 6
    assert sorted(jobs.values_list("reserved_audio_ms", flat=True)) == [4000] * 6
    assert len(staged() - before) == 6  # the refused uploads' files are gone (or never written)

    # When one accepted job fails, its 4 s are free again: one more upload fits, the next does not
    job_fail(job=jobs.first(), error=errors.BackendError("the backend broke"))
    again = post(APIClient(), key, pcm_wav(rate=16_000, samples=4 * 16_000), force_async="true")
    assert again.status_code == 202, again.content
    full = assert_error(post(APIClient(), key, pcm_wav(rate=16_000, samples=4 * 16_000), force_async="true"), 429, "BUDGET_EXCEEDED")
    assert "1.0 s of the budget are left" in full["error"]["message"]
    assert "24.0 s are held by unfinished jobs" in full["error"]["message"]
    assert not UsageRecord.objects.filter(tenant=key.tenant).exists()


@pytest.mark.usefixtures("jobs_nobody_takes")  # a worker would take the job and hold its decoded price instead
def test_a_cost_budget_reserves_at_the_highest_price_the_job_may_be_billed(settings) -> None:
    settings.SCAIECHO_PRICE_PER_AUDIO_MINUTE = {"A": "0", "B": "0.006"}
    # A tenant that allows A and B, with 0.0012 to spend: 12 s on B, or any length on A.
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="AB", default_backend="A")
    total_budget(key, cost="0.0012")

    # "any" may end on B: 10 s hold B's price, so a second 10 s upload does not fit
    first = post(APIClient(), key, pcm_wav(rate=16_000, samples=10 * 16_000), force_async="true")
    second = post(APIClient(), key, pcm_wav(rate=16_000, samples=10 * 16_000), force_async="true")

    assert first.status_code == 202, first.content
    assert TranscriptionJob.objects.get(pk=first.json()["data"]["job_id"]).reserved_cost == Decimal("0.001")
    body = assert_error(second, 429, "BUDGET_EXCEEDED")
    assert "2.0 s of the budget are left" in body["error"]["message"]

    # A tenant held to the free backend is not limited by a cost budget
    free = key_on_backend_a()
    total_budget(free, cost="0.0012")
    answers = [post(APIClient(), free, pcm_wav(rate=16_000, samples=10 * 16_000), force_async="true") for _ in range(3)]
    assert [answer.status_code for answer in answers] == [202, 202, 202]


@pytest.mark.slow
def test_a_job_of_unknown_length_holds_what_is_left_until_it_is_decoded_and_billed(speech_worker) -> None:
    # Given 30 audio seconds and a 5 s WebM whose container does not say how long it is
    key = key_on_backend_a()
    total_budget(key, seconds=30)
    response = post(APIClient(), key, live_webm(5), force_async="true")
    assert response.status_code == 202, response.content
    job_id = response.json()["data"]["job_id"]

    # (while it waits it holds all 30 s: test_with_nothing_left_an_upload_of_unknown_length_is_refused)
    job = wait_for(
        lambda: TranscriptionJob.objects.filter(pk=job_id, status__in=TranscriptionJob.TERMINAL).first(),
        timeout=120,
        what="the job to finish",
    )
    assert job.status == "completed", (job.status_reason, speech_worker.log_path.read_text()[-2000:])

    # Then its usage record (5 s) replaces the hold: 25 s are left, no more
    assert list(UsageRecord.objects.filter(tenant=key.tenant).values_list("audio_duration_ms", flat=True)) == [job.audio_duration_ms]
    assert abs(job.audio_duration_ms - 5000) < 100
    fits = post(APIClient(), key, pcm_wav(rate=16_000, samples=24 * 16_000), force_async="true")
    assert fits.status_code == 202, fits.content
    assert_error(post(APIClient(), key, pcm_wav(rate=16_000, samples=2 * 16_000), force_async="true"), 429, "BUDGET_EXCEEDED")


@pytest.mark.usefixtures("jobs_nobody_takes")  # a worker would measure the first upload and free its hold
def test_with_nothing_left_an_upload_of_unknown_length_is_refused() -> None:
    key = key_on_backend_a()
    total_budget(key, seconds=30)
    assert post(APIClient(), key, live_webm(3), force_async="true").status_code == 202

    # The first WebM holds all 30 s until a worker measures it (none runs here)
    body = assert_error(post(APIClient(), key, live_webm(3), force_async="true"), 429, "BUDGET_EXCEEDED")
    assert "Nothing is left of the tenant's budget (30.0 s are held by unfinished jobs)" in body["error"]["message"]


# --- Fair dispatch between tenants ----------------------------------------------------------------

FAIR_QUEUE = "fairness-test"  # only this file's worker listens here


@pytest.fixture(scope="module")
def one_worker(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    (worker,) = start_workers({**worker_env, **LONG_FILES}, tmp_path_factory.mktemp("fair"), "fair1", queue=FAIR_QUEUE)
    try:
        yield worker
    finally:
        worker.stop()


def enqueue(key: Any, wav: bytes) -> TranscriptionJob:
    job = staged_job(key, wav)
    process_transcribe_job.apply_async(args=[str(job.id)], queue=FAIR_QUEUE)
    return job


def tenant_on_a() -> Any:
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    return key


def seconds(start: Any, end: Any) -> float:
    return (end - start).total_seconds()


@pytest.mark.slow
def test_one_tenants_long_jobs_do_not_make_another_tenants_short_job_wait_for_them(one_worker, long_speech: LongSpeech) -> None:  # noqa: F811
    announce([one_worker])
    alice, bob = tenant_on_a(), tenant_on_a()

    # Given three long files of tenant A, split into twelve ~10 s pieces queued on one worker
    long_jobs = [enqueue(alice, long_speech.wav) for _ in range(3)]
    wait_for(
        lambda: TranscriptionPiece.objects.filter(job__in=long_jobs).values("job").distinct().count() == 3
        and TranscriptionPiece.objects.filter(job__in=long_jobs, status="running").exists(),
        timeout=180,
        what="tenant A's jobs to be split and a piece to run",
    )

    # When tenant B sends an 11 s file behind all of them
    end = long_speech.placed[1][1]
    short = enqueue(bob, wav_bytes(long_speech.samples[: round(end * SAMPLE_RATE)]))
    done = wait_for(
        lambda: TranscriptionJob.objects.filter(pk=short.id, status__in=TranscriptionJob.TERMINAL).first(),
        timeout=180,
        what="tenant B's job to finish",
    )
    pieces_left = TranscriptionPiece.objects.filter(job__in=long_jobs).exclude(status="completed").count()
    log = one_worker.log_path.read_text()
    assert done.status == "completed", (done.status_reason, log[-2000:])

    # Then B's job was done while most of A's pieces still waited, and it started within the
    # time of the one piece that was running when it arrived (plus a second or two of yields)
    assert pieces_left >= 8, pieces_left
    for job in long_jobs:
        job.refresh_from_db()
    assert not all(job.is_terminal for job in long_jobs)
    for job in long_jobs:
        wait_for(lambda job=job: TranscriptionJob.objects.filter(pk=job.id, status="completed").exists(), timeout=240, what="A's jobs")
    pieces = list(TranscriptionPiece.objects.filter(job__in=long_jobs))
    longest_piece = max(seconds(piece.started_at, piece.completed_at) for piece in pieces)
    assert seconds(short.created_at, done.started_at) <= longest_piece + 3, (seconds(short.created_at, done.started_at), longest_piece)
    # Yielding is neither a retry nor an attempt, and loses nothing: every piece ran once
    assert [piece.attempts for piece in pieces] == [1] * 12
    assert "another tenant goes first" in one_worker.log_path.read_text()


def test_tenants_with_equal_shares_never_wait_for_each_other() -> None:
    """The dispatch rule as a worker applies it: a tenant yields only to one that is strictly
    ahead (fewer tasks running, or as many and served longer ago), so no two wait for each other."""
    alice, bob = tenant_on_a(), tenant_on_a()

    def job(key: Any, **fields: Any) -> TranscriptionJob:
        return TranscriptionJob.objects.create(
            tenant=key.tenant, user=key.membership.user, audio_sha256="0" * 64, audio_bytes=1, audio_ext="wav", **fields
        )

    job(alice)
    job(bob)
    assert not dispatch_yields(tenant_id=alice.tenant.pk)  # neither served yet: equal
    assert not dispatch_yields(tenant_id=bob.tenant.pk)

    running = job(alice, status="running", started_at=timezone.now())
    assert dispatch_yields(tenant_id=alice.tenant.pk)  # A runs one, B none: B first
    assert not dispatch_yields(tenant_id=bob.tenant.pk)

    running.status, running.completed_at = "completed", timezone.now()
    running.save()
    assert dispatch_yields(tenant_id=alice.tenant.pk)  # none running; A was served, B never
    job(bob, status="running", started_at=timezone.now())
    assert not dispatch_yields(tenant_id=alice.tenant.pk)  # B runs one now, A none: A's turn

