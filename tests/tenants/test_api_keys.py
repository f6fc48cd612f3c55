"""A tenant admin lists and revokes the tenant's keys; other tenants' keys are not found."""

from __future__ import annotations

import uuid

import pytest

from tenants.models import ApiKey, AuditEvent, Role
from tests.tenants.test_auth import POLICY_URL, assert_error

pytestmark = pytest.mark.django_db

KEYS_URL = "/v1/modules/scaiecho/api-keys"


def test_list_shows_the_tenants_keys_without_secrets(api, admin_key, issue_key):
    colleague = issue_key(role=Role.TENANT_VIEWER, tenant=admin_key.tenant)
    issue_key(role=Role.TENANT_ADMIN)  # another tenant's
    response = api.get(KEYS_URL, headers=admin_key.headers)
    assert response.status_code == 200
    keys = response.json()["data"]
    assert {k["id"] for k in keys} == {str(admin_key.key.pk), str(colleague.key.pk)}
    text = response.content.decode()
    for key in (admin_key, colleague):
        assert key.secret not in text
        assert ApiKey.objects.get(pk=key.key.pk).key_hash not in text
    viewer_row = next(k for k in keys if k["id"] == str(colleague.key.pk))
    assert viewer_row["role"] == "tenant_viewer"
    assert viewer_row["last_four"] == colleague.secret[-4:]


def test_admin_revokes_a_colleagues_key(api, admin_key, issue_key):
    colleague = issue_key(role=Role.TENANT_ADMIN, tenant=admin_key.tenant)
    response = api.delete(f"{KEYS_URL}/{colleague.key.pk}", headers=admin_key.headers)
    assert response.status_code == 200
    assert response.json()["data"]["revoked_at"].endswith("Z")
    assert_error(api.get(POLICY_URL, headers=colleague.headers), 401, "AUTH_TOKEN_INVALID")
    assert AuditEvent.objects.filter(action="api_key.revoke", resource_id=str(colleague.key.pk), outcome="SUCCESS").exists()


@pytest.mark.parametrize("which", ["other_tenant", "unknown", "malformed"])
def test_other_tenants_and_unknown_ids_are_not_found(api, admin_key, issue_key, which):
    other = issue_key(role=Role.TENANT_ADMIN)
    key_id = {"other_tenant": str(other.key.pk), "unknown": str(uuid.uuid4()), "malformed": "not-a-uuid"}[which]
    assert_error(api.delete(f"{KEYS_URL}/{key_id}", headers=admin_key.headers), 404, "NOT_FOUND")
    # The other tenant's key still works.
    assert api.get(POLICY_URL, headers=other.headers).status_code == 200
    assert AuditEvent.objects.filter(action="api_key.revoke", outcome="FAILURE", tenant_id=admin_key.tenant.pk).exists()


def test_viewers_cannot_manage_keys(api, issue_key):
    viewer = issue_key(role=Role.TENANT_VIEWER)
    assert_error(api.get(KEYS_URL, headers=viewer.headers), 403, "AUTHZ_PERMISSION_DENIED")
    assert_error(api.delete(f"{KEYS_URL}/{viewer.key.pk}", headers=viewer.headers), 403, "AUTHZ_PERMISSION_DENIED")
    assert ApiKey.objects.get(pk=viewer.key.pk).revoked_at is None
