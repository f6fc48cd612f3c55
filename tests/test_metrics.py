"""``GET /metrics``: who may read it, and what an operator reads there (contract section 10).

The fast tests scrape in-process with Django's test client; the end-to-end test runs a real job
on the session's Celery worker and a real stream through a live daphne server, both sharing a
``PROMETHEUS_MULTIPROC_DIR``, and reads the scrape with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
import websockets
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from streaming.limits import stream_slots_acquire, stream_slots_release
from tenants.models import Role, TenantPolicy, UsageRecord
from tests.factories import KeyFactory, TenantFactory
from tests.voices import synth_speech
from transcription.models import SpeechWorker, TranscriptionJob, WebhookDelivery

pytestmark = pytest.mark.django_db

OUTSIDER = "203.0.113.7"
PATHS = ["/metrics", "/v1/modules/scaiecho/metrics"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels (the official parser)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client, path: str = "/metrics", **extra: Any) -> dict:
    response = client.get(path, **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return samples(response.content.decode())


def assert_refused(response) -> None:
    assert response.status_code == 403
    body = response.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
    assert "SCAIECHO_METRICS_ALLOWED_ADDRESSES" in body["error"]["message"]
    assert body["meta"]["request_id"].startswith("req_")


@pytest.mark.parametrize("path", PATHS)
def test_loopback_reads_metrics_and_other_addresses_are_refused(client, path):
    assert scrape(client, path, REMOTE_ADDR="127.0.0.1")
    assert scrape(client, path, REMOTE_ADDR="::1")
    assert_refused(client.get(path, REMOTE_ADDR=OUTSIDER))


def test_the_token_opens_metrics_to_any_address_and_a_wrong_one_does_not(client, settings):
    settings.SCAIECHO_METRICS_TOKEN = "metrics-token-0123456789"
    assert_refused(client.get("/metrics", REMOTE_ADDR=OUTSIDER, HTTP_AUTHORIZATION="Bearer wrong-token"))
    assert_refused(client.get("/metrics", REMOTE_ADDR=OUTSIDER))
    assert scrape(client, REMOTE_ADDR=OUTSIDER, HTTP_AUTHORIZATION="Bearer metrics-token-0123456789")
    # Without a token configured, no bearer value opens it.
    settings.SCAIECHO_METRICS_TOKEN = ""
    assert_refused(client.get("/metrics", REMOTE_ADDR=OUTSIDER, HTTP_AUTHORIZATION="Bearer "))


def test_allowed_addresses_setting_and_proxies(client, settings):
    settings.SCAIECHO_METRICS_ALLOWED_ADDRESSES = ["10.20.0.0/16"]
    assert scrape(client, REMOTE_ADDR="10.20.3.4")
    assert_refused(client.get("/metrics", REMOTE_ADDR="127.0.0.1"))
    # A proxy on this machine that is not trusted: the caller behind it is not loopback.
    settings.SCAIECHO_METRICS_ALLOWED_ADDRESSES = ["127.0.0.1"]
    assert_refused(client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR=OUTSIDER))
    # A trusted proxy: the address it forwards is the one that counts.
    settings.SCAIECHO_TRUSTED_PROXIES = ["127.0.0.1"]
    settings.SCAIECHO_METRICS_ALLOWED_ADDRESSES = ["10.20.0.0/16"]
    assert scrape(client, REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="10.20.9.9")
    assert_refused(client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR=OUTSIDER))


def test_only_get(client):
    response = client.post("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_http_requests_are_counted_by_route_pattern_not_by_path(client):
    before = scrape(client)
    job_route = "/v1/modules/scaiecho/transcribe/jobs/<str:job_id>"
    for _ in range(3):
        assert client.get(f"/v1/modules/scaiecho/transcribe/jobs/{uuid.uuid4()}").status_code == 401
    assert client.get("/no/such/page").status_code == 404
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("scaiecho_http_requests_total", route=job_route, method="GET", status="401") == 3
    assert grew("scaiecho_http_request_duration_seconds_count", route=job_route, method="GET", status="401") == 3
    assert grew("scaiecho_http_requests_total", route="<unmatched>", method="GET", status="404") == 1
    assert not any("jobs/" in dict(labels).get("route", "") and "<" not in dict(labels)["route"] for _, labels in after)


def test_state_of_jobs_queue_workers_streams_and_usage(client):
    tenant = TenantFactory()
    now = timezone.now()
    base = {"tenant": tenant, "audio_sha256": "0" * 64, "audio_bytes": 1000, "audio_ext": "wav"}
    for _ in range(2):
        TranscriptionJob.objects.create(**base, status="queued")
    TranscriptionJob.objects.create(**base, status="running", backend_used="A")
    TranscriptionJob.objects.create(**base, status="completed", backend_used="B", completed_at=now)
    SpeechWorker.objects.create(worker_id="batch@host#1", kind="batch", last_seen_at=now, expires_at=now + timedelta(seconds=30))
    SpeechWorker.objects.create(worker_id="gone@host#2", kind="batch", last_seen_at=now, expires_at=now - timedelta(seconds=1))
    # One webhook event waiting for ten minutes, one delivered.
    finished = TranscriptionJob.objects.create(**base, status="failed", completed_at=now)
    for status in ("pending", "delivered"):
        WebhookDelivery.objects.create(tenant=tenant, job=finished, event_type="transcription.failed", url="https://x.example/h", body="{}", status=status)
    WebhookDelivery.objects.filter(status="pending").update(created_at=now - timedelta(minutes=10))
    UsageRecord.objects.create(tenant=tenant, backend="B", kind="batch", audio_duration_ms=90_500, cost=0)
    UsageRecord.objects.create(tenant=tenant, backend="A", kind="stream", audio_duration_ms=4_000, cost=0)
    slots = stream_slots_acquire(key_id="k1", tenant_id=str(tenant.pk), session_id="str_live", backend="A")

    seen = scrape(client)
    assert value(seen, "scaiecho_jobs", state="queued", backend="none") == 2
    assert value(seen, "scaiecho_jobs", state="running", backend="A") == 1
    assert value(seen, "scaiecho_jobs", state="completed", backend="B") == 1
    assert value(seen, "scaiecho_jobs", state="failed", backend="A") == 0
    assert value(seen, "scaiecho_queue_depth", kind="job") == 2
    assert value(seen, "scaiecho_workers_alive", kind="batch") == 1
    heartbeat = value(seen, "scaiecho_worker_last_heartbeat_timestamp_seconds", worker="batch@host#1", kind="batch")
    assert abs(heartbeat - now.timestamp()) < 1
    assert ("scaiecho_worker_last_heartbeat_timestamp_seconds", (("kind", "batch"), ("worker", "gone@host#2"))) not in seen
    assert value(seen, "scaiecho_workers_alive", kind="webhook") == 0  # none announced: deliveries would wait
    assert value(seen, "scaiecho_webhook_deliveries_pending") == 1
    assert 600 <= value(seen, "scaiecho_webhook_oldest_pending_seconds") < 660
    assert value(seen, "scaiecho_stream_sessions_live", backend="A") == 1
    assert value(seen, "scaiecho_transcriptions_total", kind="batch", backend="B") == 1
    assert value(seen, "scaiecho_audio_processed_seconds_total", kind="batch", backend="B") == 90.5
    assert value(seen, "scaiecho_audio_processed_seconds_total", kind="stream", backend="A") == 4.0

    stream_slots_release(slots=slots, session_id="str_live")
    assert value(scrape(client), "scaiecho_stream_sessions_live", backend="A") == 0


# --- End to end: a real job and a real stream ------------------------------------------------------


async def stream_once(url: str, wav: bytes, scrape_while_open: Any) -> tuple[list[dict], dict]:
    """Open a stream, scrape while it is live, send the audio, close, and collect the frames."""
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "open", "media_type": "audio/wav", "backend_preference": "prefer_relay", "chunk_seconds": 2}))
        ready = json.loads(await ws.recv())
        live = await asyncio.to_thread(scrape_while_open)
        for offset in range(0, len(wav), 32000):
            await ws.send(wav[offset : offset + 32000])
        await ws.send(json.dumps({"type": "close"}))
        frames = [ready] + [json.loads(message) async for message in ws]
    return frames, live


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_job_and_a_stream_that_just_ran_show_in_metrics(speech_worker, daphne_server, relay):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="AB", default_backend="A")
    metrics_url = f"{daphne_server.url}/metrics"

    def scrape_live() -> dict:
        response = httpx.get(metrics_url, timeout=30)
        assert response.status_code == 200, response.text
        return samples(response.text)

    before = scrape_live()
    wav = synth_speech("The quarterly report is ready for review.")
    response = httpx.post(
        f"{daphne_server.url}/v1/modules/scaiecho/transcribe",
        headers=key.headers,
        files={"file": ("speech.wav", wav, "audio/wav")},
        data={"language_hint": "en"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"]["backend_used"] == "A"

    ws_url = daphne_server.url.replace("http://", "ws://") + f"/v1/modules/scaiecho/stream/transcribe?token={key.secret}"
    frames, live = asyncio.run(stream_once(ws_url, wav, scrape_live))
    assert frames[0]["type"] == "ready"
    assert frames[0]["backend_used"] == "B"
    assert frames[-1]["type"] == "closed"
    after = scrape_live()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The job: in the database's state, metered, and timed by the worker process (multiprocess).
    assert value(after, "scaiecho_jobs", state="completed", backend="A") == 1
    assert value(after, "scaiecho_transcriptions_total", kind="batch", backend="A") == 1
    audio_s = value(after, "scaiecho_audio_processed_seconds_total", kind="batch", backend="A")
    assert audio_s == pytest.approx(TranscriptionJob.objects.get().audio_duration_ms / 1000)
    assert grew("scaiecho_inference_real_time_factor_count", kind="batch", backend="A") >= 1
    assert grew("scaiecho_http_requests_total", route="/v1/modules/scaiecho/transcribe", method="POST", status="200") == 1
    assert value(after, "scaiecho_workers_alive", kind="batch") >= 1
    # The stream: live while it ran, then ended, metered and counted by the web process.
    assert value(live, "scaiecho_stream_sessions_live", backend="B") == 1
    assert value(after, "scaiecho_stream_sessions_live", backend="B") == 0
    assert grew("scaiecho_stream_sessions_total", backend="B", outcome="closed") == 1
    assert value(after, "scaiecho_transcriptions_total", kind="stream", backend="B") == 1
    stream_s = value(after, "scaiecho_audio_processed_seconds_total", kind="stream", backend="B")
    assert stream_s == pytest.approx(frames[-1]["audio_duration_ms"] / 1000)
