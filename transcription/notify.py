"""Job-finished notifications: what wakes an inline request waiting for its job.

When a job reaches ``completed`` or ``failed`` the process that ended it publishes the job id on
the job's own Redis pub/sub channel, after the transaction commits (``services.job_complete`` and
``services.job_fail``); the waiter (``services.job_wait``) is subscribed to it. Pub/sub delivers
only to those listening at that moment and may drop a message (a reconnect, Redis restarting), so
the waiter reads the row once subscribed and again every ``SCAIECHO_INLINE_RECHECK_SECONDS``.

With the embedded defaults (no ``REDIS_URL``) the worker is another process with nothing shared
but the database and the queue folder, so there is nothing to notify through:
:func:`job_done_subscription` gives ``None`` and the waiter polls the row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from django.conf import settings

logger = logging.getLogger("scaiecho.transcription")

_client_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


def _client() -> redis.Redis | None:
    url = settings.REDIS_URL
    if not url:
        return None
    with _client_lock:
        if url not in _clients:
            # One pool per process (redis-py starts a new pool in a forked child).
            _clients[url] = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        return _clients[url]


def job_done_channel(job_id: Any) -> str:
    return f"scaiecho:job-done:{job_id}"


def job_done_publish(*, job_id: Any) -> None:
    """Tell whoever waits for ``job_id`` that it has finished. Best effort: a waiter that misses
    it finds the row finished at its next re-check, so a Redis error is logged, not raised."""
    client = _client()
    if client is None:
        return
    try:
        client.publish(job_done_channel(job_id), "done")
    except redis.RedisError as exc:
        logger.warning("job %s: could not publish that it finished (%s); waiters re-check the row", job_id, exc)


class JobDoneSubscription:
    """A live subscription to one job's channel; :meth:`wait` blocks until a message or a timeout."""

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub
        self.alive = True

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for the job's notification; ``True`` when it came. A Redis
        error ends the subscription (``alive`` becomes false) and the waiter polls instead."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
                if message is not None and message.get("type") == "message":
                    return True
        except (redis.RedisError, OSError) as exc:
            logger.warning("job notifications lost (%s); polling the row instead", exc)
            self.alive = False
            return False


@contextmanager
def job_done_subscription(*, job_id: Any) -> Iterator[JobDoneSubscription | None]:
    """Subscribe to ``job_id``'s channel and wait until Redis confirms it, so that a notification
    published after this returns cannot be missed; ``None`` without Redis (or while it is down)."""
    client = _client()
    if client is None:
        yield None
        return
    pubsub = client.pubsub()
    subscription: JobDoneSubscription | None = None
    try:
        try:
            pubsub.subscribe(job_done_channel(job_id))
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                message = pubsub.get_message(timeout=deadline - time.monotonic())
                if message is not None and message.get("type") == "subscribe":
                    subscription = JobDoneSubscription(pubsub)
                    break
        except (redis.RedisError, OSError) as exc:
            logger.warning("could not subscribe to job %s's notifications (%s); polling the row", job_id, exc)
        yield subscription
    finally:
        try:
            pubsub.close()
        except (redis.RedisError, OSError):
            pass
