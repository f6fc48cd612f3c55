"""Staged uploads in object storage (Django's storage API: local files, or S3 when configured),
and the private spool files that request bodies pass through on their way there.

Uploads are private: an upload above ``FILE_UPLOAD_MAX_MEMORY_SIZE`` spools to an anonymous file
(mode 0600, no name: ``O_TMPFILE`` on Linux, unlinked at once elsewhere) in
``SCAIECHO_UPLOAD_TEMP_DIR`` (kept 0700), so no other user can open it and a crashed process
leaves nothing behind; staged files on local disk are 0600 in 0700 folders (the settings' storage
options). A staged upload whose job never came to be (the web process died between staging and
inserting the job) or has ended is swept when a worker starts (:func:`staged_orphans_sweep`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from django.utils import timezone

logger = logging.getLogger("scaiecho.transcription")

STAGING_PREFIX = "scaiecho/transcribe_jobs"
PRIVATE_DIR_MODE = 0o700


def staged_name(*, job_id: str, ext: str) -> str:
    return f"{STAGING_PREFIX}/{job_id}.{ext}"


def stage_upload(*, job_id: str, ext: str, data: bytes) -> str:
    return default_storage.save(staged_name(job_id=job_id, ext=ext), ContentFile(data))


def read_staged(*, name: str) -> bytes:
    with default_storage.open(name, "rb") as handle:
        return handle.read()


def delete_staged(*, name: str) -> None:
    if name and default_storage.exists(name):
        default_storage.delete(name)


def staged_orphans_sweep(*, older_than_s: float | None = None) -> int:
    """Delete staged uploads with no job still needing them; returns how many were deleted.

    A file of a finished (or missing) job older than ``older_than_s`` (default
    ``SCAIECHO_STAGED_ORPHAN_AGE_SECONDS``) goes: the age spares a file a live web process has
    just staged and is about to insert the job of. Queued and running jobs keep theirs.
    """
    from transcription.models import TranscriptionJob

    age = settings.SCAIECHO_STAGED_ORPHAN_AGE_SECONDS if older_than_s is None else older_than_s
    cutoff = timezone.now() - timedelta(seconds=age)
    try:
        _, names = default_storage.listdir(STAGING_PREFIX)
    except FileNotFoundError:
        return 0
    by_job: dict[uuid.UUID, str] = {}
    for name in names:
        try:
            by_job[uuid.UUID(name.partition(".")[0])] = f"{STAGING_PREFIX}/{name}"
        except ValueError:
            continue  # not one of ours
    waiting = set(
        TranscriptionJob.objects.filter(pk__in=by_job, status__in=[TranscriptionJob.Status.QUEUED, TranscriptionJob.Status.RUNNING])
        .values_list("pk", flat=True)
    )
    deleted = 0
    for job_id, name in by_job.items():
        if job_id in waiting:
            continue
        try:
            if default_storage.get_modified_time(name) > cutoff:
                continue
            default_storage.delete(name)
        except FileNotFoundError:
            continue
        deleted += 1
    if deleted:
        logger.info("deleted %d staged upload(s) no job needs", deleted)
    return deleted


# --- Private spool files for request bodies ---------------------------------------------------


def upload_temp_dir() -> Path:
    """``SCAIECHO_UPLOAD_TEMP_DIR``, created (or tightened) to be its owner's alone."""
    folder = Path(settings.SCAIECHO_UPLOAD_TEMP_DIR)
    folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        os.chmod(folder, PRIVATE_DIR_MODE)
    return folder


class PrivateUploadedFile(UploadedFile):
    """An upload spooled to an anonymous file: the kernel frees it when the last handle closes,
    the process's death included. It has no path, so storage copies it by reading it."""

    def __init__(self, name: str, content_type: str, size: int, charset: str | None, content_type_extra: Any = None) -> None:
        spool = tempfile.TemporaryFile(dir=upload_temp_dir())  # 0600; O_TMPFILE where the OS has it
        super().__init__(spool, name, content_type, size, charset, content_type_extra)


class PrivateTemporaryFileUploadHandler(TemporaryFileUploadHandler):
    """Django's stream-to-disk handler (``FILE_UPLOAD_HANDLERS``), writing :class:`PrivateUploadedFile`."""

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super(TemporaryFileUploadHandler, self).new_file(*args, **kwargs)  # the names; not Django's named file
        self.file = PrivateUploadedFile(self.file_name, self.content_type, 0, self.charset, self.content_type_extra)

    def upload_interrupted(self) -> None:
        if hasattr(self, "file"):
            self.file.close()  # nothing to remove: the file has no name


def staged_orphans_sweep_on_start(**_kwargs: Any) -> None:
    """``worker_ready`` receiver (wired in ``TranscriptionConfig.ready``): sweep once per worker start."""
    try:
        staged_orphans_sweep()
    except Exception:  # a sweep must never keep a worker from starting
        logger.exception("could not sweep staged uploads")
