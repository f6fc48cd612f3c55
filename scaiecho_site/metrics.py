"""What each process counts for ``/metrics``: HTTP requests, inference speed, stream sessions.

These are ``prometheus_client`` instruments, so they live in the process that observes them: the
web process counts requests and stream sessions, a Celery or stream worker times its inference.
With ``PROMETHEUS_MULTIPROC_DIR`` set (``scripts/run`` sets it) every process on the host writes
its values to files in that folder and ``/metrics`` adds them up (``prometheus_client``'s
multiprocess mode); without it, ``/metrics`` shows the serving process's own values only. The
numbers that are the same from every process (jobs by state, queue depth, workers, live streams,
audio processed) are read from the database and the cache when scraped
(``scaiecho_site.monitoring``), not counted here.

Labels are bounded: a route is its URL pattern (never a path with ids in it), a method one of a
fixed set, a status an HTTP status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from prometheus_client import Counter, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

HTTP_REQUESTS = Counter(
    "scaiecho_http_requests",
    "HTTP requests answered, by route (URL pattern), method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "scaiecho_http_request_duration_seconds",
    "Time to answer an HTTP request, by route (URL pattern), method and status.",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
INFERENCE_RTF = Histogram(
    "scaiecho_inference_real_time_factor",
    "Seconds of compute per second of audio (below 1: faster than real time), by kind"
    " (batch: one engine call of a job or piece; stream: a whole session's decodes) and backend.",
    ["kind", "backend"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
)
STREAM_SESSIONS = Counter(
    "scaiecho_stream_sessions",
    "Live stream sessions that ended, by backend and outcome.",
    ["backend", "outcome"],
)
# Counted by the webhook sender (transcription.webhooks), one per attempt: outcome ``delivered``,
# ``retrying`` (to be tried again) or ``failed`` (given up).
WEBHOOK_DELIVERIES = Counter(
    "scaiecho_webhook_deliveries",
    "Webhook delivery attempts, by outcome.",
    ["outcome"],
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "<unmatched>"


def multiprocess_dir() -> str | None:
    """The folder the processes of this host share their values through, or ``None``."""
    return os.environ.get(MULTIPROC_ENV) or None


def observe_inference(*, kind: str, backend: str, compute_s: float, audio_s: float) -> None:
    if audio_s > 0:
        INFERENCE_RTF.labels(kind=kind, backend=backend).observe(compute_s / audio_s)


def route_of(request: HttpRequest) -> str:
    """The URL pattern the request matched (``/v1/modules/scaiecho/transcribe/jobs/<str:job_id>``)."""
    match = getattr(request, "resolver_match", None)
    if match is None or not match.route:
        return UNMATCHED_ROUTE
    return "/" + match.route.lstrip("^").rstrip("$")


class HttpMetricsMiddleware:
    """Count and time every HTTP request by route, method and status (outermost, so the time
    covers the other middleware and a refusal by any of them counts too)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = self.get_response(request)
            status = response.status_code
            return response
        finally:
            route = route_of(request)
            method = request.method if request.method in _METHODS else "other"
            HTTP_LATENCY.labels(route=route, method=method, status=str(status)).observe(time.perf_counter() - started)
            HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
