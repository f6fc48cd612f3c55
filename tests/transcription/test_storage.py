"""Staged uploads: on the local filesystem by default, and in a real S3-protocol server (moto).

The S3 tests start moto in server mode as a subprocess and a separate Celery worker configured
for the bucket, as an operator would with ``SCAIECHO_S3_*``. Any other worker on the broker (the
session's local-storage worker, when an earlier module started it) stops consuming while the S3
worker runs, so that the S3 job cannot land on a worker that looks for it on the filesystem.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from scaiecho_site.celery import app as celery_app
from tests.transcription.test_batch_api import SPOKEN, TRANSCRIBE_URL, job_url, key_with_policy, upload
from tests.voices import synth_speech, word_error_rate
from tests.workers import WorkerProcess
from transcription.models import TranscriptionJob
from transcription.services import worker_heartbeat
from transcription.storage import delete_staged, read_staged, stage_upload, staged_name

BUCKET = "scaiecho-staging-test"
CREDENTIALS = {"SCAIECHO_S3_ACCESS_KEY_ID": "test", "SCAIECHO_S3_SECRET_ACCESS_KEY": "test", "SCAIECHO_S3_REGION": "us-east-1"}
QUEUE = "celery"  # Celery's default queue: the transcription task is not routed elsewhere


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto in server mode, answering the S3 protocol on a free local port, with our bucket."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    server = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "moto_server exited"
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "moto_server did not answer"
                time.sleep(0.1)
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def wait_finished(api: Any, key: Any, job_id: str, *, timeout: float = 180) -> dict[str, Any]:
    """Wait on the job row (no rate limit to trip over), then read the job as its owner does."""
    deadline = time.monotonic() + timeout
    while TranscriptionJob.objects.get(pk=job_id).status not in TranscriptionJob.TERMINAL:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.3)
    return api.get(job_url(job_id), headers=key.headers).json()["data"]


def s3_client(url: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )


def bucket_keys(url: str) -> set[str]:
    listing = s3_client(url).list_objects_v2(Bucket=BUCKET)
    return {item["Key"] for item in listing.get("Contents", [])}


@pytest.fixture
def s3_storage(settings: Any, s3_url: str) -> str:
    """This process's default storage is the bucket, configured as settings.py does for SCAIECHO_S3_*."""
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": BUCKET,
                "endpoint_url": s3_url,
                "region_name": "us-east-1",
                "access_key": "test",
                "secret_key": "test",
                "default_acl": None,
                "file_overwrite": True,
                "querystring_auth": True,
            },
        },
    }
    for key in bucket_keys(s3_url):
        s3_client(s3_url).delete_object(Bucket=BUCKET, Key=key)
    return s3_url


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    return synth_speech(SPOKEN)


# --- Local filesystem (the default) --------------------------------------------------------------


@pytest.mark.django_db
def test_local_staging_puts_the_upload_under_media_root(settings):
    job_id = str(uuid.uuid4())
    name = stage_upload(job_id=job_id, ext="ogg", data=b"audio bytes")
    path = Path(settings.MEDIA_ROOT) / "scaiecho" / "transcribe_jobs" / f"{job_id}.ogg"
    try:
        assert name == staged_name(job_id=job_id, ext="ogg")
        assert path.read_bytes() == b"audio bytes"
        assert read_staged(name=name) == b"audio bytes"
    finally:
        delete_staged(name=name)
    assert not path.exists()
    delete_staged(name=name)  # already gone: not an error


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_local_staged_file_is_deleted_once_the_worker_completes(api, speech_worker, speech_wav, settings):
    key = key_with_policy("A", "A")
    # Hold the worker off the queue until the staged file has been seen, so the check cannot race it.
    celery_app.control.cancel_consumer(QUEUE, destination=[speech_worker.node], reply=True)
    try:
        response = api.post(TRANSCRIBE_URL, {"file": upload("speech.wav", speech_wav), "force_async": "true"}, format="multipart", headers=key.headers)
        assert response.status_code == 202, response.content
        job_id = response.json()["data"]["job_id"]
        path = Path(settings.MEDIA_ROOT) / "scaiecho" / "transcribe_jobs" / f"{job_id}.wav"
        assert path.read_bytes() == speech_wav
    finally:
        celery_app.control.add_consumer(QUEUE, destination=[speech_worker.node], reply=True)
    done = wait_finished(api, key, job_id)
    assert done["status"] == "completed", done
    assert not path.exists()


# --- S3 ------------------------------------------------------------------------------------------


def test_s3_stage_read_delete(s3_storage):
    job_id = str(uuid.uuid4())
    name = stage_upload(job_id=job_id, ext="flac", data=b"fLaC audio")
    assert name == f"scaiecho/transcribe_jobs/{job_id}.flac"
    assert bucket_keys(s3_storage) == {name}
    assert read_staged(name=name) == b"fLaC audio"
    assert stage_upload(job_id=job_id, ext="flac", data=b"again") == name  # overwritten, not renamed
    assert bucket_keys(s3_storage) == {name}
    delete_staged(name=name)
    assert bucket_keys(s3_storage) == set()
    delete_staged(name=name)  # already gone: not an error


@pytest.fixture(scope="module")
def s3_worker(worker_env: dict[str, str], s3_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    others = [node for reply in celery_app.control.ping(timeout=1) for node in reply]
    if others:
        celery_app.control.cancel_consumer(QUEUE, destination=others, reply=True)
    env = {
        **worker_env,
        **CREDENTIALS,
        "SCAIECHO_S3_BUCKET": BUCKET,
        "SCAIECHO_S3_ENDPOINT_URL": s3_url,
        "SCAIECHO_WHISPER_MODEL": "tiny.en",
    }
    worker = WorkerProcess(name="s3", env=env, log_path=tmp_path_factory.mktemp("s3-worker") / "worker.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
        if others:
            celery_app.control.add_consumer(QUEUE, destination=others, reply=True)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_s3_job_is_staged_in_the_bucket_and_removed_after_completion(api, s3_storage, s3_worker, speech_wav, settings):
    worker_heartbeat(worker_id=s3_worker.node)
    key = key_with_policy("A", "A")
    # Hold the worker off the queue until the staged object has been seen, so the check cannot race it.
    celery_app.control.cancel_consumer(QUEUE, destination=[s3_worker.node], reply=True)
    try:
        response = api.post(TRANSCRIBE_URL, {"file": upload("speech.wav", speech_wav), "force_async": "true"}, format="multipart", headers=key.headers)
        assert response.status_code == 202, response.content
        job_id = response.json()["data"]["job_id"]
        staged = f"scaiecho/transcribe_jobs/{job_id}.wav"
        assert bucket_keys(s3_storage) == {staged}
        assert not (Path(settings.MEDIA_ROOT) / staged).exists()
    finally:
        celery_app.control.add_consumer(QUEUE, destination=[s3_worker.node], reply=True)

    done = wait_finished(api, key, job_id)

    assert done["status"] == "completed", (done, s3_worker.log_path.read_text()[-3000:])
    assert done["backend_used"] == "A"
    assert word_error_rate(SPOKEN, done["transcript"]) <= 0.35, done["transcript"]
    assert bucket_keys(s3_storage) == set()
