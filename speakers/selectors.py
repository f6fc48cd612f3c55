"""Reads for the speaker library. Tenant scoping lives here, so no view can forget it."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.db.models import QuerySet

from scaiecho_site import errors
from speakers.models import Speaker, SpeakerEmbedding


def speakers_of_tenant(*, tenant_id: Any, include_erased: bool = True) -> QuerySet[Speaker]:
    speakers = Speaker.objects.filter(tenant_id=tenant_id).select_related("consent")
    return speakers if include_erased else speakers.exclude(status=Speaker.Status.ERASED)


def speaker_of_tenant(*, tenant_id: Any, speaker_id: str) -> Speaker:
    """One speaker of the tenant; any other id, another tenant's included, is simply not found."""
    try:
        return speakers_of_tenant(tenant_id=tenant_id).get(pk=uuid.UUID(str(speaker_id)))
    except (ValueError, Speaker.DoesNotExist) as exc:
        raise errors.NotFound("No speaker with that id in this tenant.") from exc


def unknown_speaker_ids(*, tenant_id: Any, speaker_ids: Iterable[str]) -> list[str]:
    """The ids in ``speaker_ids`` that are not speakers of this tenant (for a clear 422)."""
    wanted: set[uuid.UUID] = set()
    bad: list[str] = []
    for value in speaker_ids:
        try:
            wanted.add(uuid.UUID(str(value)))
        except ValueError:
            bad.append(str(value))
    found = set(Speaker.objects.filter(tenant_id=tenant_id, pk__in=wanted).values_list("pk", flat=True))
    return bad + [str(value) for value in wanted - found]


@dataclass(frozen=True)
class Candidate:
    """An enrolled voice diarization may attribute speech to. Lives only in a worker's memory.

    ``embedding`` is the reference recording's; ``phone_embedding`` the same recording's through a
    simulated phone line (``speech.audio.phone_band``), or ``None`` for speakers enrolled before it
    was stored.
    """

    speaker_id: str
    label: str
    embedding: np.ndarray
    phone_embedding: np.ndarray | None = None


def speaker_candidates(*, tenant_id: Any, speaker_ids: Iterable[str] = ()) -> list[Candidate]:
    """The tenant's ``ready`` speakers with their decrypted embeddings, optionally only ``speaker_ids``.

    Read fresh from the database on every call and never cached, so an erased (or rejected)
    speaker stops matching at once, in running streams too.
    """
    from speakers import crypto
    from speech.embedding import embedding_from_bytes

    rows = SpeakerEmbedding.objects.filter(
        speaker__tenant_id=tenant_id, speaker__status=Speaker.Status.READY
    ).select_related("speaker")
    ids = [str(value) for value in speaker_ids]
    if ids:
        rows = rows.filter(speaker_id__in=ids)
    return [
        Candidate(
            speaker_id=str(row.speaker_id),
            label=row.speaker.display_name,
            embedding=embedding_from_bytes(crypto.decrypt(bytes(row.ciphertext))),
            phone_embedding=(
                embedding_from_bytes(crypto.decrypt(bytes(row.phone_ciphertext))) if row.phone_ciphertext else None
            ),
        )
        for row in rows
    ]
