"""Every way a bearer key can fail, and what a client sees."""

from __future__ import annotations

import pytest
from django.utils import timezone

from tenants.context import system_actor
from tenants.models import ApiKey
from tenants.services import api_key_revoke

POLICY_URL = "/v1/modules/scaiecho/tenant-policy"

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == code
    assert body["meta"]["request_id"] == response["X-Request-Id"]
    return body


def test_missing_header_is_token_missing(api):
    response = api.get(POLICY_URL)
    assert_error(response, 401, "AUTH_TOKEN_MISSING")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token sgk_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "Bearer not-a-scaiecho-key",
        "Bearer sgk_short",
        "Bearer sgk_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ],
)
def test_malformed_or_unknown_token_is_invalid(api, header):
    assert_error(api.get(POLICY_URL, HTTP_AUTHORIZATION=header), 401, "AUTH_TOKEN_INVALID")


def test_valid_key_is_accepted_case_insensitive_scheme(api, admin_key):
    response = api.get(POLICY_URL, HTTP_AUTHORIZATION=f"bearer {admin_key.secret}")
    assert response.status_code == 200


def test_revocation_takes_effect_on_the_next_request(api, admin_key):
    assert api.get(POLICY_URL, headers=admin_key.headers).status_code == 200
    api_key_revoke(key=admin_key.key, ctx=system_actor())
    assert_error(api.get(POLICY_URL, headers=admin_key.headers), 401, "AUTH_TOKEN_INVALID")


def test_key_of_removed_member_stops_working(api, admin_key):
    admin_key.membership.delete()
    assert_error(api.get(POLICY_URL, headers=admin_key.headers), 401, "AUTH_TOKEN_INVALID")


def test_key_format_and_storage(admin_key):
    secret = admin_key.secret
    assert secret.startswith("sgk_")
    assert len(secret) - 4 >= 32
    assert all(ch.isalnum() or ch in "-_" for ch in secret[4:])
    row = ApiKey.objects.get(pk=admin_key.key.pk)
    stored = [str(getattr(row, f.attname)) for f in ApiKey._meta.fields]
    assert not any(secret in value or secret[4:] in value for value in stored)
    assert row.last_four == secret[-4:]
    import hashlib

    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()


def test_last_used_is_recorded_but_not_written_on_every_request(api, admin_key, settings):
    settings.SCAIECHO_KEY_LAST_USED_INTERVAL_SECONDS = 60
    assert ApiKey.objects.get(pk=admin_key.key.pk).last_used_at is None
    api.get(POLICY_URL, headers=admin_key.headers)
    first = ApiKey.objects.get(pk=admin_key.key.pk).last_used_at
    assert first is not None
    assert (timezone.now() - first).total_seconds() < 5
    api.get(POLICY_URL, headers=admin_key.headers)
    assert ApiKey.objects.get(pk=admin_key.key.pk).last_used_at == first
    # Once the interval has passed, the next use is recorded again.
    ApiKey.objects.filter(pk=admin_key.key.pk).update(last_used_at=first - timezone.timedelta(seconds=61))
    api.get(POLICY_URL, headers=admin_key.headers)
    assert ApiKey.objects.get(pk=admin_key.key.pk).last_used_at > first
