"""Long files are cut at pauses into pieces that run on any free worker, then joined into one job.

Real speech (a LibriVox reader, clips placed with pauses between them), two real Celery worker
processes on a queue of their own, and small thresholds so that ~43 s counts as long.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from speech.audio import SAMPLE_RATE, decode_audio, wav_bytes
from tenants.models import Role, TenantPolicy, UsageRecord
from tests.factories import KeyFactory
from tests.transcription.test_worker_crash import wait_for
from tests.voices import POCKETSPHINX_DATA, word_error_rate
from tests.workers import WorkerProcess
from transcription.models import TranscriptionJob, TranscriptionPiece
from transcription.services import claimant_node, jobs_fail_stale, worker_heartbeat
from transcription.storage import stage_upload
from transcription.tasks import process_transcribe_job

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = "long-files-test"  # only this file's workers listen here
CRASH_QUEUE = "long-files-crash-test"  # and here only the workers that one test kills
LONG_FILES = {
    "SCAIECHO_LONG_AUDIO_SPLIT_SECONDS": "20",
    "SCAIECHO_LONG_AUDIO_PIECE_SECONDS": "10",
    "SCAIECHO_WHISPER_MODEL": "tiny.en",
}
# Seven clips of one reader (two of them twice) with 1.2 s pauses: about 43 s.
CLIPS = ("0870", "0880", "0890", "0920", "0930", "0920", "0890")
PAUSE_S = 1.2


@dataclass(frozen=True)
class LongSpeech:
    samples: np.ndarray
    wav: bytes
    duration_s: float
    # (start s, end s, what is said) for each clip, where it was placed in the file
    placed: list[tuple[float, float, str]]

    @property
    def text(self) -> str:
        return " ".join(said for _, _, said in self.placed)


@pytest.fixture(scope="module")
def long_speech() -> LongSpeech:
    folder = POCKETSPHINX_DATA / "librivox"
    said = {}
    for line in (folder / "transcription").read_text().splitlines():
        words, _, name = line.rpartition(" (")
        said[name.rstrip(")").rsplit("-", 1)[1]] = words.replace("<s>", "").replace("</s>", "").strip()
    pause = np.zeros(round(PAUSE_S * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    placed = []
    position = 0
    for clip_id in CLIPS:
        clip = decode_audio((folder / f"sense_and_sensibility_01_austen_64kb-{clip_id}.wav").read_bytes()).samples
        if parts:
            parts.append(pause)
            position += pause.size
        placed.append((position / SAMPLE_RATE, (position + clip.size) / SAMPLE_RATE, said[clip_id]))
        parts.append(clip)
        position += clip.size
    samples = np.concatenate(parts)
    return LongSpeech(samples=samples, wav=wav_bytes(samples), duration_s=samples.size / SAMPLE_RATE, placed=placed)


def start_workers(env: dict[str, str], log_dir: Path, *names: str, queue: str = QUEUE) -> list[WorkerProcess]:
    workers = [WorkerProcess(name=name, env=env, log_path=log_dir / f"{name}.log", queue=queue, concurrency=1) for name in names]
    for worker in workers:
        worker.wait_ready()
    return workers


@pytest.fixture(scope="module")
def two_workers(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    workers: list[WorkerProcess] = []
    try:
        workers = start_workers({**worker_env, **LONG_FILES}, tmp_path_factory.mktemp("long"), "long1", "long2")
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def announce(workers: list[WorkerProcess]) -> None:
    """The workers, alive in this test's freshly flushed database (for as long as their own
    heartbeat would keep them: a killed one must look dead soon)."""
    for worker in workers:
        worker_heartbeat(worker_id=worker.node, ttl_seconds=6)


def submit(wav: bytes, *, word_timestamps: bool = False, queue: str = QUEUE) -> tuple[Any, TranscriptionJob]:
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    job = TranscriptionJob(
        tenant=key.tenant, user=key.membership.user, api_key=key.key, is_async=True, word_timestamps=word_timestamps,
        audio_sha256="0" * 64, audio_bytes=len(wav), audio_ext="wav",
    )
    job.staged_path = stage_upload(job_id=str(job.id), ext="wav", data=wav)
    job.save()
    process_transcribe_job.apply_async(args=[str(job.id)], queue=queue)
    return key, job


def finished(job: TranscriptionJob, *, timeout: float, workers: list[WorkerProcess]) -> TranscriptionJob:
    done = wait_for(
        lambda: TranscriptionJob.objects.filter(pk=job.id, status__in=TranscriptionJob.TERMINAL).first(),
        timeout=timeout,
        what="the job to finish",
    )
    logs = "\n".join(w.log_path.read_text()[-1500:] for w in workers)
    assert done.status == "completed", (done.status_reason, logs)
    return done


def assert_one_usage_record(job: TranscriptionJob, duration_s: float) -> None:
    records = UsageRecord.objects.filter(reference=str(job.id))
    assert [(r.kind, r.backend, r.audio_duration_ms) for r in records] == [("batch", "A", round(duration_s * 1000))]


@pytest.mark.slow
def test_a_long_file_runs_in_pieces_on_both_workers_and_joins_into_one_job(api, two_workers, long_speech):
    announce(two_workers)
    key, job = submit(long_speech.wav, word_timestamps=True)

    # While its pieces run, the job is one running job to its owner.
    wait_for(
        lambda: TranscriptionPiece.objects.filter(job=job, status="running").exists(),
        timeout=120,
        what="a piece to start",
    )
    shown = api.get(f"/v1/modules/scaiecho/transcribe/jobs/{job.id}", headers=key.headers).json()["data"]
    assert (shown["status"], shown["transcript"]) == ("running", None)

    done = finished(job, timeout=180, workers=two_workers)
    pieces = list(TranscriptionPiece.objects.filter(job=job).order_by("index"))
    assert len(pieces) == 4
    assert {claimant_node(piece.worker_id) for piece in pieces} == {worker.node for worker in two_workers}
    assert [piece.attempts for piece in pieces] == [1, 1, 1, 1]
    # Cut at the pauses: no clip is split between two pieces.
    for piece in pieces[1:]:
        cut_s = piece.start_sample / SAMPLE_RATE
        assert not any(start < cut_s < end for start, end, _ in long_speech.placed), cut_s

    starts = [segment["start"] for segment in done.segments]
    assert starts == sorted(starts)
    assert all(s["start"] <= s["end"] <= long_speech.duration_s for s in done.segments)
    # Every clip's words are found where the clip was placed in the file.
    words = [word for segment in done.segments for word in segment["words"]]
    for start, end, said in long_speech.placed:
        heard = " ".join(w["word"] for w in words if start - 0.5 <= (w["start"] + w["end"]) / 2 <= end + 0.5)
        assert word_error_rate(said, heard) <= 0.35, (start, said, heard)
    assert word_error_rate(long_speech.text, done.transcript) <= 0.25, done.transcript
    assert done.audio_duration_ms == round(long_speech.duration_s * 1000)
    assert_one_usage_record(done, long_speech.duration_s)
    assert not any(piece.result for piece in pieces)  # one copy of the transcript: the job's


@pytest.mark.slow
def test_a_short_file_is_not_split(two_workers, long_speech):
    announce(two_workers)
    end = long_speech.placed[1][1]  # the first two clips: about 11 s, under the 20 s threshold
    _, job = submit(wav_bytes(long_speech.samples[: round(end * SAMPLE_RATE)]))
    done = finished(job, timeout=120, workers=two_workers)
    assert not TranscriptionPiece.objects.filter(job=job).exists()
    said = " ".join(said for _, _, said in long_speech.placed[:2])
    assert word_error_rate(said, done.transcript) <= 0.25, done.transcript
    assert_one_usage_record(done, end)


@pytest.mark.slow
def test_a_piece_whose_worker_is_killed_is_retried_and_the_job_completes(worker_env, long_speech, tmp_path):
    env = {
        **worker_env,
        **LONG_FILES,
        # Two pieces of about 20 s, so that a piece is still running when its worker is killed.
        "SCAIECHO_LONG_AUDIO_PIECE_SECONDS": "20",
        # The surviving worker puts the dead one's unacknowledged piece back after 3 s (default 1 h).
        "SCAIECHO_BROKER_VISIBILITY_TIMEOUT": "3",
        "SCAIECHO_BROKER_RESTORE_INTERVAL": "1",
        "SCAIECHO_BROKER_RESTORE_THROTTLE": "1",
    }
    workers: list[WorkerProcess] = []
    try:
        workers = start_workers(env, tmp_path, "piece1", "piece2", queue=CRASH_QUEUE)
        announce(workers)
        _, job = submit(long_speech.wav, queue=CRASH_QUEUE)
        running = wait_for(
            lambda: TranscriptionPiece.objects.filter(job=job, status="running").first(),
            timeout=120,
            what="a piece to start",
        )
        victim = next(worker for worker in workers if worker.node == claimant_node(running.worker_id))
        victim.kill()
        assert TranscriptionPiece.objects.get(pk=running.pk).status == "running"

        done = finished(job, timeout=180, workers=workers)
        pieces = list(TranscriptionPiece.objects.filter(job=job).order_by("index"))
        assert len(pieces) == 2
        survivor = next(worker for worker in workers if worker is not victim)
        retried = next(piece for piece in pieces if piece.pk == running.pk)
        assert (retried.attempts, claimant_node(retried.worker_id)) == (2, survivor.node)
        assert all(piece.attempts == 1 for piece in pieces if piece.pk != running.pk)  # the other ran once
        assert word_error_rate(long_speech.text, done.transcript) <= 0.25, done.transcript
        assert_one_usage_record(done, long_speech.duration_s)
    finally:
        for worker in workers:
            worker.stop()


def test_the_stale_job_sweep_leaves_a_split_job_alone_while_its_pieces_are_queued_or_running(settings):
    settings.SCAIECHO_JOB_TIME_LIMIT_SECONDS = 60
    key = KeyFactory.issue()
    long_ago = timezone.now() - timedelta(seconds=300)
    jobs = []
    for piece_states in (["completed", "queued"], ["completed", "recent"], ["completed", "running"]):
        job = TranscriptionJob.objects.create(
            tenant=key.tenant, audio_sha256="0" * 64, audio_bytes=10, audio_ext="wav",
            status="running", started_at=long_ago, worker_id="gone@host",
        )
        for index, state in enumerate(piece_states):
            started = timezone.now() if state == "recent" else long_ago
            TranscriptionPiece.objects.create(
                job=job, index=index, start_sample=index, end_sample=index + 1, backend="A",
                status="running" if state == "recent" else state, started_at=None if state == "queued" else started,
            )
        jobs.append(job)

    assert jobs_fail_stale() == 1

    assert [TranscriptionJob.objects.get(pk=job.pk).status for job in jobs] == ["running", "running", "failed"]
