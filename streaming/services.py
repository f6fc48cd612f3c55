"""Writes and checks for live stream sessions, called by the consumer through
``database_sync_to_async`` (never on the event loop).

The consumer authenticates and authorizes through these; each returns plain values so the
consumer holds no ORM objects across awaits.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from scaiecho_site import errors
from speakers.selectors import unknown_speaker_ids
from streaming.tokens import CAPTION_TOKEN_PREFIX, caption_token_key
from tenants.authentication import api_key_from_token
from tenants.context import ActorContext
from tenants.models import PERM_DIARIZE, PERM_TRANSCRIBE, ApiKey, AuditEvent
from tenants.selectors import membership_permissions
from tenants.services import (
    audit_permission_denied,
    audit_record,
    budget_check,
    policy_get_or_provision,
    policy_resolve_backend,
    usage_record,
)
from transcription.models import SpeechWorker


@dataclass(frozen=True)
class StreamGrant:
    """What an authorized stream may do, decided once at ``open``."""

    key_id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: int
    session_id: str
    backend: str
    expires_at: datetime


def stream_authenticate(*, token: str | None) -> ApiKey:
    if not token:
        raise errors.AuthTokenMissing("Send the API key as ?token= or an Authorization: Bearer header.")
    if token.startswith(CAPTION_TOKEN_PREFIX):
        key = caption_token_key(token)
        if key is None:
            raise errors.AuthTokenInvalid("The caption token is not valid or has expired.")
        return key
    key = api_key_from_token(token)
    if key is None:
        raise errors.AuthTokenInvalid()
    return key


def stream_open(
    *,
    key: ApiKey,
    ctx: ActorContext,
    backend_preference: str,
    diarize: bool,
    is_available: Callable[[str], bool],
    speaker_ids: list[str] | None = None,
) -> StreamGrant:
    """Authorize, check the budget and resolve the backend once for the whole session.

    ``is_available(backend)`` says whether a backend can take a stream now (the session kinds
    know: :func:`streaming.sessions.session_backend_available`).
    """
    membership = key.membership
    tenant = membership.tenant
    if not tenant.scaiecho_enabled:
        audit_permission_denied(ctx=ctx, action="stream.open", reason="module_not_enabled")
        raise errors.ModuleNotEnabled()
    permissions = membership_permissions(membership=membership)
    for needed in (PERM_TRANSCRIBE, PERM_DIARIZE) if diarize else (PERM_TRANSCRIBE,):
        if needed not in permissions:
            audit_permission_denied(ctx=ctx, action="stream.open", reason="permission_denied")
            raise errors.PermissionDenied(f"This stream needs the permission {needed}.")
    unknown = unknown_speaker_ids(tenant_id=tenant.pk, speaker_ids=speaker_ids or [])
    if unknown:
        raise errors.ValidationError(
            f"speaker_ids names no speaker of this tenant: {unknown[0]}.",
            details=[{"field": "speaker_ids", "message": f"unknown speaker {value}"} for value in unknown],
        )
    budget_check(tenant=tenant, ctx=ctx)
    backend = policy_resolve_backend(
        policy=policy_get_or_provision(tenant=tenant), preference=backend_preference, is_available=is_available
    )

    session_id = f"str_{uuid.uuid4().hex}"
    audit_record(ctx=ctx, action="stream.open", resource_type="stream_session", resource_id=session_id, details={"backend": backend})
    return StreamGrant(
        key_id=key.pk,
        tenant_id=tenant.pk,
        user_id=membership.user_id,
        session_id=session_id,
        backend=backend,
        expires_at=timezone.now() + timedelta(seconds=settings.SCAIECHO_STREAM_MAX_SESSION_SECONDS),
    )


def stream_worker_pick() -> str:
    """A live stream worker's channel for a new session (spread at random), or 502."""
    worker = (
        SpeechWorker.objects.filter(kind=SpeechWorker.Kind.STREAM, expires_at__gt=timezone.now()).order_by("?").first()
    )
    if worker is None:
        raise errors.BackendUnavailable("No stream worker is available.")
    return worker.worker_id


def stream_worker_alive(*, worker_id: str) -> bool:
    return SpeechWorker.objects.filter(worker_id=worker_id, expires_at__gt=timezone.now()).exists()


def stream_still_allowed(*, grant: StreamGrant) -> None:
    """Re-checked during a session: a revoked key ends it (4401), an exhausted budget too (4429)."""
    key = ApiKey.objects.select_related("membership__tenant").filter(pk=grant.key_id, revoked_at__isnull=True).first()
    if key is None:
        raise errors.AuthTokenInvalid("The API key was revoked.")
    budget_check(tenant=key.membership.tenant)


def stream_finish(*, grant: StreamGrant, ctx: ActorContext, audio_duration_ms: int, latency_ms: int, outcome: str) -> None:
    """One usage record per session, for the audio actually received, and the audit row."""
    key = ApiKey.objects.select_related("membership__tenant", "membership__user").get(pk=grant.key_id)
    tenant = key.membership.tenant
    if audio_duration_ms > 0:
        usage_record(
            tenant=tenant,
            user=key.membership.user,
            api_key=key,
            backend=grant.backend,
            kind="stream",
            audio_duration_ms=audio_duration_ms,
            latency_ms=latency_ms,
            reference=grant.session_id,
        )
    audit_record(
        ctx=ctx,
        tenant=tenant,
        action="stream.close",
        outcome=AuditEvent.Outcome.SUCCESS if outcome == "closed" else AuditEvent.Outcome.FAILURE,
        resource_type="stream_session",
        resource_id=grant.session_id,
        details={"audio_duration_ms": audio_duration_ms, "outcome": outcome},
    )
