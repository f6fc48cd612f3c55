"""Sliding-window rate limits shared by every process through the cache (Redis when configured).

Each limit keeps one counter per fixed window and weighs the previous window's count by how much
of it still overlaps the sliding window (the "sliding window counter" algorithm): two cache keys
per limit, an atomic ``incr``, and no per-request list of timestamps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache


@dataclass(frozen=True)
class Limit:
    scope: str  # "key", "user" or "tenant"
    identity: str
    limit: int


@dataclass(frozen=True)
class RateLimitState:
    limit: int
    remaining: int
    reset_seconds: int
    allowed: bool
    retry_after: int

    def headers(self) -> dict[str, str]:
        return {
            "X-Scaigrid-Ratelimit-Limit": str(self.limit),
            "X-Scaigrid-Ratelimit-Remaining": str(self.remaining),
            "X-Scaigrid-Ratelimit-Reset": str(self.reset_seconds),
        }


def _seconds_until_allowed(*, previous: int, current: int, limit: int, elapsed: float, window: int) -> float:
    """How long until one more request fits, if no other request arrives meanwhile."""
    if current < limit and previous > 0:
        # previous * (window - elapsed - t) / window + current + 1 <= limit
        return max(0.0, (window - elapsed) - (limit - current - 1) * window / previous)
    if current < limit:
        return 0.0
    # Wait for the next window, where this window's count decays as the "previous" one.
    return (window - elapsed) + window * (1 - (limit - 1) / current)


def ratelimit_hit(*, limits: list[Limit], now: float | None = None) -> RateLimitState:
    """Count one request against every limit; the tightest one decides and is reported.

    A refused request is not counted, so a client that backs off is not punished further.
    """
    window = settings.SCAIECHO_RATELIMIT_WINDOW_SECONDS
    now = time.time() if now is None else now
    bucket = int(now // window)
    elapsed = now - bucket * window
    weight = (window - elapsed) / window
    states: list[tuple[RateLimitState, str]] = []
    for item in limits:
        base = f"ratelimit:{item.scope}:{item.identity}:"
        current_key = base + str(bucket)
        cache.add(current_key, 0, timeout=window * 2 + 1)
        current = cache.incr(current_key)
        previous = cache.get(base + str(bucket - 1), 0)
        estimate = previous * weight + current
        allowed = estimate <= item.limit
        wait = _seconds_until_allowed(
            previous=previous, current=current - 1, limit=item.limit, elapsed=elapsed, window=window
        )
        states.append(
            (
                RateLimitState(
                    limit=item.limit,
                    remaining=max(0, math.floor(item.limit - estimate)),
                    reset_seconds=max(1, math.ceil(window - elapsed)),
                    allowed=allowed,
                    retry_after=max(1, math.ceil(wait)),
                ),
                current_key,
            )
        )
    refused = [state for state, _ in states if not state.allowed]
    if refused:
        for _, current_key in states:
            cache.decr(current_key)
        worst = max(refused, key=lambda state: state.retry_after)
        return RateLimitState(
            limit=worst.limit, remaining=0, reset_seconds=worst.reset_seconds, allowed=False, retry_after=worst.retry_after
        )
    return min((state for state, _ in states), key=lambda state: (state.remaining, state.limit))


def api_limits(*, key_id: str, user_id: str, tenant_id: str) -> list[Limit]:
    return [
        Limit("key", key_id, settings.SCAIECHO_RATELIMIT_PER_KEY),
        Limit("user", user_id, settings.SCAIECHO_RATELIMIT_PER_USER),
        Limit("tenant", tenant_id, settings.SCAIECHO_RATELIMIT_PER_TENANT),
    ]
