"""``GET /metrics`` (and ``/v1/modules/scaiecho/metrics``): Prometheus text format.

Two kinds of numbers come out:

- What this host's processes counted (``scaiecho_site.metrics``: HTTP requests and latency,
  inference real-time factor, ended stream sessions), summed over every process that shares
  ``PROMETHEUS_MULTIPROC_DIR``, or this process's own without it.
- What the database and the cache say when scraped (:class:`StateCollector`): jobs by state and
  backend, queue depth, live workers and their heartbeats, live stream sessions, transcriptions
  and audio metered. These are the same from every web process of every host, so they need no
  shared files; aggregate them with ``max`` (or scrape one instance), not ``sum``.

Only the addresses in ``SCAIECHO_METRICS_ALLOWED_ADDRESSES`` (loopback by default), or a request
with ``Authorization: Bearer <SCAIECHO_METRICS_TOKEN>``, are answered; anyone else gets 403
``AUTHZ_PERMISSION_DENIED`` in the envelope. The client address is the one the failed-login
limits use (``SCAIECHO_TRUSTED_PROXIES`` decides whether ``X-Forwarded-For`` is believed), and a
request that came through a proxy we do not trust is never granted by address: a proxy on this
machine would otherwise make every outside caller look like loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from scaiecho_site import errors
from scaiecho_site.envelope import error_json_response
from scaiecho_site.metrics import multiprocess_dir
from streaming.limits import stream_live_sessions
from tenants.models import Backend
from tenants.ratelimit import networks, request_client_address
from tenants.selectors import usage_counts
from transcription.models import SpeechWorker, TranscriptionJob
from transcription.selectors import jobs_by_state_and_backend, queue_depth, webhooks_pending, workers_alive

logger = logging.getLogger("scaiecho.metrics")

NO_BACKEND = "none"  # a job whose backend is not resolved yet


class StateCollector(Collector):
    """The service's state, read from the database and the cache at each scrape."""

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "scaiecho_jobs", "Transcription jobs in the database by state and backend (none: not resolved yet).",
            labels=["state", "backend"],
        )
        counts = jobs_by_state_and_backend()
        for state in TranscriptionJob.Status.values:
            for backend in [*Backend.values, ""]:
                jobs.add_metric([state, backend or NO_BACKEND], counts.get((state, backend), 0))
        yield jobs

        depth = GaugeMetricFamily(
            "scaiecho_queue_depth", "Work waiting for a speech worker: whole jobs, and pieces of long jobs.", labels=["kind"]
        )
        for kind, waiting in queue_depth().items():
            depth.add_metric([kind], waiting)
        yield depth

        workers = workers_alive()
        alive = GaugeMetricFamily("scaiecho_workers_alive", "Workers whose heartbeat has not expired.", labels=["kind"])
        for kind, count in _counts((worker.kind for worker in workers), SpeechWorker.Kind.values):
            alive.add_metric([kind], count)
        yield alive
        heartbeat = GaugeMetricFamily(
            "scaiecho_worker_last_heartbeat_timestamp_seconds",
            "When each live worker last announced itself (Unix time).",
            labels=["worker", "kind"],
        )
        for worker in workers:
            heartbeat.add_metric([worker.worker_id, worker.kind], worker.last_seen_at.timestamp())
        yield heartbeat

        waiting, oldest_s = webhooks_pending()
        yield GaugeMetricFamily(
            "scaiecho_webhook_deliveries_pending", "Webhook events still to be delivered (a first attempt or a retry to come).", value=waiting
        )
        yield GaugeMetricFamily(
            "scaiecho_webhook_oldest_pending_seconds", "How long the oldest undelivered webhook event has waited (0: none).", value=oldest_s
        )

        live = GaugeMetricFamily(
            "scaiecho_stream_sessions_live", "Live stream sessions on every web process, by backend.", labels=["backend"]
        )
        sessions = stream_live_sessions()
        for backend, count in _counts((session.backend for session in sessions), Backend.values):
            live.add_metric([backend], count)
        yield live

        transcriptions = CounterMetricFamily(
            "scaiecho_transcriptions",
            "Metered transcriptions (completed batch jobs and stream sessions with audio), by kind and backend.",
            labels=["kind", "backend"],
        )
        audio = CounterMetricFamily(
            "scaiecho_audio_processed_seconds", "Audio transcribed and metered, by kind and backend.", labels=["kind", "backend"]
        )
        for usage in usage_counts():
            transcriptions.add_metric([usage.kind, usage.backend], usage.records)
            audio.add_metric([usage.kind, usage.backend], usage.audio_ms / 1000)
        yield transcriptions
        yield audio


def _counts(labels: Iterable[str], every: Iterable[str]) -> list[tuple[str, int]]:
    """How often each of ``every`` occurs in ``labels``, zero included (a series is never missing)."""
    counted = Counter(labels)
    return [(label, counted[label]) for label in every]


class _ThisProcess(Collector):
    """The instruments of this process (and the process and platform collectors)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def exposition() -> bytes:
    """The whole scrape in Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    folder = multiprocess_dir()
    if folder:
        MultiProcessCollector(registry, path=folder)
    else:
        registry.register(_ThisProcess())
    registry.register(StateCollector())
    return generate_latest(registry)


def _address_allowed(request: HttpRequest) -> bool:
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR") or request.META.get("HTTP_FORWARDED")
    peer = request.META.get("REMOTE_ADDR")
    address = request_client_address(request.META)
    if forwarded and address == peer:
        # Forwarded by a proxy that is not in SCAIECHO_TRUSTED_PROXIES: the peer is the proxy,
        # not the caller, so its address grants nothing.
        return False
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in networks(tuple(settings.SCAIECHO_METRICS_ALLOWED_ADDRESSES)))


def _token_matches(request: HttpRequest) -> bool:
    token = settings.SCAIECHO_METRICS_TOKEN
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


def metrics_allowed(request: HttpRequest) -> bool:
    return _token_matches(request) or _address_allowed(request)


@require_GET
def metrics_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    if not metrics_allowed(request):
        logger.info("metrics refused to %s request_id=%s", request_client_address(request.META), request.request_id)
        return error_json_response(
            request,
            errors.PermissionDenied(
                "Metrics are served only to the allowed addresses (SCAIECHO_METRICS_ALLOWED_ADDRESSES)"
                " or with the metrics token (SCAIECHO_METRICS_TOKEN)."
            ),
        )
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
