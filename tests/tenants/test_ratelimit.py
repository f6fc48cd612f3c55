"""Sliding-window rate limits per key, user and tenant, shared through Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tenants.models import Role
from tenants.ratelimit import Limit, ratelimit_hit
from tests.tenants.test_auth import POLICY_URL, assert_error

pytestmark = pytest.mark.django_db


def test_headers_on_every_authenticated_response(api, admin_key, issue_key):
    ok = api.get(POLICY_URL, headers=admin_key.headers)
    assert ok["X-Scaigrid-Ratelimit-Limit"] == "60"
    assert ok["X-Scaigrid-Ratelimit-Remaining"] == "59"
    assert 1 <= int(ok["X-Scaigrid-Ratelimit-Reset"]) <= 60
    second = api.get(POLICY_URL, headers=admin_key.headers)
    assert second["X-Scaigrid-Ratelimit-Remaining"] == "58"
    denied = api.get(POLICY_URL, headers=issue_key(role=Role.TENANT_VIEWER).headers)
    assert denied.status_code == 403
    assert "X-Scaigrid-Ratelimit-Limit" in denied


def test_per_key_limit_gives_429_with_retry_after(api, admin_key, settings):
    settings.SCAIECHO_RATELIMIT_PER_KEY = 3
    for remaining in ("2", "1", "0"):
        response = api.get(POLICY_URL, headers=admin_key.headers)
        assert response.status_code == 200
        assert response["X-Scaigrid-Ratelimit-Remaining"] == remaining
    response = api.get(POLICY_URL, headers=admin_key.headers)
    body = assert_error(response, 429, "RATE_LIMITED")
    assert 1 <= body["error"]["retry_after"] <= 120
    assert response["Retry-After"] == str(body["error"]["retry_after"])
    assert response["X-Scaigrid-Ratelimit-Remaining"] == "0"


def test_per_user_limit_spans_the_users_keys(api, issue_key, settings):
    settings.SCAIECHO_RATELIMIT_PER_USER = 2
    first = issue_key(role=Role.TENANT_ADMIN)
    second = issue_key(membership=first.membership)
    assert api.get(POLICY_URL, headers=first.headers).status_code == 200
    assert api.get(POLICY_URL, headers=second.headers).status_code == 200
    assert_error(api.get(POLICY_URL, headers=second.headers), 429, "RATE_LIMITED")


def test_per_tenant_limit_spans_its_users(api, issue_key, settings):
    settings.SCAIECHO_RATELIMIT_PER_TENANT = 2
    first = issue_key(role=Role.TENANT_ADMIN)
    second = issue_key(role=Role.TENANT_ADMIN, tenant=first.tenant)
    other_tenant = issue_key(role=Role.TENANT_ADMIN)
    assert api.get(POLICY_URL, headers=first.headers).status_code == 200
    assert api.get(POLICY_URL, headers=second.headers).status_code == 200
    assert_error(api.get(POLICY_URL, headers=first.headers), 429, "RATE_LIMITED")
    assert api.get(POLICY_URL, headers=other_tenant.headers).status_code == 200


def test_limit_is_shared_across_processes(api, admin_key, settings):
    """Another process (another web worker) spends the key's budget; this one sees it."""
    settings.SCAIECHO_RATELIMIT_PER_KEY = 5
    script = (
        "import django; django.setup()\n"
        "from django.conf import settings\n"
        "from tenants.ratelimit import Limit, ratelimit_hit\n"
        f"[ratelimit_hit(limits=[Limit('key', '{admin_key.key.pk}', 5)]) for _ in range(5)]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "DJANGO_SETTINGS_MODULE": "scaiecho_site.settings"})
    assert_error(api.get(POLICY_URL, headers=admin_key.headers), 429, "RATE_LIMITED")


def test_window_slides():
    """Counts from the previous window fade out in proportion to elapsed time."""
    limit = [Limit("key", "slide-test", 10)]
    start = 1_000_000 * 60.0  # the start of a window
    for _ in range(10):
        assert ratelimit_hit(limits=limit, now=start + 30).allowed
    assert not ratelimit_hit(limits=limit, now=start + 59).allowed
    # 15 s into the next window, 75 % of the previous 10 still count: 7.5 + 1 <= 10.
    assert ratelimit_hit(limits=limit, now=start + 75).allowed
    assert ratelimit_hit(limits=limit, now=start + 75).allowed
    assert not ratelimit_hit(limits=limit, now=start + 75).allowed
    # Two windows later everything has faded.
    assert ratelimit_hit(limits=limit, now=start + 180).remaining == 9


def test_refused_requests_are_not_counted():
    limit = [Limit("key", "refused-test", 2)]
    start = 2_000_000 * 60.0
    assert ratelimit_hit(limits=limit, now=start + 1).allowed
    assert ratelimit_hit(limits=limit, now=start + 1).allowed
    for _ in range(5):
        refused = ratelimit_hit(limits=limit, now=start + 1)
        assert not refused.allowed
    # The refusal says when the next request fits: halfway into the next window, where the two
    # admitted requests weigh 1 (the five refused ones would have made it 3.5).
    assert refused.retry_after == 89
    assert not ratelimit_hit(limits=limit, now=start + 88).allowed
    assert ratelimit_hit(limits=limit, now=start + 90).allowed
