"""Secure by default, as an operator and an attacker see it: production refuses DEBUG, speaks
https only (health probes excepted), believes proxy headers only from proxies it was told about;
development has no published secret and no wildcard host; /readyz tells no internals; the caption
page's key is traded for a capped, short-lived token over POST."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from streaming.tokens import caption_token_issue, caption_token_key
from tenants.models import AuditEvent, Role
from tests.factories import KeyFactory
from tests.tenants.test_startup import ROOT, clean_env, production_env, run_check

BIOMETRIC_KEY = "Jd4vC1a0m2U8mHq3n1ZrQ6b8dYQ2o4yqkV8Jq9vJ3Zs="
WEBHOOK_KEY = "cQw3n2mK9vT1xZ8pL4sR7uY0bN6hJ5gF2dA1eC3iW8o="
OLD_PUBLIC_KEY = "django-insecure-scaiecho-development-only"

# Run in a fresh process with the given environment: settings are read once, at start-up.
PROBE = """
import json, django
django.setup()
from django.conf import settings
from django.test import Client
host = settings.ALLOWED_HOSTS[0] if settings.ALLOWED_HOSTS else "localhost"
out = {name: getattr(settings, name, None) for name in (
    "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE", "SECURE_PROXY_SSL_HEADER")}
client = Client(SERVER_NAME=host)
def answer(path, **extra):
    response = client.get(path, **extra)
    return {"status": response.status_code, "location": response.get("Location"),
            "hsts": response.get("Strict-Transport-Security"), "body": response.content.decode()}
out["healthz"] = answer("/healthz")
out["policy"] = answer("/v1/modules/scaiecho/tenant-policy")
out["policy_https"] = answer("/v1/modules/scaiecho/tenant-policy", secure=True)
out["policy_forwarded"] = answer("/v1/modules/scaiecho/tenant-policy", HTTP_X_FORWARDED_PROTO="https")
out["evil_host"] = client.get("/healthz", HTTP_HOST="evil.example").status_code
if PROBE_READYZ:
    out["readyz"] = answer("/readyz")
print(json.dumps(out))
"""


def probe(env: dict[str, str], *, readyz: bool = False) -> dict:
    env = {**env, "DJANGO_SETTINGS_MODULE": "scaiecho_site.settings"}
    result = subprocess.run(
        [sys.executable, "-c", f"PROBE_READYZ = {readyz}\n{PROBE}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "stderr": result.stderr}


def production(tmp_path: Path, **extra: str) -> dict[str, str]:
    return production_env(tmp_path, SCAIECHO_BIOMETRIC_KEYS=BIOMETRIC_KEY, SCAIECHO_WEBHOOK_SECRET_KEYS=WEBHOOK_KEY, **extra)


# --- production mode -----------------------------------------------------------------------------


def test_production_refuses_debug(tmp_path):
    result = run_check(production(tmp_path, DEBUG="true"))
    assert result.returncode != 0
    assert "scaiecho.E010" in result.stderr
    assert "DEBUG" in result.stderr
    assert "scaiecho.E010" not in run_check(production(tmp_path)).stderr


def test_asgi_server_refuses_debug_in_production(tmp_path):
    """daphne does not run Django's checks: the ASGI module refuses to load instead."""
    result = subprocess.run(
        [sys.executable, "-c", "import scaiecho_site.asgi"],
        cwd=ROOT, env=production(tmp_path, DEBUG="true"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "scaiecho.E010" in result.stderr


def test_bad_trusted_proxies_and_token_lifetimes_stop_start_up(tmp_path):
    result = run_check(clean_env(tmp_path, SCAIECHO_TRUSTED_PROXIES="10.0.0.0/8,proxy.internal"))
    assert result.returncode != 0
    assert "scaiecho.E011" in result.stderr
    assert "proxy.internal" in result.stderr
    result = run_check(
        clean_env(tmp_path, SCAIECHO_CAPTION_TOKEN_TTL_SECONDS="7200", SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS="3600")
    )
    assert result.returncode != 0
    assert "scaiecho.E012" in result.stderr


def test_production_speaks_https_only_except_to_health_probes(tmp_path):
    out = probe(production(tmp_path))
    assert (out["SESSION_COOKIE_SECURE"], out["CSRF_COOKIE_SECURE"], out["SECURE_SSL_REDIRECT"]) == (True, True, True)
    # A probe over plain HTTP gets its answer, not a redirect.
    assert out["healthz"]["status"] == 200
    assert json.loads(out["healthz"]["body"]) == {"status": "ok", "module": "scaiecho"}
    # Everything else moves to https.
    assert out["policy"]["status"] == 301
    assert out["policy"]["location"] == "https://stt.example.com/v1/modules/scaiecho/tenant-policy"
    # Over https the API answers, with HSTS for a year.
    assert out["policy_https"]["status"] == 401
    assert out["policy_https"]["hsts"] == "max-age=31536000"
    # X-Forwarded-Proto is anyone's to send: without trusted proxies it changes nothing.
    assert out["SECURE_PROXY_SSL_HEADER"] is None
    assert out["policy_forwarded"]["status"] == 301
    assert out["evil_host"] == 400


def test_production_transport_settings_are_configurable(tmp_path):
    out = probe(
        production(
            tmp_path, SECURE_SSL_REDIRECT="false", SECURE_HSTS_SECONDS="600", SESSION_COOKIE_SECURE="false",
            SCAIECHO_TRUSTED_PROXIES="127.0.0.1",
        )
    )
    assert out["SECURE_SSL_REDIRECT"] is False
    assert out["SESSION_COOKIE_SECURE"] is False
    assert out["policy"]["status"] == 401  # served over plain HTTP, as asked
    assert out["policy_https"]["hsts"] == "max-age=600"
    # From a trusted proxy (the test client's 127.0.0.1), X-Forwarded-Proto: https counts as https.
    assert out["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert out["policy_forwarded"]["hsts"] == "max-age=600"


# --- development mode ----------------------------------------------------------------------------


def test_development_has_its_own_secret_and_no_wildcard_host(tmp_path):
    env = clean_env(tmp_path)
    first, second = probe(env), probe(env)
    assert first["DEBUG"] is True
    assert first["SECRET_KEY"] != OLD_PUBLIC_KEY
    assert len(first["SECRET_KEY"]) >= 50
    # Stable across processes sharing the data folder (web, workers), so tokens and encrypted
    # speaker data survive a restart; private to its owner.
    assert second["SECRET_KEY"] == first["SECRET_KEY"]
    key_file = tmp_path / "var" / "secret_key"
    assert key_file.read_text().strip() == first["SECRET_KEY"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # Another data folder, another key.
    other = probe(clean_env(tmp_path / "other"))
    assert other["SECRET_KEY"] != first["SECRET_KEY"]
    # Local names answer; any other Host header is refused.
    assert "*" not in first["ALLOWED_HOSTS"]
    assert first["healthz"]["status"] == 200
    assert first["evil_host"] == 400
    # Development stays on plain HTTP.
    assert first["policy"]["status"] == 401
    assert first["policy"]["hsts"] is None


# --- /readyz -------------------------------------------------------------------------------------


def test_readyz_names_the_failing_database_without_its_host_or_user(tmp_path):
    env = clean_env(
        tmp_path,
        DATABASE_URL="postgres://scaisecretuser:hunter2@127.0.0.1:1/scaiecho_private",
        CELERY_BROKER_URL="memory://",
        SCAIECHO_RELAY_BASE_URL="http://127.0.0.1:9/oai/v1",
        SCAIECHO_RELAY_API_KEY="relay-key",
    )
    out = probe(env, readyz=True)
    readyz = out["readyz"]
    body = json.loads(readyz["body"])
    assert readyz["status"] == 503
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "unavailable"
    assert "database" in body["failing"]
    assert body["code"] == "SCAIECHO_NOT_READY"
    for secret in ("scaisecretuser", "hunter2", "127.0.0.1", "scaiecho_private", "connection", "Connection"):
        assert secret not in readyz["body"]
    # The operator still learns why, in the server's log.
    assert "readyz check database failed" in out["stderr"]
    assert "scaisecretuser" in out["stderr"] or "127.0.0.1" in out["stderr"]


@pytest.mark.django_db
def test_readyz_names_a_failing_broker_without_its_url(client, settings, caplog):
    settings.SCAIECHO_RELAY_BASE_URL = "http://127.0.0.1:9/oai/v1"
    settings.SCAIECHO_RELAY_API_KEY = "k"
    settings.CELERY_BROKER_URL = "redis://brokeruser:s3cret@127.0.0.1:1/0"
    with caplog.at_level(logging.WARNING, logger="scaiecho.health"):
        response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 503
    assert body["checks"]["broker"] == "unavailable"
    assert body["failing"] == ["broker"]
    assert body["code"] == "SCAIECHO_NOT_READY"
    text = response.content.decode()
    for secret in ("brokeruser", "s3cret", "127.0.0.1"):
        assert secret not in text
    assert any("readyz check broker failed" in record.getMessage() for record in caplog.records)
    assert any(record.exc_info for record in caplog.records)


# --- caption tokens --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_page_trades_a_key_for_a_caption_token_over_post(api):
    key = KeyFactory.issue(role=Role.TENANT_VIEWER)
    response = api.post("/captions/token", {}, format="json", headers=key.headers)
    body = response.json()
    assert response.status_code == 200, body
    assert response["Cache-Control"] == "no-store"
    token = body["data"]["token"]
    assert token.startswith("sct_")
    assert key.secret not in response.content.decode()
    assert body["data"]["ttl_seconds"] == 600
    assert body["data"]["expires_at"].endswith("Z")
    assert caption_token_key(token) == key.key
    assert AuditEvent.objects.filter(action="caption_token.issue", resource_id=str(key.key.pk)).count() == 1
    # The page knows where to trade it, and GET is not a way in.
    page = api.get("/captions/").content.decode()
    assert 'data-token-url="/captions/token"' in page
    assert api.get("/captions/token", headers=key.headers).status_code == 405


@pytest.mark.django_db
def test_a_caption_token_longer_than_the_maximum_is_refused(api, settings):
    settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS = 900
    key = KeyFactory.issue(role=Role.TENANT_VIEWER)
    response = api.post("/captions/token", {"ttl_seconds": 901}, format="json", headers=key.headers)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"][0]["field"] == "ttl_seconds"
    assert "900" in error["details"][0]["message"]
    assert "sct_" not in response.content.decode()
    assert not AuditEvent.objects.filter(action="caption_token.issue", outcome=AuditEvent.Outcome.SUCCESS).exists()
    shorter = api.post("/captions/token", {"ttl_seconds": 30}, format="json", headers=key.headers)
    assert shorter.json()["data"]["ttl_seconds"] == 30


@pytest.mark.django_db
def test_a_caption_token_lifetime_must_be_a_whole_number(api):
    key = KeyFactory.issue(role=Role.TENANT_VIEWER)
    for ttl in ("30.0", "30.5", "thirty"):
        response = api.post("/captions/token", {"ttl_seconds": ttl}, format="json", headers=key.headers)
        assert response.status_code == 422, (ttl, response.content)
        assert response.json()["error"]["details"][0]["field"] == "ttl_seconds"
    assert api.post("/captions/token", {"ttl_seconds": 30}, format="json", headers=key.headers).status_code == 200


@pytest.mark.django_db
def test_a_key_without_transcribe_gets_no_caption_token(api):
    key = KeyFactory.issue(role=Role.TENANT_USER)
    response = api.post("/captions/token", {}, format="json", headers=key.headers)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
    assert "sct_" not in response.content.decode()
    assert api.post("/captions/token", {}, format="json").status_code == 401


@pytest.mark.django_db
def test_no_caption_token_outlives_the_maximum(settings):
    key = KeyFactory.issue(role=Role.TENANT_VIEWER)
    # Issuing clamps: a day asked for is the maximum given.
    settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS = 1
    clamped = caption_token_issue(api_key_id=key.key.pk, ttl_seconds=86400)
    # A token minted under a larger maximum stops at today's maximum.
    settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS = 3600
    minted_long = caption_token_issue(api_key_id=key.key.pk, ttl_seconds=3600)
    assert caption_token_key(clamped) == key.key
    assert caption_token_key(minted_long) == key.key
    time.sleep(2.1)
    assert caption_token_key(clamped) is None
    settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS = 1
    assert caption_token_key(minted_long) is None


@pytest.mark.django_db
def test_caption_link_refuses_a_lifetime_past_the_maximum(settings, capsys):
    settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS = 900
    key = KeyFactory.issue(role=Role.TENANT_VIEWER)
    with pytest.raises(CommandError, match="SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS"):
        call_command("caption_link", "--key-id", str(key.key.pk), "--ttl", "901")
    assert capsys.readouterr().out == ""
    call_command("caption_link", "--key-id", str(key.key.pk))
    link = capsys.readouterr().out.strip()
    assert "#token=sct_" in link
    assert "sgk_" not in link

