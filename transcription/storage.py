"""Staged uploads in object storage (Django's storage API: local files, or S3 when configured)."""

from __future__ import annotations

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

STAGING_PREFIX = "scaiecho/transcribe_jobs"


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
