"""Guessing keys as an attacker would: failed authentication is limited per client address, over
HTTP and WebSockets alike, and a blocked address is refused before any key is looked up."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from streaming.middleware import TokenScopeMiddleware
from streaming.routing import websocket_urlpatterns
from tenants.models import ApiKey, AuditEvent, Role
from tenants.ratelimit import auth_failure_record, auth_failures_retry_after
from tests.factories import KeyFactory
from tests.streaming.test_consumer import run

POLICY = "/v1/modules/scaiecho/tenant-policy"
STREAM = "/v1/modules/scaiecho/stream/transcribe"
WRONG = "sgk_" + "w" * 40
ATTACKER = "203.0.113.7"


@pytest.fixture(autouse=True)
def _small_limit(settings: Any) -> None:
    settings.SCAIECHO_AUTH_FAILURES_PER_ADDRESS = 3
    settings.SCAIECHO_AUTH_FAILURE_WINDOW_SECONDS = 60
    settings.SCAIECHO_TRUSTED_PROXIES = []


def get(client: Any, token: str, address: str = ATTACKER, **extra: str) -> Any:
    return client.get(POLICY, HTTP_AUTHORIZATION=f"Bearer {token}", REMOTE_ADDR=address, **extra)


def as_peer(address: str) -> Any:
    """The WebSocket application as daphne runs it, for a client at ``address``."""
    app = TokenScopeMiddleware(URLRouter(websocket_urlpatterns))

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return await app({**scope, "client": (address, 50000)}, receive, send)

    return application


async def ws_close(address: str, token: str) -> tuple[list[dict[str, Any]], int]:
    ws = WebsocketCommunicator(as_peer(address), f"{STREAM}?token={token}")
    connected, _ = await ws.connect()
    assert connected  # accepted first: the client is told why
    frames: list[dict[str, Any]] = []
    while True:
        output = await ws.receive_output(timeout=30)
        if output["type"] == "websocket.close":
            await ws.wait()
            return frames, output["code"]
        frames.append(json.loads(output["text"]))


@pytest.mark.django_db
def test_after_n_failures_even_the_right_key_gets_429_and_is_not_looked_up(client):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    for _ in range(3):
        response = get(client, WRONG)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "AUTH_TOKEN_INVALID"
    audit_rows = AuditEvent.objects.count()

    response = get(client, key.secret)

    assert response.status_code == 429
    body = response.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "RATE_LIMITED"
    assert "failed authentication" in body["error"]["message"]
    assert body["error"]["retry_after"] >= 1
    assert response["Retry-After"] == str(body["error"]["retry_after"])
    assert body["meta"]["request_id"].startswith("req_")
    # Nothing was consumed: the key was never read (no last use), nothing audited, no request
    # counted against the key's own rate limit.
    assert ApiKey.objects.get(pk=key.key.pk).last_used_at is None
    assert AuditEvent.objects.count() == audit_rows
    assert "X-Scaigrid-Ratelimit-Remaining" not in response


@pytest.mark.django_db
def test_other_addresses_and_blocked_guesses_are_unaffected(client):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    for _ in range(3):
        assert get(client, WRONG).status_code == 401
    # Refused attempts are not counted as more failures: the wait does not grow while blocked.
    first = get(client, WRONG).json()["error"]["retry_after"]
    for _ in range(5):
        assert get(client, WRONG).status_code == 429
    assert get(client, WRONG).json()["error"]["retry_after"] <= first
    # Someone else, with the right key, is served.
    response = get(client, key.secret, address="198.51.100.20")
    assert response.status_code == 200
    assert response.json()["data"]["tenant_id"] == str(key.tenant.pk)
    # A request without any key is not a guess.
    assert client.get(POLICY, REMOTE_ADDR="198.51.100.21").status_code == 401


@pytest.mark.django_db
def test_malformed_authorization_counts_as_a_failure(client):
    for _ in range(3):
        response = client.get(POLICY, HTTP_AUTHORIZATION="Basic dXNlcjpwYXNz", REMOTE_ADDR=ATTACKER)
        assert response.status_code == 401
    assert get(client, WRONG).status_code == 429


def test_retry_after_is_when_the_address_may_try_again(settings):
    settings.SCAIECHO_AUTH_FAILURES_PER_ADDRESS = 3
    t0 = 1_000_000 * 60 + 10.0  # 10 s into a window
    for _ in range(3):
        auth_failure_record(address="192.0.2.1", now=t0)
    wait = auth_failures_retry_after(address="192.0.2.1", now=t0)
    assert wait is not None
    assert 1 <= wait <= 2 * 60
    assert auth_failures_retry_after(address="192.0.2.1", now=t0 + wait - 1) is not None
    assert auth_failures_retry_after(address="192.0.2.1", now=t0 + wait) is None
    assert auth_failures_retry_after(address="192.0.2.2", now=t0) is None


def test_limit_zero_turns_it_off(settings):
    settings.SCAIECHO_AUTH_FAILURES_PER_ADDRESS = 0
    for _ in range(10):
        auth_failure_record(address="192.0.2.3")
    assert auth_failures_retry_after(address="192.0.2.3") is None


@pytest.mark.django_db
def test_spoofed_x_forwarded_for_is_ignored_without_trusted_proxies(client):
    # Each guess claims another address; they all count against the real peer.
    for index in range(3):
        assert get(client, WRONG, HTTP_X_FORWARDED_FOR=f"192.0.2.{index}").status_code == 401
    assert get(client, WRONG, HTTP_X_FORWARDED_FOR="192.0.2.99").status_code == 429


@pytest.mark.django_db
def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(client, settings):
    settings.SCAIECHO_TRUSTED_PROXIES = ["10.0.0.0/8"]
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    proxy = "10.1.2.3"
    for _ in range(3):
        # The attacker prepends a fake hop; the proxy appends the real client address.
        assert get(client, WRONG, address=proxy, HTTP_X_FORWARDED_FOR=f"1.1.1.1, {ATTACKER}").status_code == 401
    assert get(client, key.secret, address=proxy, HTTP_X_FORWARDED_FOR=ATTACKER).status_code == 429
    # Another client behind the same proxy is not blocked with the attacker.
    assert get(client, key.secret, address=proxy, HTTP_X_FORWARDED_FOR="198.51.100.5").status_code == 200
    # X-Forwarded-For from an address that is not a trusted proxy is still ignored.
    assert get(client, key.secret, address="198.51.100.6", HTTP_X_FORWARDED_FOR=ATTACKER).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_websocket_guesses_close_4401_then_4429_before_the_key_is_read(client):
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)

    async def scenario() -> list[tuple[list[dict[str, Any]], int]]:
        results = [await ws_close(ATTACKER, WRONG) for _ in range(3)]
        results.append(await ws_close(ATTACKER, key.secret))
        return results

    results = run(scenario())
    for frames, code in results[:3]:
        assert code == 4401
        assert frames[-1]["code"] == "AUTH_TOKEN_INVALID"
    frames, code = results[3]
    assert code == 4429
    assert frames == [
        {
            "type": "error",
            "code": "RATE_LIMITED",
            "message": frames[0]["message"],
            "retry_after": frames[0]["retry_after"],
        }
    ]
    assert frames[0]["retry_after"] >= 1
    assert ApiKey.objects.get(pk=key.key.pk).last_used_at is None
    assert not AuditEvent.objects.filter(action="stream.open").exists()
    # The same address is blocked over HTTP too: one budget of guesses per address.
    assert get(client, key.secret).status_code == 429


@pytest.mark.django_db(transaction=True)
def test_an_expired_caption_token_is_a_failed_attempt_too():
    async def scenario() -> list[int]:
        return [(await ws_close(ATTACKER, "sct_not-a-real-token"))[1] for _ in range(4)]

    assert run(scenario()) == [4401, 4401, 4401, 4429]
