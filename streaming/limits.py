"""Bounds on live streams, per API key and per tenant (issue 11, "Streams").

- **Concurrent sessions** (``SCAIECHO_STREAM_MAX_PER_KEY`` / ``_PER_TENANT``): a session holds one
  numbered slot of its key and one of its tenant in the cache (Redis when configured). A slot is
  taken with an atomic ``add`` (SET NX) and lives ``SCAIECHO_STREAM_SLOT_TTL_SECONDS``; the consumer
  refreshes it while the session runs and deletes it when the session ends, so a web process that
  dies frees its slots within one TTL instead of leaking them forever. A slot's value also carries
  the session's audio so far, which is how a stream sees the other live streams of its tenant when
  it re-checks the budget.
- **Open rate** (``SCAIECHO_STREAM_OPENS_PER_KEY`` / ``_PER_TENANT`` per
  ``SCAIECHO_RATELIMIT_WINDOW_SECONDS``): the sliding-window counters of :mod:`tenants.ratelimit`.
- **Pace** (:class:`AudioPace`): decoded audio may run at most ``SCAIECHO_STREAM_MAX_SPEED`` times
  real time after a burst of ``SCAIECHO_STREAM_BURST_SECONDS``.
- **Live budget** (:func:`stream_allowance_ms`): what the tenant's blocking budgets leave once the
  finished usage and every live session's audio are counted.

Every function here does cache or database I/O: call it in a thread, never on the event loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis
from django.conf import settings
from django.core.cache import cache

from scaiecho_site import errors
from tenants.models import Tenant
from tenants.ratelimit import Limit, ratelimit_hit
from tenants.services import BudgetStatus, usage_price_per_audio_minute

_SLOT_PREFIX = "streamslot"


@dataclass(frozen=True)
class LiveUsage:
    """A live session's audio so far, as its slot records it."""

    session_id: str
    backend: str
    audio_ms: int


def _slot_ttl() -> int:
    return max(1, math.ceil(settings.SCAIECHO_STREAM_SLOT_TTL_SECONDS))


def _slot_keys(scope: str, identity: str, limit: int) -> list[str]:
    return [f"{_SLOT_PREFIX}:{scope}:{identity}:{index}" for index in range(max(0, limit))]


def _slot_value(usage: LiveUsage) -> dict[str, Any]:
    return {"session": usage.session_id, "backend": usage.backend, "audio_ms": usage.audio_ms}


def _take_slot(candidates: list[str], value: dict[str, Any]) -> str | None:
    """The first free slot among ``candidates``, taken atomically; ``None`` when all are held."""
    held = cache.get_many(candidates)
    for slot in candidates:
        if slot not in held and cache.add(slot, value, timeout=_slot_ttl()):
            return slot
    return None


def stream_slots_acquire(*, key_id: str, tenant_id: str, session_id: str, backend: str) -> tuple[str, ...]:
    """Take a concurrent-session slot of the key and one of the tenant, or raise ``RateLimited``.

    Nothing is held when it raises. A caption token's session passes the key that minted it, so
    it counts toward that key's limit.
    """
    value = _slot_value(LiveUsage(session_id=session_id, backend=backend, audio_ms=0))
    per_key, per_tenant = settings.SCAIECHO_STREAM_MAX_PER_KEY, settings.SCAIECHO_STREAM_MAX_PER_TENANT
    key_slot = _take_slot(_slot_keys("key", key_id, per_key), value)
    if key_slot is None:
        raise errors.RateLimited(
            f"This API key already has {per_key} live streams (SCAIECHO_STREAM_MAX_PER_KEY); close one first.",
            retry_after=1,
        )
    tenant_slot = _take_slot(_slot_keys("tenant", tenant_id, per_tenant), value)
    if tenant_slot is None:
        stream_slots_release(slots=(key_slot,), session_id=session_id)
        raise errors.RateLimited(
            f"This tenant already has {per_tenant} live streams (SCAIECHO_STREAM_MAX_PER_TENANT); close one first.",
            retry_after=1,
        )
    return key_slot, tenant_slot


def stream_slots_refresh(*, slots: tuple[str, ...], usage: LiveUsage) -> None:
    """Keep the session's slots alive for another TTL and record its audio so far.

    A slot that expired meanwhile (the cache restarted, the process stalled past the TTL) is taken
    again only if it is still free: a refresh never evicts another session.
    """
    value = _slot_value(usage)
    held = cache.get_many(list(slots))
    mine = {slot: value for slot in slots if (held.get(slot) or {}).get("session") == usage.session_id}
    if mine:
        cache.set_many(mine, timeout=_slot_ttl())
    for slot in slots:
        if slot not in held:
            cache.add(slot, value, timeout=_slot_ttl())


def stream_slots_release(*, slots: tuple[str, ...], session_id: str) -> None:
    """Free the session's slots (only those it still holds)."""
    held = cache.get_many(list(slots))
    cache.delete_many([slot for slot in slots if (held.get(slot) or {}).get("session") == session_id])


def stream_live_usage(*, tenant_id: str, exclude_session: str | None = None) -> list[LiveUsage]:
    """The live sessions of a tenant with their audio so far (one cache read)."""
    held = cache.get_many(_slot_keys("tenant", tenant_id, settings.SCAIECHO_STREAM_MAX_PER_TENANT))
    return [
        LiveUsage(session_id=value["session"], backend=value["backend"], audio_ms=int(value["audio_ms"]))
        for value in held.values()
        if isinstance(value, dict) and value.get("session") != exclude_session
    ]


def stream_live_sessions() -> list[LiveUsage]:
    """Every live session of every tenant, on every web process, as the tenants' slots record
    them (for ``/metrics``). With Redis the slots are found with one ``SCAN``; with the embedded
    per-process cache (one web process) each tenant's slots are read."""
    pattern = f"{_SLOT_PREFIX}:tenant:*"
    if settings.REDIS_URL:
        stored = cache.make_key(pattern)  # the cache's own key: "<prefix>:<version>:streamslot:tenant:*"
        cut = len(stored) - len(pattern)
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
        try:
            keys = [key.decode()[cut:] for key in client.scan_iter(match=stored, count=1000)]
        finally:
            client.close()
    else:
        per_tenant = settings.SCAIECHO_STREAM_MAX_PER_TENANT
        tenant_ids = Tenant.objects.values_list("pk", flat=True)
        keys = [slot for tenant_id in tenant_ids for slot in _slot_keys("tenant", str(tenant_id), per_tenant)]
    held = cache.get_many(keys) if keys else {}
    return [
        LiveUsage(session_id=value["session"], backend=value["backend"], audio_ms=int(value["audio_ms"]))
        for value in held.values()
        if isinstance(value, dict)
    ]


def stream_open_ratelimit(*, key_id: str, tenant_id: str) -> None:
    """Count one stream open against the key's and the tenant's open rates, or raise ``RateLimited``."""
    state = ratelimit_hit(
        limits=[
            Limit("stream_open_key", key_id, settings.SCAIECHO_STREAM_OPENS_PER_KEY),
            Limit("stream_open_tenant", tenant_id, settings.SCAIECHO_STREAM_OPENS_PER_TENANT),
        ]
    )
    if not state.allowed:
        raise errors.RateLimited(
            f"Too many streams opened: at most {state.limit} per {settings.SCAIECHO_RATELIMIT_WINDOW_SECONDS} s."
            f" Retry in {state.retry_after} s.",
            retry_after=state.retry_after,
        )


def stream_allowance_ms(*, status: BudgetStatus, backend: str, others: list[LiveUsage]) -> int | None:
    """How many ms of audio this session may have in all, or ``None`` for no limit.

    ``status`` counts the finished usage; the other live sessions' audio (``others``) is taken off
    what is left, in audio seconds and, at each session's backend price, in cost.
    """
    limits: list[float] = []
    if status.remaining_audio_seconds is not None:
        limits.append(status.remaining_audio_seconds * 1000 - sum(usage.audio_ms for usage in others))
    price = usage_price_per_audio_minute(backend=backend)
    if status.remaining_cost is not None and price > 0:
        others_cost = sum(
            (usage_price_per_audio_minute(backend=usage.backend) * Decimal(usage.audio_ms) / Decimal(60_000) for usage in others),
            Decimal("0"),
        )
        limits.append(float((status.remaining_cost - others_cost) / price * 60_000))
    if not limits:
        return None
    return max(0, math.floor(min(limits)))


class AudioPace:
    """A token bucket of audio seconds: it holds up to ``burst`` seconds and refills at ``speed``
    seconds per wall-clock second. A frame is refused once the bucket is empty, so a stream runs
    at most ``burst`` seconds (plus the one frame that crosses it) ahead of ``speed`` x real time.
    """

    def __init__(self, *, speed: float, burst: float, now: float | None = None) -> None:
        self.speed = speed
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic() if now is None else now

    def take(self, seconds: float, now: float | None = None) -> bool:
        """Count ``seconds`` of audio arriving now; ``False`` (nothing counted) when it comes too fast."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.speed)
        self.last = max(self.last, now)
        if seconds and self.tokens <= 0:
            return False
        self.tokens -= seconds
        return True
