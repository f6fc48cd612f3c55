"""Webhook deliveries of finished jobs (contract section 8).

When a job with a ``webhook_url`` reaches ``completed`` or ``failed``, :func:`delivery_create`
writes its event in the transaction that finishes the job (an outbox row: the event exists iff the
job finished), and ``services`` sends ``transcription.deliver_webhook`` once that commits. The
task calls :func:`delivery_attempt` once per try: it checks the destination again, POSTs the
stored body signed per Standard Webhooks with the tenant's current secret, and records the attempt.
A timeout, a connection error or a 5xx is retried after ``SCAIECHO_WEBHOOK_RETRY_BASE_SECONDS *
2**(n-1)`` seconds until ``SCAIECHO_WEBHOOK_MAX_ATTEMPTS``; a 2xx delivers; anything else (a 4xx,
a redirect, which is not followed, a refused destination) fails at once. A tenant has at most
``SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT`` attempts in flight; a delivery beyond that waits its
turn without using an attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from scaiecho_site.metrics import WEBHOOK_DELIVERIES
from tenants.models import Tenant
from tenants.selectors import webhook_secret_of
from tenants.webhooks import destination_check, pinned_target, signature
from transcription.models import TranscriptionJob, WebhookAttempt, WebhookDelivery
from transcription.serializers import job_data

logger = logging.getLogger("scaiecho.transcription")

EVENT_TYPES = {
    TranscriptionJob.Status.COMPLETED: "transcription.completed",
    TranscriptionJob.Status.FAILED: "transcription.failed",
}
USER_AGENT = "ScaiEcho-Webhooks/1"


def delivery_create(*, job: TranscriptionJob) -> WebhookDelivery | None:
    """The webhook event of a job that has just reached a terminal state, or ``None`` when the job
    has no ``webhook_url``. Call it inside the transaction that finishes the job."""
    if not job.webhook_url or job.status not in EVENT_TYPES:
        return None
    event = {"type": EVENT_TYPES[job.status], "data": job_data(job)}
    body = json.dumps(event, cls=DjangoJSONEncoder, separators=(",", ":"), ensure_ascii=False)
    return WebhookDelivery.objects.create(
        tenant_id=job.tenant_id, job=job, event_type=event["type"], url=job.webhook_url, body=body
    )


@dataclass(frozen=True)
class AttemptOutcome:
    """What one attempt came to: ``retry_in`` seconds until the next one, or ``None`` when done."""

    status: str
    retry_in: float | None = None


@dataclass
class _Answer:
    status_code: int | None = None
    error: str = ""
    excerpt: str = ""


def retry_delay(attempt: int) -> float:
    """Seconds between attempt ``attempt`` (1-based) and the next."""
    return min(settings.SCAIECHO_WEBHOOK_RETRY_BASE_SECONDS * 2 ** (attempt - 1), settings.SCAIECHO_WEBHOOK_RETRY_MAX_SECONDS)


def busy_wait() -> float:
    """Seconds a delivery waits while its tenant has ``SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT``
    attempts in flight: about half an attempt's longest wait (0.5 to 5 s)."""
    return max(0.5, min(5.0, settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS / 2))


def _tenant_busy(delivery: WebhookDelivery) -> bool:
    """Whether the delivery's tenant has as many attempts in flight as it may. The tenant's row is
    locked for the rest of the caller's transaction, so two workers cannot both take the last
    place: a tenant whose receivers hang holds that many webhook threads, never all of them."""
    Tenant.objects.select_for_update().filter(pk=delivery.tenant_id).first()
    in_flight = (
        WebhookDelivery.objects.filter(tenant_id=delivery.tenant_id, in_flight_until__gt=timezone.now())
        .exclude(pk=delivery.pk)
        .count()
    )
    return in_flight >= settings.SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT


def delivery_attempt(*, delivery_id: Any) -> AttemptOutcome:
    """Make the next attempt of a pending delivery and record it. What the delivery task runs;
    a delivery that is no longer pending (a duplicate task) is left alone. No transaction is held
    while the receiver answers."""
    with transaction.atomic():
        delivery = WebhookDelivery.objects.select_for_update().filter(pk=delivery_id).first()
        if delivery is None or delivery.status != WebhookDelivery.Status.PENDING:
            return AttemptOutcome(status=delivery.status if delivery else "gone")
        if _tenant_busy(delivery):
            return AttemptOutcome(status=delivery.status, retry_in=busy_wait())
        delivery.attempts += 1
        delivery.in_flight_until = timezone.now() + timedelta(seconds=settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS + 30)
        delivery.save(update_fields=["attempts", "in_flight_until"])
    number = delivery.attempts
    started_at = timezone.now()
    started = time.monotonic()
    retryable = False
    destination = destination_check(delivery.url)
    secret = webhook_secret_of(tenant_id=delivery.tenant_id)
    if destination.problem is not None:
        answer = _Answer(error=f"destination refused: {destination.problem}")
    elif secret is None:
        answer = _Answer(error="the tenant has no webhook signing secret")
    else:
        answer, retryable = post_signed(
            url=delivery.url, addresses=destination.addresses, message_id=delivery.message_id,
            body=delivery.body.encode(), secret=secret,
        )  # fmt: skip
    duration_ms = int((time.monotonic() - started) * 1000)

    delivered = answer.status_code is not None and 200 <= answer.status_code < 300
    retry_in = retry_delay(number) if retryable and number < settings.SCAIECHO_WEBHOOK_MAX_ATTEMPTS else None
    now = timezone.now()
    next_at = now + timedelta(seconds=retry_in) if retry_in is not None else None
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery=delivery,
            number=number,
            started_at=started_at,
            duration_ms=duration_ms,
            status_code=answer.status_code,
            error=answer.error[:500],
            response_excerpt=answer.excerpt,
            next_retry_at=next_at,
        )
        if delivered:
            delivery.status = WebhookDelivery.Status.DELIVERED
        elif retry_in is None:
            delivery.status = WebhookDelivery.Status.FAILED
        delivery.next_attempt_at = next_at
        delivery.finished_at = None if retry_in is not None else now
        delivery.in_flight_until = None
        delivery.save(update_fields=["status", "next_attempt_at", "finished_at", "in_flight_until"])
    WEBHOOK_DELIVERIES.labels(outcome="delivered" if delivered else "retrying" if retry_in is not None else "failed").inc()
    if not delivered:
        logger.warning(
            "webhook %s (job %s) attempt %d: %s%s",
            delivery.message_id, delivery.job_id, number, answer.status_code or answer.error,
            f"; retry in {retry_in:g} s" if retry_in is not None else "; given up",
        )
    return AttemptOutcome(status=delivery.status, retry_in=retry_in)


async def _connect(
    client: httpx.AsyncClient,
    targets: list[tuple[str, dict[str, str], dict[str, str]]],
    *,
    content: bytes,
    headers: dict[str, str],
) -> httpx.Response:
    """The streamed response of the first target that takes the connection (the host's next
    address only while nothing was sent)."""

    def request(target: str, host: dict[str, str], extensions: dict[str, str]) -> httpx.Request:
        return client.build_request("POST", target, content=content, headers={**headers, **host}, extensions=extensions)

    *earlier, last = targets
    for target in earlier:
        try:
            return await client.send(request(*target), stream=True)
        except httpx.ConnectError:
            pass
    return await client.send(request(*last), stream=True)


async def _post(
    targets: list[tuple[str, dict[str, str], dict[str, str]]], *, content: bytes, headers: dict[str, str], timeout_s: float
) -> _Answer:
    """One POST, its connection tries and at most ``SCAIECHO_WEBHOOK_MAX_RESPONSE_BYTES`` of the
    answer, all within ``timeout_s`` in all: httpx's timeouts bound each read, and a receiver
    that sends its answer a byte at a time would pass every one of them."""
    limit = settings.SCAIECHO_WEBHOOK_MAX_RESPONSE_BYTES
    received = bytearray()
    response: httpx.Response | None = None
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        try:
            async with asyncio.timeout(timeout_s):
                response = await _connect(client, targets, content=content, headers=headers)
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if len(received) >= limit:
                        break  # enough to show; the rest of the answer does not matter
        except TimeoutError:
            if response is None:
                raise httpx.TimeoutException("no answer in time") from None
            # The status came in time; what the body had by then is kept.
        finally:
            if response is not None:
                await response.aclose()
    return _Answer(status_code=response.status_code, excerpt=received[:limit].decode("utf-8", "replace"))


def post_signed(
    *, url: str, addresses: tuple[str, ...], message_id: str, body: bytes, secret: str
) -> tuple[_Answer, bool]:
    """POST ``body`` signed for ``message_id``; the answer and whether a failure is worth another
    try. With ``addresses`` (what the destination check resolved the host to) the call connects to
    those, in order while a connection cannot be made, and never resolves the host again. Redirects
    are not followed and at most ``SCAIECHO_WEBHOOK_MAX_RESPONSE_BYTES`` of the answer are read,
    all within ``SCAIECHO_WEBHOOK_TIMEOUT_SECONDS``."""
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret=secret, message_id=message_id, timestamp=timestamp, body=body),
    }
    timeout_s = settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS
    targets = [pinned_target(url, address) for address in addresses] or [(url, {}, {})]
    try:
        answer = asyncio.run(_post(targets, content=body, headers=headers, timeout_s=timeout_s))
    except httpx.TimeoutException as exc:
        return _Answer(error=f"timed out after {timeout_s:g} s ({type(exc).__name__})"), True
    except httpx.TransportError as exc:
        return _Answer(error=f"connection failed: {type(exc).__name__}: {exc}"), True
    except httpx.HTTPError as exc:  # an unusable URL (it passed the destination check)
        return _Answer(error=f"request failed: {type(exc).__name__}: {exc}"), False
    if 300 <= answer.status_code < 400:
        answer.error = "redirects are not followed"
    return answer, answer.status_code >= 500
