"""What an operator does in the admin: issue and revoke keys, edit policy, read the audit trail."""

from __future__ import annotations

import re

import pytest

from tenants.models import ApiKey, AuditEvent, Role, TenantPolicy
from tests.factories import MembershipFactory, TenantFactory
from tests.tenants.test_auth import POLICY_URL, assert_error

pytestmark = pytest.mark.django_db

SECRET = re.compile(r"sgk_[A-Za-z0-9_-]{32,}")


def test_admin_creates_a_key_shown_once_that_works(admin_client, api):
    membership = MembershipFactory(role=Role.TENANT_ADMIN)
    response = admin_client.post("/admin/tenants/apikey/add/", {"membership": membership.pk, "name": "ci"})
    assert response.status_code == 200
    page = response.content.decode()
    secrets_shown = SECRET.findall(page)
    assert secrets_shown, page
    secret = secrets_shown[0]
    assert "no-store" in response["Cache-Control"]

    key = ApiKey.objects.get(membership=membership)
    assert key.last_four == secret[-4:]
    assert api.get(POLICY_URL, HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200

    # Neither the change page nor the list shows the key or its hash again.
    for url in (f"/admin/tenants/apikey/{key.pk}/change/", "/admin/tenants/apikey/"):
        later = admin_client.get(url).content.decode()
        assert secret not in later
        assert key.key_hash not in later
    assert AuditEvent.objects.filter(action="api_key.create", resource_id=str(key.pk), actor_username="admin").exists()


def test_admin_revoke_action_stops_the_key(admin_client, api, admin_key):
    assert api.get(POLICY_URL, headers=admin_key.headers).status_code == 200
    response = admin_client.post(
        "/admin/tenants/apikey/", {"action": "revoke_selected", "_selected_action": [str(admin_key.key.pk)]}
    )
    assert response.status_code == 302
    assert ApiKey.objects.get(pk=admin_key.key.pk).revoked_at is not None
    assert_error(api.get(POLICY_URL, headers=admin_key.headers), 401, "AUTH_TOKEN_INVALID")
    assert AuditEvent.objects.filter(action="api_key.revoke", resource_id=str(admin_key.key.pk)).exists()


def test_admin_refuses_a_policy_the_api_would_refuse(admin_client):
    tenant = TenantFactory()
    response = admin_client.post(
        "/admin/tenants/tenantpolicy/add/", {"tenant": tenant.pk, "allowed_backends": "A", "default_backend": "B"}
    )
    assert response.status_code == 200  # the form again, with the error
    assert "Must be one of the allowed backends" in response.content.decode()
    assert not TenantPolicy.objects.filter(tenant=tenant).exists()
    response = admin_client.post(
        "/admin/tenants/tenantpolicy/add/", {"tenant": tenant.pk, "allowed_backends": "BA", "default_backend": "A"}
    )
    assert response.status_code == 302
    assert TenantPolicy.objects.get(tenant=tenant).allowed_backends == "BA"
    assert AuditEvent.objects.filter(action="tenant_policy.create", tenant_id=tenant.pk).exists()


def test_audit_rows_are_read_only_and_filterable(admin_client, api, admin_key):
    api.get(POLICY_URL, headers=admin_key.headers)
    row = AuditEvent.objects.filter(tenant_id=admin_key.tenant.pk).first()
    assert admin_client.get("/admin/tenants/auditevent/add/").status_code == 403
    assert admin_client.get(f"/admin/tenants/auditevent/{row.pk}/delete/").status_code == 403
    detail = admin_client.get(f"/admin/tenants/auditevent/{row.pk}/change/")
    assert detail.status_code == 200
    assert 'name="_save"' not in detail.content.decode()
    listing = admin_client.get("/admin/tenants/auditevent/", {"outcome": "SUCCESS", "tenant_slug": admin_key.tenant.slug})
    assert listing.status_code == 200
    assert "tenant_policy.read" in listing.content.decode()
    assert "Delete selected" not in listing.content.decode()


def test_tenant_page_lists_memberships(admin_client, admin_key):
    page = admin_client.get(f"/admin/tenants/tenant/{admin_key.tenant.pk}/change/").content.decode()
    assert admin_key.membership.user.username in page
