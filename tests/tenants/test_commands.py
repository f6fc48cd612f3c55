"""The operator commands ``create_api_key`` and ``revoke_api_key``."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tenants.models import ApiKey, Membership
from tests.tenants.test_auth import POLICY_URL, assert_error

pytestmark = pytest.mark.django_db


def create(**options: str) -> str:
    out = StringIO()
    call_command("create_api_key", stdout=out, **options)
    return out.getvalue()


def test_create_prints_only_a_working_key_and_creates_what_is_missing(api):
    printed = create(tenant="acme", user="alice", role="tenant_admin", name="laptop")
    assert re.fullmatch(r"sgk_[A-Za-z0-9_-]{32,}\n", printed)
    secret = printed.strip()
    membership = Membership.objects.get(tenant__slug="acme", user__username="alice")
    assert membership.role == "tenant_admin"
    assert ApiKey.objects.get(membership=membership).name == "laptop"
    response = api.get(POLICY_URL, HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.json()["data"]["allowed_backends"] == "AB"


def test_viewer_key_from_command_is_denied_policy(api):
    secret = create(tenant="acme", user="victor", role="tenant_viewer").strip()
    assert_error(api.get(POLICY_URL, HTTP_AUTHORIZATION=f"Bearer {secret}"), 403, "AUTHZ_PERMISSION_DENIED")


def test_create_reuses_tenant_and_user(api):
    create(tenant="acme", user="alice", role="tenant_admin")
    create(tenant="acme", user="alice", role="tenant_admin")
    assert Membership.objects.filter(tenant__slug="acme", user__username="alice").count() == 1
    assert ApiKey.objects.filter(membership__user__username="alice").count() == 2


def test_create_rejects_unknown_role():
    with pytest.raises(CommandError):
        create(tenant="acme", user="alice", role="owner")


@pytest.mark.parametrize("how", ["id", "prefix", "key"])
def test_revoke_by_id_prefix_or_key(api, how):
    secret = create(tenant="acme", user="alice", role="tenant_admin").strip()
    key = ApiKey.objects.get()
    reference = {"id": str(key.pk), "prefix": str(key.pk)[:8], "key": secret}[how]
    out = StringIO()
    call_command("revoke_api_key", reference, stdout=out)
    assert "Revoked" in out.getvalue()
    assert secret not in out.getvalue()
    assert_error(api.get(POLICY_URL, HTTP_AUTHORIZATION=f"Bearer {secret}"), 401, "AUTH_TOKEN_INVALID")


def test_revoke_unknown_reference_fails():
    with pytest.raises(CommandError, match="No API key"):
        call_command("revoke_api_key", "ffffffff-ffff")
    with pytest.raises(CommandError, match="No API key"):
        call_command("revoke_api_key", "abc")
