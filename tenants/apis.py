"""Tenant administration endpoints: the backend policy and the tenant's API keys."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from scaiecho_site.envelope import ok
from scaiecho_site.schema import responses
from tenants.models import PERM_ADMIN, TenantPolicy
from tenants.permissions import TenantApiView
from tenants.selectors import api_key_of_tenant, api_keys_of_tenant
from tenants.services import api_key_revoke, audit_record, policy_get_or_provision, policy_update


class TenantPolicyOutput(serializers.Serializer):
    tenant_id = serializers.CharField(source="tenant.pk")
    allowed_backends = serializers.CharField()
    default_backend = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class TenantPolicyApi(TenantApiView):
    required_permission = PERM_ADMIN
    @property
    def audit_action(self) -> str:  # type: ignore[override]
        return "tenant_policy.read" if self.request.method in ("GET", "HEAD") else "tenant_policy.update"

    class PutInput(serializers.Serializer):
        # Shape only; the contract's rules live in ``policy_validate``.
        allowed_backends = serializers.CharField()
        default_backend = serializers.CharField()

    class PatchInput(PutInput):
        allowed_backends = serializers.CharField(required=False)
        default_backend = serializers.CharField(required=False)

    def _render(self, request: Request, policy: TenantPolicy) -> Response:
        return ok(request, TenantPolicyOutput(policy).data)

    @extend_schema(operation_id="tenant_policy_get", responses=responses(200, "TenantPolicyEnvelope", TenantPolicyOutput()))
    def get(self, request: Request) -> Response:
        policy = policy_get_or_provision(tenant=self.tenant)
        audit_record(ctx=self.actor(), action="tenant_policy.read", resource_type="tenant_policy", resource_id=str(self.tenant.pk))
        return self._render(request, policy)

    @extend_schema(
        operation_id="tenant_policy_patch",
        request=PatchInput,
        responses=responses(200, "TenantPolicyPatchEnvelope", TenantPolicyOutput(), 422),
    )
    def patch(self, request: Request) -> Response:
        return self._update(request, self.PatchInput)

    @extend_schema(
        operation_id="tenant_policy_put",
        request=PutInput,
        responses=responses(200, "TenantPolicyPutEnvelope", TenantPolicyOutput(), 422),
    )
    def put(self, request: Request) -> Response:
        return self._update(request, self.PutInput)

    def _update(self, request: Request, input_class: type[serializers.Serializer]) -> Response:
        serializer = input_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        policy = policy_update(tenant=self.tenant, ctx=self.actor(), **serializer.validated_data)
        return self._render(request, policy)


class ApiKeyOutput(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField()
    user = serializers.CharField(source="membership.user.username")
    role = serializers.CharField(source="membership.role")
    last_four = serializers.CharField()
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)


class ApiKeyListApi(TenantApiView):
    """The tenant's API keys, for its admins. Secrets and hashes are never returned."""

    required_permission = PERM_ADMIN
    audit_action = "api_key.list"

    @extend_schema(operation_id="api_keys_list", responses=responses(200, "ApiKeyListEnvelope", ApiKeyOutput(many=True)))
    def get(self, request: Request) -> Response:
        keys = api_keys_of_tenant(tenant_id=self.tenant.pk)
        audit_record(ctx=self.actor(), action="api_key.list", resource_type="api_key")
        return ok(request, ApiKeyOutput(keys, many=True).data)


class ApiKeyDetailApi(TenantApiView):
    """Revoke one of the tenant's keys: ``DELETE /api-keys/{id}``. Takes effect on the next request."""

    required_permission = PERM_ADMIN
    audit_action = "api_key.revoke"

    @extend_schema(operation_id="api_keys_revoke", responses=responses(200, "ApiKeyRevokeEnvelope", ApiKeyOutput(), 404))
    def delete(self, request: Request, key_id: str) -> Response:
        key = api_key_of_tenant(tenant_id=self.tenant.pk, key_id=key_id)
        return ok(request, ApiKeyOutput(api_key_revoke(key=key, ctx=self.actor())).data)
