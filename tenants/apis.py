"""Tenant administration endpoints: the backend policy and the tenant's API keys."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from scaiecho_site.envelope import ok
from scaiecho_site.schema import responses
from tenants.models import PERM_ADMIN, TenantPolicy
from tenants.permissions import TenantApiView
from tenants.selectors import api_key_of_tenant, api_keys_of_tenant
from tenants.services import api_key_revoke, audit_record, policy_get_or_provision, policy_update, webhook_secret_rotate


class TenantPolicyOutput(serializers.Serializer):
    tenant_id = serializers.CharField(source="tenant.pk")
    allowed_backends = serializers.CharField()
    default_backend = serializers.CharField()
    webhook_url = serializers.CharField(allow_null=True, help_text="The default webhook destination; null when none is set.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def to_representation(self, instance: Any) -> dict[str, Any]:
        data = super().to_representation(instance)
        data["webhook_url"] = data["webhook_url"] or None
        return data


_ALLOWED = {"type": "string", "enum": ["A", "B", "AB", "BA"]}
_DEFAULT = {"type": "string", "enum": ["A", "B"]}
_WEBHOOK_URL = {
    "type": "string",
    "nullable": True,
    "maxLength": 2048,
    "pattern": "^(https?://.*)?$",
    "description": "The default webhook destination of the tenant's jobs (an http or https URL on a public "
    "address; the tenant needs a signing secret first, else 422). Empty or null removes it; absent keeps it.",
}


def _policy(allowed: list[str], default: list[str], *, required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "allowed_backends": {**_ALLOWED, "enum": allowed},
            "default_backend": {**_DEFAULT, "enum": default},
            "webhook_url": _WEBHOOK_URL,
        },
        "required": required,
    }


_RULE = "default_backend must be one of allowed_backends (else 422)."
# PUT: a whole policy, one of the combinations the contract allows.
POLICY_PUT_SCHEMA = {
    "description": _RULE,
    "anyOf": [
        _policy(["AB", "BA"], ["A", "B"], required=["allowed_backends", "default_backend"]),
        _policy(["A"], ["A"], required=["allowed_backends", "default_backend"]),
        _policy(["B"], ["B"], required=["allowed_backends", "default_backend"]),
    ],
}
# PATCH: the fields given change. A single allowed backend comes with default_backend naming it; a
# default_backend alone must be one of the policy's current allowed_backends (else 422).
POLICY_PATCH_SCHEMA = {
    "description": _RULE + " allowed_backends naming one backend must come with default_backend naming that "
    "backend; default_backend alone must be one of the current allowed_backends.",
    "anyOf": [
        _policy(["AB", "BA"], ["A", "B"], required=["allowed_backends"]),
        _policy(["A"], ["A"], required=["allowed_backends", "default_backend"]),
        _policy(["B"], ["B"], required=["allowed_backends", "default_backend"]),
        {**_policy(["AB", "BA"], ["A", "B"], required=[]), "not": {"required": ["allowed_backends"]}},
    ],
}


class TenantPolicyApi(TenantApiView):
    required_permission = PERM_ADMIN
    @property
    def audit_action(self) -> str:  # type: ignore[override]
        return "tenant_policy.read" if self.request.method in ("GET", "HEAD") else "tenant_policy.update"

    class PutInput(serializers.Serializer):
        # Shape only; the contract's rules live in ``policy_validate``.
        allowed_backends = serializers.CharField()
        default_backend = serializers.CharField()
        # Checked by the service (a public destination, a signing secret); "" or null removes it.
        webhook_url = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=2048)

        def validate_webhook_url(self, value: str | None) -> str:
            return value or ""

    class PatchInput(PutInput):
        allowed_backends = serializers.CharField(required=False)
        default_backend = serializers.CharField(required=False)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            # Narrowing to one backend says which is the default: the request alone is then valid
            # or not, whatever the stored policy (and the schema can say so).
            if attrs.get("allowed_backends") in ("A", "B") and "default_backend" not in attrs:
                raise serializers.ValidationError(
                    {"default_backend": f"Required when allowed_backends is a single backend ({attrs['allowed_backends']})."}
                )
            return attrs

    def _render(self, request: Request, policy: TenantPolicy) -> Response:
        return ok(request, TenantPolicyOutput(policy).data)

    @extend_schema(operation_id="tenant_policy_get", responses=responses(200, "TenantPolicyEnvelope", TenantPolicyOutput()))
    def get(self, request: Request) -> Response:
        policy = policy_get_or_provision(tenant=self.tenant)
        audit_record(ctx=self.actor(), action="tenant_policy.read", resource_type="tenant_policy", resource_id=str(self.tenant.pk))
        return self._render(request, policy)

    @extend_schema(
        operation_id="tenant_policy_patch",
        request={"application/json": POLICY_PATCH_SCHEMA},
        responses=responses(200, "TenantPolicyPatchEnvelope", TenantPolicyOutput(), 422),
    )
    def patch(self, request: Request) -> Response:
        return self._update(request, self.PatchInput)

    @extend_schema(
        operation_id="tenant_policy_put",
        request={"application/json": POLICY_PUT_SCHEMA},
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


class WebhookSecretOutput(serializers.Serializer):
    secret = serializers.CharField(help_text="whsec_ and base64: shown this once, stored encrypted.")


class WebhookSecretApi(TenantApiView):
    """``POST /webhook-secret``: create or rotate the tenant's webhook signing secret. The answer
    is the only time the secret is shown; deliveries from then on are signed with it alone."""

    required_permission = PERM_ADMIN
    audit_action = "webhook_secret.rotate"

    @extend_schema(operation_id="webhook_secret_rotate", request=None, responses=responses(200, "WebhookSecretEnvelope", WebhookSecretOutput()))
    def post(self, request: Request) -> Response:
        secret = webhook_secret_rotate(tenant=self.tenant, ctx=self.actor())
        return ok(request, WebhookSecretOutput({"secret": secret}).data)
