"""Bounds on inline (synchronous) transcription requests waiting for their job (issue 11, "Inline waits").

An inline request holds a thread of its web process (and, while it waits, nothing else: the
database connection is released, see ``services.job_wait``) until its job finishes. Two caps keep
that bounded:

- **Per process** (``SCAIECHO_INLINE_MAX_WAITING_PER_PROCESS``): a counter in this process.
- **Per tenant** (``SCAIECHO_INLINE_MAX_WAITING_PER_TENANT``): a waiter holds one numbered slot
  of its tenant in the cache (Redis when configured, so counted across web processes), taken with
  an atomic ``add`` (SET NX) and living ``SCAIECHO_INLINE_SLOT_TTL_SECONDS``. The waiter refreshes
  it while it waits and deletes it when done, so a web process that dies frees its slots within
  one TTL instead of leaking them forever.

Over either cap :func:`inline_wait_acquire` raises ``RateLimited`` and holds nothing: the native
endpoint then takes the async path (202), the OpenAI-compatible one answers the 429.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import cache

from scaiecho_site import errors

_SLOT_PREFIX = "inlinewait"
# What a refused OpenAI-compatible client is told to wait (inline jobs take seconds).
INLINE_RETRY_AFTER_SECONDS = 5

_process_lock = threading.Lock()
_process_waiting = 0


def _slot_ttl() -> int:
    return max(1, math.ceil(settings.SCAIECHO_INLINE_SLOT_TTL_SECONDS))


def _slot_keys(tenant_id: str) -> list[str]:
    return [f"{_SLOT_PREFIX}:tenant:{tenant_id}:{index}" for index in range(max(0, settings.SCAIECHO_INLINE_MAX_WAITING_PER_TENANT))]


def _take_slot(candidates: list[str], token: str) -> str | None:
    """The first free slot among ``candidates``, taken atomically; ``None`` when all are held."""
    held = cache.get_many(candidates)
    for slot in candidates:
        if slot not in held and cache.add(slot, token, timeout=_slot_ttl()):
            return slot
    return None


def _process_release() -> None:
    global _process_waiting
    with _process_lock:
        _process_waiting = max(0, _process_waiting - 1)


@dataclass
class InlineWait:
    """One inline request's places: one of this process and the tenant's cache slot ``slot``."""

    slot: str
    token: str
    refreshed_at: float = field(default_factory=time.monotonic)
    released: bool = False

    def refresh(self) -> None:
        """Keep the tenant slot alive; called as the waiter wakes, it writes at most every third
        of the TTL. A slot that expired meanwhile (the cache restarted, the process stalled) is
        taken again only if it is still free: a refresh never evicts another waiter."""
        now = time.monotonic()
        if self.released or now - self.refreshed_at < settings.SCAIECHO_INLINE_SLOT_TTL_SECONDS / 3:
            return
        self.refreshed_at = now
        holder = cache.get(self.slot)
        if holder == self.token:
            cache.touch(self.slot, timeout=_slot_ttl())
        elif holder is None:
            cache.add(self.slot, self.token, timeout=_slot_ttl())


def inline_wait_acquire(*, tenant_id: str) -> InlineWait:
    """Take a waiting place of this process and one of the tenant, or raise ``RateLimited``.

    Nothing is held when it raises. Call :func:`inline_wait_release` when the wait is over.
    """
    global _process_waiting
    per_process, per_tenant = settings.SCAIECHO_INLINE_MAX_WAITING_PER_PROCESS, settings.SCAIECHO_INLINE_MAX_WAITING_PER_TENANT
    with _process_lock:
        if _process_waiting >= per_process:
            raise errors.RateLimited(
                f"This server already has {per_process} inline transcriptions waiting"
                " (SCAIECHO_INLINE_MAX_WAITING_PER_PROCESS); retry, or use the async path.",
                retry_after=INLINE_RETRY_AFTER_SECONDS,
            )
        _process_waiting += 1
    token = uuid.uuid4().hex
    try:
        slot = _take_slot(_slot_keys(tenant_id), token)
    except BaseException:
        _process_release()
        raise
    if slot is None:
        _process_release()
        raise errors.RateLimited(
            f"This tenant already has {per_tenant} inline transcriptions waiting"
            " (SCAIECHO_INLINE_MAX_WAITING_PER_TENANT); retry, or use the async path.",
            retry_after=INLINE_RETRY_AFTER_SECONDS,
        )
    return InlineWait(slot=slot, token=token)


def inline_wait_release(wait: InlineWait) -> None:
    """Give back the request's places (the tenant slot only while it still holds it)."""
    if wait.released:
        return
    wait.released = True
    _process_release()
    if cache.get(wait.slot) == wait.token:
        cache.delete(wait.slot)

