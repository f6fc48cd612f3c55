"""Uploads are private: request bodies spool to anonymous 0600 files in a 0700 folder (nothing is
left after the process dies, even by SIGKILL), staged audio is 0600 in 0700 folders, and staged
uploads no job needs are swept when a worker starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import RequestFactory

from tests.factories import KeyFactory
from transcription.models import TranscriptionJob
from transcription.storage import stage_upload, staged_orphans_sweep

BIG = 3 * 1024 * 1024  # above FILE_UPLOAD_MAX_MEMORY_SIZE (2 MiB): spooled to disk


@pytest.fixture
def spool_dir(settings, tmp_path) -> Path:
    settings.SCAIECHO_UPLOAD_TEMP_DIR = str(tmp_path / "uploads")
    return tmp_path / "uploads"


def test_a_large_upload_spools_to_a_private_file_with_no_name(spool_dir):
    payload = os.urandom(BIG)
    request = RequestFactory().post("/v1/modules/scaiecho/transcribe", {"file": SimpleUploadedFile("a.wav", payload)})
    upload = request.FILES["file"]
    assert upload.read() == payload
    status = os.fstat(upload.file.fileno())
    assert status.st_mode & 0o777 == 0o600  # its owner's alone
    assert status.st_nlink == 0  # no name: no other process can open it, and nothing outlives it
    assert spool_dir.stat().st_mode & 0o777 == 0o700
    assert list(spool_dir.iterdir()) == []
    request.close()


def test_a_loose_spool_folder_is_tightened(spool_dir):
    spool_dir.mkdir(mode=0o777)
    os.chmod(spool_dir, 0o777)
    request = RequestFactory().post("/x", {"file": SimpleUploadedFile("a.wav", os.urandom(BIG))})
    assert request.FILES["file"].size == BIG
    assert spool_dir.stat().st_mode & 0o777 == 0o700


@pytest.mark.slow
def test_a_killed_process_leaves_no_upload_behind(tmp_path):
    """A web process killed while it holds a spooled upload: the folder is empty afterwards."""
    spool = tmp_path / "uploads"
    script = textwrap.dedent(
        f"""
        import os, signal, django
        django.setup()
        from django.core.files.uploadedfile import SimpleUploadedFile
        from django.test import RequestFactory
        request = RequestFactory().post("/x", {{"file": SimpleUploadedFile("a.wav", os.urandom({BIG}))}})
        upload = request.FILES["file"]
        print("spooled", upload.size, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "SCAIECHO_UPLOAD_TEMP_DIR": str(spool), "TMPDIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "scaiecho_site.settings"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert f"spooled {BIG}" in done.stdout
    assert spool.is_dir()
    assert list(spool.iterdir()) == []  # nothing left to sweep
    assert [p for p in tmp_path.iterdir() if p.name != "uploads"] == []  # nor anywhere else under TMPDIR


def test_staged_audio_is_owner_only(settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")
    name = stage_upload(job_id=str(uuid.uuid4()), ext="wav", data=b"RIFF....WAVE")
    path = Path(default_storage.path(name))
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.django_db
def test_the_sweep_deletes_staged_uploads_no_job_needs(settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")
    owner = KeyFactory.issue()

    def job(status: str) -> TranscriptionJob:
        return TranscriptionJob.objects.create(
            tenant=owner.tenant, user=owner.membership.user, status=status, audio_sha256="0" * 64, audio_bytes=4, audio_ext="wav"
        )

    queued, completed = job(TranscriptionJob.Status.QUEUED), job(TranscriptionJob.Status.COMPLETED)
    names = {
        "queued": stage_upload(job_id=str(queued.pk), ext="wav", data=b"data"),
        "completed": stage_upload(job_id=str(completed.pk), ext="wav", data=b"data"),
        "orphan": stage_upload(job_id=str(uuid.uuid4()), ext="wav", data=b"data"),  # the web died before the insert
        "fresh": stage_upload(job_id=str(uuid.uuid4()), ext="wav", data=b"data"),  # a web process is inserting it now
    }
    old = time.time() - settings.SCAIECHO_STAGED_ORPHAN_AGE_SECONDS - 60
    for key in ("queued", "completed", "orphan"):
        os.utime(default_storage.path(names[key]), (old, old))

    assert staged_orphans_sweep() == 2
    assert {key for key, name in names.items() if default_storage.exists(name)} == {"queued", "fresh"}
