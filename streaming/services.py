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
from scaiecho_site.metrics import STREAM_SESSIONS
from speakers.selectors import unknown_speaker_ids
from streaming.limits import (
    LiveUsage,
    stream_allowance_ms,
    stream_live_usage,
    stream_open_ratelimit,
    stream_slots_acquire,
    stream_slots_refresh,
    stream_slots_release,
)
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
    # The concurrent-session slots the session holds (``streaming.limits``), freed at its end.
    slots: tuple[str, ...] = ()
    # How many ms of audio the tenant's budgets allow this session at open; ``None``: no limit.
    allowance_ms: int | None = None


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
    stream_authorize(key=key, ctx=ctx, diarize=diarize)
    unknown = unknown_speaker_ids(tenant_id=tenant.pk, speaker_ids=speaker_ids or [])
    if unknown:
        raise errors.ValidationError(
            f"speaker_ids names no speaker of this tenant: {unknown[0]}.",
            details=[{"field": "speaker_ids", "message": f"unknown speaker {value}"} for value in unknown],
        )
    stream_open_ratelimit(key_id=str(key.pk), tenant_id=str(tenant.pk))
    status = budget_check(tenant=tenant, ctx=ctx)
    backend = policy_resolve_backend(
        policy=policy_get_or_provision(tenant=tenant), preference=backend_preference, is_available=is_available
    )
    # The tenant's other live streams count against what the budget leaves, before they are billed.
    allowance_ms = stream_allowance_ms(status=status, backend=backend, others=stream_live_usage(tenant_id=str(tenant.pk)))
    if allowance_ms is not None and allowance_ms <= 0:
        raise errors.BudgetExceeded("The tenant's budget is used up by its live streams.")

    session_id = f"str_{uuid.uuid4().hex}"
    slots = stream_slots_acquire(key_id=str(key.pk), tenant_id=str(tenant.pk), session_id=session_id, backend=backend)
    try:
        audit_record(
            ctx=ctx, action="stream.open", resource_type="stream_session", resource_id=session_id, details={"backend": backend}
        )
    except BaseException:
        stream_slots_release(slots=slots, session_id=session_id)
        raise
    return StreamGrant(
        key_id=key.pk,
        tenant_id=tenant.pk,
        user_id=membership.user_id,
        session_id=session_id,
        backend=backend,
        expires_at=timezone.now() + timedelta(seconds=settings.SCAIECHO_STREAM_MAX_SESSION_SECONDS),
        slots=slots,
        allowance_ms=allowance_ms,
    )


def stream_authorize(*, key: ApiKey, ctx: ActorContext, diarize: bool) -> None:
    """The module is on for the key's tenant and its user may stream (and diarize, if asked);
    a refusal is audited. ``stream_open`` calls it; a protocol that asks for diarization after
    the stream opened (the Realtime API's ``session.update``) calls it again then."""
    membership = key.membership
    if not membership.tenant.scaiecho_enabled:
        audit_permission_denied(ctx=ctx, action="stream.open", reason="module_not_enabled")
        raise errors.ModuleNotEnabled()
    permissions = membership_permissions(membership=membership)
    for needed in (PERM_TRANSCRIBE, PERM_DIARIZE) if diarize else (PERM_TRANSCRIBE,):
        if needed not in permissions:
            audit_permission_denied(ctx=ctx, action="stream.open", reason="permission_denied")
            raise errors.PermissionDenied(f"This stream needs the permission {needed}.")


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


def stream_still_allowed(*, grant: StreamGrant, audio_ms: int) -> int | None:
    """Re-checked during a session: a revoked key ends it (4401), an exhausted budget too (4429).

    Returns how many ms of audio the session may have in all (``None``: no limit): the budget
    left after the finished usage and the tenant's other live sessions (as their slots record
    them). Also records this session's ``audio_ms`` in its slots, for the other sessions' checks.
    """
    key = ApiKey.objects.select_related("membership__tenant").filter(pk=grant.key_id, revoked_at__isnull=True).first()
    if key is None:
        raise errors.AuthTokenInvalid("The API key was revoked.")
    stream_slots_refresh(slots=grant.slots, usage=LiveUsage(session_id=grant.session_id, backend=grant.backend, audio_ms=audio_ms))
    status = budget_check(tenant=key.membership.tenant)
    others = stream_live_usage(tenant_id=str(grant.tenant_id), exclude_session=grant.session_id)
    return stream_allowance_ms(status=status, backend=grant.backend, others=others)


def stream_keep_alive(*, grant: StreamGrant, audio_ms: int) -> None:
    """Refresh the session's concurrent-session slots (their TTL) with its audio so far."""
    stream_slots_refresh(slots=grant.slots, usage=LiveUsage(session_id=grant.session_id, backend=grant.backend, audio_ms=audio_ms))


def stream_finish(*, grant: StreamGrant, ctx: ActorContext, audio_duration_ms: int, latency_ms: int, outcome: str) -> None:
    """One usage record per session, for the audio actually received, and the audit row; the
    session's concurrent-session slots are freed whatever happens."""
    try:
        _stream_meter(grant=grant, ctx=ctx, audio_duration_ms=audio_duration_ms, latency_ms=latency_ms, outcome=outcome)
    finally:
        stream_slots_release(slots=grant.slots, session_id=grant.session_id)
        STREAM_SESSIONS.labels(backend=grant.backend, outcome=outcome).inc()


def _stream_meter(*, grant: StreamGrant, ctx: ActorContext, audio_duration_ms: int, latency_ms: int, outcome: str) -> None:
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
