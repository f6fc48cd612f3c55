"""Webhooks of finished jobs (contract section 8), delivered to a real HTTP receiver on 127.0.0.1.

The receiver answers as each test scripts it (a status code, or hanging past the delivery
timeout); signatures are checked with the Standard Webhooks reference library, not with our own
code. The end-to-end tests run the session's Celery workers (a speech worker and, as scripts/run
starts it, a webhook worker on the webhook queue), whose environment (tests/workers.py) allows
private destinations and keeps the backoff short: 1 s per attempt, 0.2 s then 0.4 s
between attempts, 3 attempts. The others call what the delivery task calls, in this process.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone
from prometheus_client import REGISTRY
from standardwebhooks import Webhook, WebhookVerificationError

from tenants.models import AuditEvent, Role, TenantPolicy
from tenants.webhooks import destination_check, pinned_target
from tests.drip_server import dripping_server
from tests.factories import KeyFactory
from tests.relay_server import DEFAULT_VERBOSE_JSON, RelayServer
from tests.tenants.test_admin_scope import staff_user
from tests.tenants.test_auth import assert_error
from tests.transcription.test_batch_api import TRANSCRIBE_URL, job_url, key_with_policy, upload
from tests.voices import synth_speech
from tests.workers import RELAY_KEY
from transcription.failures import JobQueuedTooLong
from transcription.models import SpeechWorker, TranscriptionJob, WebhookDelivery
from transcription.services import job_fail, jobs_sweep
from transcription.webhooks import busy_wait, delivery_attempt, delivery_create, post_signed

SECRET_URL = "/v1/modules/scaiecho/webhook-secret"
POLICY_URL = "/v1/modules/scaiecho/tenant-policy"


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """A webhook consumer's HTTP server. Each request takes the next entry of ``script`` (a status
    code, or ``"hang"``: answer 200 only after ``hang_s``, past the sender's timeout); once the
    script is used up it answers 200."""

    def __init__(self) -> None:
        self.script: list[int | str] = []
        self.hang_s = 3.0
        self.received: list[Received] = []
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._changed:
                    receiver.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                    action = receiver.script.pop(0) if receiver.script else 200
                    receiver._changed.notify_all()
                if action == "hang":
                    receiver._stopping.wait(receiver.hang_s)
                    action = 200
                try:
                    self.send_response(int(action))
                    self.send_header("content-type", "text/plain")
                    self.end_headers()
                    self.wfile.write(f"answered {action}".encode())
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/scaiecho"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, *, timeout: float = 60) -> list[Received]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.received) >= count, timeout=timeout)
            assert len(self.received) >= count, f"{len(self.received)} of {count} webhook calls arrived"
            return list(self.received)

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver(settings: Any) -> Iterator[WebhookReceiver]:
    settings.SCAIECHO_WEBHOOK_ALLOW_PRIVATE = True  # the web side accepts 127.0.0.1, as the worker does
    server = WebhookReceiver()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def relay_static(relay: RelayServer, settings: Any) -> Iterator[RelayServer]:
    settings.SCAIECHO_RELAY_BASE_URL = relay.base_url
    settings.SCAIECHO_RELAY_API_KEY = RELAY_KEY
    yield relay
    relay.mode = "static"
    relay.static_body = DEFAULT_VERBOSE_JSON


@pytest.fixture(scope="module")
def short_wav() -> bytes:
    return synth_speech("Call me back when you are done.")


def new_secret(api: Any, key: Any) -> str:
    response = api.post(SECRET_URL, headers=key.headers)
    assert response.status_code == 200, response.content
    secret = response.json()["data"]["secret"]
    assert secret.startswith("whsec_")
    return secret


def wait_delivery(job_id: str, *, status: str, timeout: float = 20) -> WebhookDelivery:
    """The job's delivery once it has reached ``status`` (the worker records an attempt just after
    the receiver has answered it)."""
    deadline = time.monotonic() + timeout
    while True:
        delivery = WebhookDelivery.objects.filter(job_id=job_id).first()
        if delivery is not None and delivery.status == status:
            return delivery
        assert time.monotonic() < deadline, f"delivery of job {job_id}: {delivery and delivery.status}, not {status}"
        time.sleep(0.1)


def finished_job(key: Any, *, webhook_url: str) -> TranscriptionJob:
    """A queued job of ``key``'s, failed through the service every failure goes through: its
    webhook event is written with the failure and its delivery sent once that commits."""
    job = TranscriptionJob.objects.create(
        tenant=key.tenant, user=key.membership.user, audio_sha256="0" * 64, audio_bytes=10, audio_ext="wav", webhook_url=webhook_url
    )
    with transaction.atomic():
        job_fail(job=job, error=JobQueuedTooLong())
    return job


def pending_delivery(key: Any, *, webhook_url: str) -> WebhookDelivery:
    """The webhook event of a failed job of ``key``'s, with no task sent for it (the session's
    webhook worker, when running, must not take it)."""
    job = TranscriptionJob.objects.create(
        tenant=key.tenant, user=key.membership.user, audio_sha256="0" * 64, audio_bytes=10, audio_ext="wav",
        webhook_url=webhook_url, status=TranscriptionJob.Status.FAILED, status_reason="queued too long",
    )  # fmt: skip
    delivery = delivery_create(job=job)
    assert delivery is not None
    return delivery


# --- End to end: a worker finishes the job and delivers its webhook ------------------------------


@pytest.mark.slow
def test_a_completed_job_posts_its_signed_result_to_the_webhook_url(api, speech_worker, webhook_worker, relay_static, receiver, short_wav):
    # Given a tenant with a signing secret whose jobs go to the relay (which answers a canned result)
    key = key_with_policy("B", "B")
    secret = new_secret(api, key)
    # When an async job names a webhook URL and the worker finishes it
    response = api.post(
        TRANSCRIBE_URL,
        {"file": upload("speech.wav", short_wav), "force_async": "true", "webhook_url": receiver.url},
        format="multipart",
        headers=key.headers,
    )
    assert response.status_code == 202, response.content
    job_id = response.json()["data"]["job_id"]
    call = receiver.wait_for(1)[0]
    # Then one POST arrives, signed per Standard Webhooks, with the job exactly as polling shows it
    payload = Webhook(secret).verify(call.body, call.headers)
    assert payload["type"] == "transcription.completed"
    assert payload["data"] == api.get(job_url(job_id), headers=key.headers).json()["data"]
    assert payload["data"]["transcript"] == DEFAULT_VERBOSE_JSON["text"]
    assert call.headers["webhook-id"].startswith("msg_")
    assert abs(int(call.headers["webhook-timestamp"]) - time.time()) < 60
    assert call.headers["content-type"] == "application/json"
    delivery = wait_delivery(job_id, status="delivered")
    assert [(row.number, row.status_code) for row in delivery.attempt_rows.all()] == [(1, 200)]


@pytest.mark.slow
def test_a_failed_inline_job_posts_to_the_tenants_default_webhook(api, speech_worker, webhook_worker, relay_static, receiver, short_wav):
    # Given a tenant whose policy names a default webhook URL, and a relay that answers nonsense
    key = key_with_policy("B", "B")
    secret = new_secret(api, key)
    patched = api.patch(POLICY_URL, {"webhook_url": receiver.url}, format="json", headers=key.headers)
    assert patched.status_code == 200, patched.content
    assert patched.json()["data"]["webhook_url"] == receiver.url
    relay_static.mode = "badshape"
    # When an inline request that names no webhook URL fails on the worker
    response = api.post(TRANSCRIBE_URL, {"file": upload("speech.wav", short_wav)}, format="multipart", headers=key.headers)
    assert_error(response, 502, "UPSTREAM_SHAPE_MISMATCH")
    job_id = str(TranscriptionJob.objects.get(tenant=key.tenant).pk)
    call = receiver.wait_for(1)[0]
    # Then the failure is posted to the tenant's default, with the reason polling shows
    payload = Webhook(secret).verify(call.body, call.headers)
    assert payload["type"] == "transcription.failed"
    polled = api.get(job_url(job_id), headers=key.headers).json()["data"]
    assert payload["data"] == polled
    assert polled["status"] == "failed"
    assert polled["status_reason"]


@pytest.mark.slow
def test_timeouts_and_5xx_are_retried_with_backoff_under_one_webhook_id(api, webhook_worker, receiver):
    # Given a receiver that first fails (500), then hangs past the 1 s timeout, then answers 200
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    secret = new_secret(api, key)
    receiver.script = [500, "hang"]
    # When a job with its URL fails
    job = finished_job(key, webhook_url=receiver.url)
    calls = receiver.wait_for(3)
    delivery = wait_delivery(job.pk, status="delivered")
    # Then three attempts carry the same webhook-id and body, each freshly signed and verifiable
    assert len({call.headers["webhook-id"] for call in calls}) == 1
    assert len({call.body for call in calls}) == 1
    for call in calls:
        assert Webhook(secret).verify(call.body, call.headers)["type"] == "transcription.failed"
    # And the attempts are on record: what each got, and the backoff between them doubling
    attempts = list(delivery.attempt_rows.all())
    assert [row.status_code for row in attempts] == [500, None, 200]
    assert "timed out" in attempts[1].error
    waits = [(row.next_retry_at - row.started_at).total_seconds() for row in attempts[:2]]
    assert waits[0] < waits[1]
    assert attempts[2].next_retry_at is None
    assert delivery.attempts == 3


@pytest.mark.slow
def test_a_4xx_is_not_retried_and_5xx_stops_after_the_last_attempt(api, webhook_worker, receiver):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    new_secret(api, key)
    # A 400: the receiver refused the event; it is not sent again
    receiver.script = [400]
    refused = finished_job(key, webhook_url=receiver.url)
    delivery = wait_delivery(refused.pk, status="failed")
    assert [row.status_code for row in delivery.attempt_rows.all()] == [400]
    # A receiver that keeps failing gets SCAIECHO_WEBHOOK_MAX_ATTEMPTS (3 for the test worker) tries
    receiver.script = [503, 503, 503, 503]
    broken = finished_job(key, webhook_url=receiver.url)
    delivery = wait_delivery(broken.pk, status="failed")
    assert [row.status_code for row in delivery.attempt_rows.all()] == [503, 503, 503]
    time.sleep(1.0)  # longer than the next backoff would be: nothing more comes
    assert len(receiver.received) == 1 + 3


@pytest.mark.slow
def test_a_receiver_that_hangs_holds_the_webhook_worker_not_the_speech_worker(api, speech_worker, webhook_worker, receiver):
    # Given a receiver that hangs past the timeout on every attempt
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    new_secret(api, key)
    receiver.script = ["hang", "hang", "hang"]
    # When a job with its URL ends, and its three attempts time out
    job = finished_job(key, webhook_url=receiver.url)
    delivery = wait_delivery(job.pk, status="failed")
    assert [row.status_code for row in delivery.attempt_rows.all()] == [None, None, None]
    # Then the webhook worker made them, on its own queue; the speech worker never took one
    received = re.compile(rb"Task transcription\.deliver_webhook\[[-0-9a-f]+\] received")
    assert len(received.findall(webhook_worker.log_path.read_bytes())) >= 3
    assert not received.search(speech_worker.log_path.read_bytes())
    # And the webhook worker is announced as one (operators see it), not as a Backend A worker
    kinds = dict(SpeechWorker.objects.filter(worker_id__in=[speech_worker.node, webhook_worker.node]).values_list("worker_id", "kind"))
    assert kinds == {speech_worker.node: "batch", webhook_worker.node: "webhook"}


# --- The signing secret ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_rotating_the_secret_signs_with_the_new_one_only(api, receiver):
    # Given a tenant admin who created a secret and then rotated it
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    old = new_secret(api, key)
    new = new_secret(api, key)
    assert new != old
    # The secret is answered once: kept encrypted, in no later answer, in no audit row
    policy = TenantPolicy.objects.get(tenant=key.tenant)
    assert new.encode() not in bytes(policy.webhook_secret_encrypted)
    assert new not in api.get(POLICY_URL, headers=key.headers).content.decode()
    assert api.get(SECRET_URL, headers=key.headers).status_code == 405
    actions = list(AuditEvent.objects.filter(tenant_id=key.tenant.pk, resource_type="webhook_secret").values_list("action", "details"))
    assert sorted(actions) == [("webhook_secret.create", {}), ("webhook_secret.rotate", {})]
    # When a job's webhook goes out (the delivery task's attempt, run here)
    job = finished_job(key, webhook_url=receiver.url)
    delivery = WebhookDelivery.objects.get(job=job)
    assert delivery_attempt(delivery_id=delivery.pk).status == "delivered"
    call = receiver.wait_for(1)[0]
    # Then the new secret verifies it and the old one does not
    assert Webhook(new).verify(call.body, call.headers)["data"]["job_id"] == str(job.pk)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(call.body, call.headers)


@pytest.mark.django_db
def test_only_tenant_admins_make_secrets(api):
    viewer = KeyFactory.issue(role=Role.TENANT_VIEWER)
    assert_error(api.post(SECRET_URL, headers=viewer.headers), 403, "AUTHZ_PERMISSION_DENIED")
    assert not TenantPolicy.objects.filter(tenant=viewer.tenant, webhook_secret_encrypted__isnull=False).exists()


# --- Destinations ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8000/hook", "non-public"),
        ("http://localhost/hook", "non-public"),
        ("http://[::1]/hook", "non-public"),
        ("http://10.1.2.3/hook", "non-public"),
        ("http://192.168.0.7/hook", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://0.0.0.0/hook", "non-public"),
        ("http://[::ffff:127.0.0.1]/hook", "non-public"),
        ("ftp://hooks.example.com/x", "http or https"),
        ("https://user:pw@hooks.example.com/x", "Credentials"),
        ("not a url", "http or https"),
    ],
)
def test_private_and_malformed_destinations_are_refused_when_given(api, settings, url, reason):
    # Given the default: private destinations not allowed, and a tenant with a signing secret
    settings.SCAIECHO_WEBHOOK_ALLOW_PRIVATE = False
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    new_secret(api, key)
    # When a job or the tenant policy names such a URL, Then 422 names the field, and nothing is stored
    response = api.post(
        TRANSCRIBE_URL, {"file": upload("a.wav", b"RIFF"), "webhook_url": url}, format="multipart", headers=key.headers
    )
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["field"] == "webhook_url"
    assert reason in body["error"]["details"][0]["message"]
    assert not TranscriptionJob.objects.filter(tenant=key.tenant).exists()
    patched = api.patch(POLICY_URL, {"webhook_url": url}, format="json", headers=key.headers)
    assert_error(patched, 422, "VALIDATION_ERROR")
    assert TenantPolicy.objects.get(tenant=key.tenant).webhook_url == ""


@pytest.mark.django_db
def test_a_webhook_url_needs_a_secret_and_a_bounded_length(api, receiver, settings):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    body = assert_error(api.patch(POLICY_URL, {"webhook_url": receiver.url}, format="json", headers=key.headers), 422, "VALIDATION_ERROR")
    assert "webhook-secret" in body["error"]["message"]
    new_secret(api, key)
    settings.SCAIECHO_WEBHOOK_MAX_URL_LENGTH = 40
    assert_error(api.patch(POLICY_URL, {"webhook_url": receiver.url + "/" + "x" * 40}, format="json", headers=key.headers), 422, "VALIDATION_ERROR")
    assert api.patch(POLICY_URL, {"webhook_url": receiver.url}, format="json", headers=key.headers).status_code == 200
    # null removes the default
    assert api.patch(POLICY_URL, {"webhook_url": None}, format="json", headers=key.headers).json()["data"]["webhook_url"] is None


@pytest.mark.django_db
def test_a_destination_that_turned_private_is_refused_at_delivery(api, receiver, settings):
    # Given a job whose URL was accepted, but which private-address rules now refuse
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    new_secret(api, key)
    job = finished_job(key, webhook_url=receiver.url)
    settings.SCAIECHO_WEBHOOK_ALLOW_PRIVATE = False
    # When the delivery is attempted, Then nothing is sent and the refusal is on record, final
    delivery = WebhookDelivery.objects.get(job=job)
    failed_before = REGISTRY.get_sample_value("scaiecho_webhook_deliveries_total", {"outcome": "failed"}) or 0.0
    outcome = delivery_attempt(delivery_id=delivery.pk)
    assert (outcome.status, outcome.retry_in) == ("failed", None)
    assert receiver.received == []
    # Operators see it on /metrics.
    assert REGISTRY.get_sample_value("scaiecho_webhook_deliveries_total", {"outcome": "failed"}) == failed_before + 1
    attempt = delivery.attempt_rows.get()
    assert attempt.status_code is None
    assert "destination refused" in attempt.error


@pytest.mark.django_db(transaction=True)
def test_a_tenant_whose_receiver_hangs_holds_only_its_share_of_webhook_threads(api, receiver, settings):
    # Given two tenants, and a bound of 2 attempts in flight per tenant
    settings.SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT = 2
    settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS = 6.0
    hostile, other = KeyFactory.issue(role=Role.TENANT_ADMIN), KeyFactory.issue(role=Role.TENANT_ADMIN)
    new_secret(api, hostile)
    new_secret(api, other)
    receiver.script = ["hang", "hang"]  # answered after hang_s, within the timeout
    receiver.hang_s = 3.0
    hanging = [pending_delivery(hostile, webhook_url=receiver.url) for _ in range(3)]

    def attempt(delivery_id: Any) -> None:
        try:
            delivery_attempt(delivery_id=delivery_id)
        finally:
            connection.close()

    # When two of the first tenant's attempts are waiting on its receiver (two webhook threads)
    threads = [threading.Thread(target=attempt, args=(d.pk,)) for d in hanging[:2]]
    for thread in threads:
        thread.start()
    receiver.wait_for(2)
    # Then its third waits its turn: nothing sent, no attempt used, back after a short wait
    outcome = delivery_attempt(delivery_id=hanging[2].pk)
    assert (outcome.status, outcome.retry_in) == ("pending", busy_wait())
    assert len(receiver.received) == 2
    hanging[2].refresh_from_db()
    assert (hanging[2].attempts, hanging[2].attempt_rows.count()) == (0, 0)
    # And another tenant's delivery goes out at once
    theirs = pending_delivery(other, webhook_url=receiver.url)
    assert delivery_attempt(delivery_id=theirs.pk).status == "delivered"
    for thread in threads:
        thread.join(timeout=10)
    # Once the first tenant's two attempts are answered, its third goes out
    assert delivery_attempt(delivery_id=hanging[2].pk).status == "delivered"
    assert [d.attempts for d in WebhookDelivery.objects.filter(tenant=hostile.tenant)] == [1, 1, 1]
    assert not WebhookDelivery.objects.filter(in_flight_until__isnull=False).exists()


@pytest.mark.django_db
def test_an_event_whose_task_was_lost_is_sent_again_by_the_sweep(api, receiver, django_capture_on_commit_callbacks):
    # Given a pending event whose first attempt was due 20 minutes ago (its task never came)
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    new_secret(api, key)
    delivery = WebhookDelivery.objects.get(job=finished_job(key, webhook_url=receiver.url))
    WebhookDelivery.objects.filter(pk=delivery.pk).update(created_at=timezone.now() - timedelta(minutes=20))
    # When the workers' sweep runs, Then its task is sent again, once
    with django_capture_on_commit_callbacks() as sent:
        assert jobs_sweep()["webhooks_resent"] == 1
    assert len(sent) == 1
    assert jobs_sweep()["webhooks_resent"] == 0


# --- The admin ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_shows_each_attempt_to_the_tenants_staff_only(api, client, receiver):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    new_secret(api, key)
    receiver.script = [502]
    job = finished_job(key, webhook_url=receiver.url)
    delivery = WebhookDelivery.objects.get(job=job)
    assert delivery_attempt(delivery_id=delivery.pk).retry_in is not None
    page_url = f"/admin/transcription/webhookdelivery/{delivery.pk}/change/"
    client.force_login(staff_user("their-staff", tenants=[key.tenant]))
    page = client.get(page_url)
    assert page.status_code == 200
    html = page.content.decode()
    assert delivery.message_id in html
    assert "answered 502" in html
    client.force_login(staff_user("other-staff", tenants=[KeyFactory.issue().tenant]))
    assert client.get(page_url).status_code == 404
    assert delivery.message_id not in client.get("/admin/transcription/webhookdelivery/").content.decode()


# --- DNS rebinding: a delivery calls the addresses its check found -----------------------------


def test_a_delivery_connects_to_the_checked_addresses_without_resolving_the_host_again(receiver, settings):
    # Given a destination host that no resolver knows (.invalid, RFC 2606), checked earlier to be at
    # two addresses: the first refuses connections, the second is the receiver
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"http://hooks.scaiecho.invalid:{port}/hooks/scaiecho"
    secret = "whsec_" + "A" * 43 + "="
    # When the delivery is posted to the checked addresses
    answer, retryable = post_signed(
        url=url, addresses=("127.0.0.2", "127.0.0.1"), message_id="msg_1", body=b'{"a": 1}', secret=secret
    )
    # Then it reached the receiver, by the second address, under the URL's own host and path
    assert (answer.status_code, answer.error, retryable) == (200, "", False)
    [received] = receiver.received
    assert received.headers["host"] == f"hooks.scaiecho.invalid:{port}"
    assert received.headers["webhook-id"] == "msg_1"
    assert received.body == b'{"a": 1}'
    # And without the checked addresses the same URL cannot be called at all: the name does not resolve
    unpinned, retryable = post_signed(url=url, addresses=(), message_id="msg_2", body=b"{}", secret=secret)
    assert unpinned.status_code is None
    assert "connection failed" in unpinned.error
    assert len(receiver.received) == 1


@pytest.mark.parametrize("stalls", ["status line", "headers", "body"])
def test_a_receiver_that_answers_a_byte_at_a_time_is_cut_off_at_the_attempts_timeout(settings, stalls):
    """Each read of a slow answer stays within httpx's per-read timeout; the attempt as a whole must
    still end at SCAIECHO_WEBHOOK_TIMEOUT_SECONDS (a webhook thread has no other limit)."""
    settings.SCAIECHO_WEBHOOK_TIMEOUT_SECONDS = 1.0
    start = {"status line": b"", "headers": b"HTTP/1.1 200 OK\r\n", "body": b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n"}[stalls]
    with dripping_server(start, b"x" if stalls == "body" else b"X-Slow: 1\r\n"[:1]) as port:
        started = time.monotonic()
        answer, retryable = post_signed(
            url=f"http://127.0.0.1:{port}/hook", addresses=(), message_id="msg_1", body=b"{}",
            secret="whsec_" + "A" * 43 + "=",
        )  # fmt: skip
        took = time.monotonic() - started
    assert took < 2.0, took
    if stalls == "body":
        assert answer.status_code == 200  # what came in time is kept
    else:
        assert (answer.status_code, retryable) == (None, True)
        assert "timed out" in answer.error


def test_the_check_keeps_the_public_addresses_it_found_and_https_keeps_its_host_name(settings):
    settings.SCAIECHO_WEBHOOK_ALLOW_PRIVATE = False
    checked = destination_check("https://93.184.216.34:8443/hook?x=1")
    assert (checked.problem, checked.addresses) == (None, ("93.184.216.34",))
    assert destination_check("http://127.0.0.1/hook").addresses == ()
    target, host, extensions = pinned_target("https://hooks.example.com:8443/a/b?x=1", "2606:2800:220:1::1")
    assert target == "https://[2606:2800:220:1::1]:8443/a/b?x=1"
    assert host == {"host": "hooks.example.com:8443"}
    assert extensions == {"sni_hostname": "hooks.example.com"}  # TLS names and verifies the URL's host
    assert pinned_target("http://hooks.example.com/a", "93.184.216.34") == (
        "http://93.184.216.34/a", {"host": "hooks.example.com"}, {}
    )
