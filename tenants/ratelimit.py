"""Sliding-window rate limits shared by every process through the cache (Redis when configured).

Each limit keeps one counter per fixed window and weighs the previous window's count by how much
of it still overlaps the sliding window (the "sliding window counter" algorithm): two cache keys
per limit, an atomic ``incr``, and no per-request list of timestamps.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


# --- Client addresses and failed authentication -------------------------------------------------


@functools.lru_cache(maxsize=8)
def networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The address ranges a setting lists (entries that do not parse are left out: the start-up
    checks report them, scaiecho.E011 and E013)."""
    parsed = []
    for entry in entries:
        try:
            parsed.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return tuple(parsed)


def address_in(address: str | None, ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether ``address`` parses and lies in one of ``ranges``."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in ranges)


def client_address(*, remote_addr: str | None, forwarded_for: str | None) -> str | None:
    """The caller's address: the peer's, unless the peer is a trusted proxy
    (``SCAIECHO_TRUSTED_PROXIES``); then the nearest ``X-Forwarded-For`` hop that is not one.

    Anyone can send ``X-Forwarded-For``, so it is read only from the proxies named, and from the
    right, where those proxies appended it.
    """
    if not remote_addr:
        return None
    trusted = networks(tuple(settings.SCAIECHO_TRUSTED_PROXIES))
    if not trusted or not forwarded_for or not address_in(remote_addr, trusted):
        return remote_addr
    for hop in reversed([hop.strip() for hop in forwarded_for.split(",")]):
        if address_in(hop, trusted):
            continue
        try:
            return str(ipaddress.ip_address(hop))
        except ValueError:  # garbage a client put there: stop at the last proxy we trust
            return remote_addr
    return remote_addr


def request_client_address(meta: Mapping[str, Any]) -> str | None:
    """:func:`client_address` of a Django request's ``META``."""
    return client_address(remote_addr=meta.get("REMOTE_ADDR"), forwarded_for=meta.get("HTTP_X_FORWARDED_FOR"))


def _auth_failure_counts(address: str, now: float) -> tuple[str, int, int, float]:
    window = settings.SCAIECHO_AUTH_FAILURE_WINDOW_SECONDS
    bucket = int(now // window)
    current_key, previous_key = f"authfail:{address}:{bucket}", f"authfail:{address}:{bucket - 1}"
    counts = cache.get_many([current_key, previous_key])  # one round trip on every authenticated request
    return current_key, counts.get(previous_key, 0), counts.get(current_key, 0), now - bucket * window


def auth_failures_retry_after(*, address: str, now: float | None = None) -> int | None:
    """Seconds until ``address`` may try to authenticate again, or ``None`` when it may now.

    After ``SCAIECHO_AUTH_FAILURES_PER_ADDRESS`` failures in the sliding window every attempt is
    refused, a right key too, so that guessing keys costs the guesser time and not the database.
    """
    limit = settings.SCAIECHO_AUTH_FAILURES_PER_ADDRESS
    if limit <= 0:
        return None
    window = settings.SCAIECHO_AUTH_FAILURE_WINDOW_SECONDS
    now = time.time() if now is None else now
    _, previous, current, elapsed = _auth_failure_counts(address, now)
    # The same test as the wait below: one more attempt would still fit in the limit.
    if previous * (window - elapsed) / window + current + 1 <= limit:
        return None
    wait = _seconds_until_allowed(previous=previous, current=current, limit=limit, elapsed=elapsed, window=window)
    return max(1, math.ceil(wait))


def auth_failure_record(*, address: str, now: float | None = None) -> None:
    """Count one failed authentication from ``address``."""
    if settings.SCAIECHO_AUTH_FAILURES_PER_ADDRESS <= 0:
        return
    now = time.time() if now is None else now
    current_key, *_ = _auth_failure_counts(address, now)
    cache.add(current_key, 0, timeout=settings.SCAIECHO_AUTH_FAILURE_WINDOW_SECONDS * 2 + 1)
    cache.incr(current_key)
