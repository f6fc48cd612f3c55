"""Tenant policy over the API, and the contract's backend resolution."""

from __future__ import annotations

import itertools

import pytest

from scaiecho_site import errors
from tenants.models import AuditEvent, TenantPolicy
from tenants.services import policy_resolve_backend
from tests.factories import TenantFactory
from tests.tenants.test_auth import POLICY_URL, assert_error

pytestmark = pytest.mark.django_db


def test_first_get_provisions_tier_defaults(api, admin_key):
    assert not TenantPolicy.objects.filter(tenant=admin_key.tenant).exists()
    response = api.get(POLICY_URL, headers=admin_key.headers)
    data = response.json()["data"]
    assert data["allowed_backends"] == "AB"
    assert data["default_backend"] == "B"
    assert data["tenant_id"] == str(admin_key.tenant.pk)
    assert data["created_at"].endswith("Z")
    assert data["updated_at"].endswith("Z")
    assert TenantPolicy.objects.filter(tenant=admin_key.tenant).count() == 1


def test_tier_defaults_come_from_settings(api, issue_key, settings):
    settings.SCAIECHO_TIER_POLICY_DEFAULTS = {"default": ["AB", "B"], "sovereign": ["A", "A"]}
    key = issue_key(tenant=TenantFactory(tier="sovereign"))
    data = api.get(POLICY_URL, headers=key.headers).json()["data"]
    assert (data["allowed_backends"], data["default_backend"]) == ("A", "A")


def test_patch_changes_only_given_fields(api, admin_key):
    response = api.patch(POLICY_URL, {"default_backend": "A"}, format="json", headers=admin_key.headers)
    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["allowed_backends"], data["default_backend"]) == ("AB", "A")
    again = api.get(POLICY_URL, headers=admin_key.headers).json()["data"]
    assert (again["allowed_backends"], again["default_backend"]) == ("AB", "A")


def test_put_replaces_the_policy(api, admin_key):
    response = api.put(POLICY_URL, {"allowed_backends": "BA", "default_backend": "B"}, format="json", headers=admin_key.headers)
    assert response.status_code == 200
    assert response.json()["data"]["allowed_backends"] == "BA"


@pytest.mark.parametrize(
    ("method", "payload", "field"),
    [
        ("put", {"allowed_backends": "A", "default_backend": "B"}, "default_backend"),
        ("put", {"allowed_backends": "C", "default_backend": "A"}, "allowed_backends"),
        ("put", {"allowed_backends": "ABC", "default_backend": "A"}, "allowed_backends"),
        ("put", {"allowed_backends": "ab", "default_backend": "a"}, "allowed_backends"),
        ("put", {"allowed_backends": "AB"}, "default_backend"),
        ("patch", {"allowed_backends": "A"}, "default_backend"),  # default B no longer allowed
        ("patch", {"allowed_backends": "B"}, "default_backend"),  # one backend: name it as the default too
        ("patch", {"default_backend": "Z"}, "default_backend"),
        ("patch", {"allowed_backends": ["A"]}, "allowed_backends"),
    ],
)
def test_invalid_policies_are_refused_and_nothing_changes(api, admin_key, method, payload, field):
    response = getattr(api, method)(POLICY_URL, payload, format="json", headers=admin_key.headers)
    body = assert_error(response, 422, "VALIDATION_ERROR")
    assert field in {detail["field"] for detail in body["error"]["details"]}
    data = api.get(POLICY_URL, headers=admin_key.headers).json()["data"]
    assert (data["allowed_backends"], data["default_backend"]) == ("AB", "B")


def test_each_mutating_call_writes_an_audit_row(api, admin_key):
    api.patch(POLICY_URL, {"default_backend": "A"}, format="json", headers={**admin_key.headers, "X-Request-Id": "patch-req-001"})
    api.put(POLICY_URL, {"allowed_backends": "A", "default_backend": "A"}, format="json", headers={**admin_key.headers, "X-Request-Id": "put-req-0001"})
    api.put(POLICY_URL, {"allowed_backends": "A", "default_backend": "B"}, format="json", headers={**admin_key.headers, "X-Request-Id": "put-bad-0001"})
    patch_row = AuditEvent.objects.get(request_id="patch-req-001", action="tenant_policy.update")
    assert patch_row.outcome == "SUCCESS"
    assert patch_row.details["before"] == {"allowed_backends": "AB", "default_backend": "B"}
    assert patch_row.details["after"] == {"allowed_backends": "AB", "default_backend": "A"}
    assert patch_row.actor_username == admin_key.membership.user.username
    assert patch_row.tenant_slug == admin_key.tenant.slug
    put_row = AuditEvent.objects.get(request_id="put-req-0001", action="tenant_policy.update")
    assert put_row.details["after"] == {"allowed_backends": "A", "default_backend": "A"}
    bad_row = AuditEvent.objects.get(request_id="put-bad-0001", action="tenant_policy.update")
    assert bad_row.outcome == "FAILURE"
    assert bad_row.details["code"] == "VALIDATION_ERROR"


def test_reading_the_policy_is_audited(api, admin_key):
    api.get(POLICY_URL, headers={**admin_key.headers, "X-Request-Id": "read-req-0001"})
    row = AuditEvent.objects.get(request_id="read-req-0001")
    assert (row.action, row.outcome) == ("tenant_policy.read", "SUCCESS")


# --- Resolution -------------------------------------------------------------------------------
# The order in which backends are tried, written out from the contract for every valid policy
# and preference; the chosen backend is the first available one in this order.
TRY_ORDER = {
    ("A", "A", "any"): "A", ("A", "A", "prefer_self_hosted"): "A", ("A", "A", "prefer_relay"): "A",
    ("B", "B", "any"): "B", ("B", "B", "prefer_self_hosted"): "B", ("B", "B", "prefer_relay"): "B",
    ("AB", "A", "any"): "AB", ("AB", "A", "prefer_self_hosted"): "AB", ("AB", "A", "prefer_relay"): "BA",
    ("AB", "B", "any"): "BA", ("AB", "B", "prefer_self_hosted"): "AB", ("AB", "B", "prefer_relay"): "BA",
    ("BA", "A", "any"): "AB", ("BA", "A", "prefer_self_hosted"): "AB", ("BA", "A", "prefer_relay"): "BA",
    ("BA", "B", "any"): "BA", ("BA", "B", "prefer_self_hosted"): "AB", ("BA", "B", "prefer_relay"): "BA",
}
AVAILABILITY = [frozenset(), frozenset("A"), frozenset("B"), frozenset("AB")]
CASES = [(*policy, available) for policy, available in itertools.product(TRY_ORDER, AVAILABILITY)]


@pytest.mark.parametrize(("allowed", "default", "preference", "available"), CASES)
def test_resolution_table(allowed, default, preference, available):
    policy = TenantPolicy(allowed_backends=allowed, default_backend=default)
    expected = next((backend for backend in TRY_ORDER[allowed, default, preference] if backend in available), None)
    asked: list[str] = []

    def is_available(backend: str) -> bool:
        asked.append(backend)
        return backend in available

    if expected is None:
        with pytest.raises(errors.BackendUnavailable):
            policy_resolve_backend(policy=policy, preference=preference, is_available=is_available)
    else:
        assert policy_resolve_backend(policy=policy, preference=preference, is_available=is_available) == expected
    # The preference never widens the allowed set: a disallowed backend is never even asked about.
    assert set(asked) <= set(allowed)


def test_unknown_preference_is_a_validation_error():
    with pytest.raises(errors.ValidationError):
        policy_resolve_backend(policy=TenantPolicy(allowed_backends="AB", default_backend="B"), preference="fastest")


def test_default_availability_checks_use_workers_and_relay_settings(settings):
    from datetime import timedelta

    from django.utils import timezone

    from transcription.models import SpeechWorker
    from transcription.services import worker_heartbeat, worker_retire

    policy = TenantPolicy(allowed_backends="AB", default_backend="A")
    settings.SCAIECHO_RELAY_BASE_URL = ""
    settings.SCAIECHO_RELAY_API_KEY = ""
    with pytest.raises(errors.BackendUnavailable):
        policy_resolve_backend(policy=policy)
    settings.SCAIECHO_RELAY_BASE_URL = "http://127.0.0.1:9/oai/v1"
    settings.SCAIECHO_RELAY_API_KEY = "relay-key"
    assert policy_resolve_backend(policy=policy) == "B"
    worker_heartbeat(worker_id="w1@host")
    assert policy_resolve_backend(policy=policy) == "A"
    # A worker whose heartbeat lapsed no longer counts.
    SpeechWorker.objects.filter(worker_id="w1@host").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert policy_resolve_backend(policy=policy) == "B"
    worker_heartbeat(worker_id="w1@host")
    worker_retire(worker_id="w1@host")
    assert policy_resolve_backend(policy=policy) == "B"
