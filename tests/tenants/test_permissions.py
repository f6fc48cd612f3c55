"""Roles, grants and the module switch, as the API enforces them."""

from __future__ import annotations

import pytest

from tenants.models import ALL_PERMISSIONS, PERM_ADMIN, PERM_DIARIZE, PERM_ENROLL, PERM_TRANSCRIBE, AuditEvent, Role
from tenants.selectors import membership_permissions
from tests.factories import MembershipFactory
from tests.tenants.test_auth import POLICY_URL, assert_error

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (Role.TENANT_ADMIN, {PERM_TRANSCRIBE, PERM_DIARIZE, PERM_ENROLL, PERM_ADMIN}),
        (Role.TENANT_USER, set()),
        (Role.TENANT_VIEWER, {PERM_TRANSCRIBE}),
    ],
)
def test_role_defaults_match_the_contract(role, expected):
    assert membership_permissions(membership=MembershipFactory(role=role)) == expected


def test_grants_add_to_the_role():
    from tenants.models import PermissionGrant

    membership = MembershipFactory(role=Role.TENANT_VIEWER)
    PermissionGrant.objects.create(membership=membership, permission=PERM_ENROLL)
    assert membership_permissions(membership=membership) == {PERM_TRANSCRIBE, PERM_ENROLL}
    assert set(ALL_PERMISSIONS) == {"scaiecho:transcribe", "scaiecho:diarize", "scaiecho:enroll", "scaiecho:admin"}


@pytest.mark.parametrize(
    ("role", "grants", "status"),
    [
        (Role.TENANT_ADMIN, (), 200),
        (Role.TENANT_VIEWER, (), 403),
        (Role.TENANT_USER, (), 403),
        (Role.TENANT_USER, (PERM_TRANSCRIBE, PERM_ENROLL), 403),
        (Role.TENANT_USER, (PERM_ADMIN,), 200),
        (Role.TENANT_VIEWER, (PERM_ADMIN,), 200),
    ],
)
def test_policy_needs_admin_permission(api, issue_key, role, grants, status):
    key = issue_key(role=role, grants=grants)
    response = api.get(POLICY_URL, headers=key.headers)
    if status == 200:
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
    else:
        body = assert_error(response, 403, "AUTHZ_PERMISSION_DENIED")
        assert "scaiecho:admin" in body["error"]["message"]


def test_denied_call_is_audited_as_failure(api, issue_key):
    key = issue_key(role=Role.TENANT_VIEWER)
    response = api.get(POLICY_URL, headers=key.headers, HTTP_USER_AGENT="curl/8", HTTP_X_REQUEST_ID="client-req-0001")
    assert response.status_code == 403
    row = AuditEvent.objects.get(request_id="client-req-0001")
    assert row.outcome == "FAILURE"
    assert row.tenant_id == key.tenant.pk
    assert row.actor_username == key.membership.user.username
    assert row.api_key_id == key.key.pk
    assert row.user_agent == "curl/8"
    assert row.ip == "127.0.0.1"
    assert row.details["reason"] == "permission_denied"


def test_disabled_module_answers_module_not_enabled(api, admin_key):
    admin_key.tenant.scaiecho_enabled = False
    admin_key.tenant.save(update_fields=["scaiecho_enabled"])
    assert_error(api.get(POLICY_URL, headers=admin_key.headers), 403, "MODULE_NOT_ENABLED")
    assert AuditEvent.objects.filter(tenant_id=admin_key.tenant.pk, outcome="FAILURE").count() == 1


def test_each_tenant_sees_only_its_own_policy(api, issue_key):
    first = issue_key(role=Role.TENANT_ADMIN)
    second = issue_key(role=Role.TENANT_ADMIN)
    api.patch(POLICY_URL, {"allowed_backends": "A", "default_backend": "A"}, format="json", headers=first.headers)
    seen_by_second = api.get(POLICY_URL, headers=second.headers).json()["data"]
    assert seen_by_second["tenant_id"] == str(second.tenant.pk)
    assert (seen_by_second["allowed_backends"], seen_by_second["default_backend"]) == ("AB", "B")
