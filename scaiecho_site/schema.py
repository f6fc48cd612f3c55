"""OpenAPI helpers: every documented response is shown inside the contract's envelope."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse, inline_serializer
from rest_framework import serializers

_error_detail = inline_serializer(
    "ErrorDetail", fields={"field": serializers.CharField(), "message": serializers.CharField()}
)
_meta = inline_serializer("Meta", fields={"request_id": serializers.CharField()})

ErrorEnvelope = inline_serializer(
    "ErrorEnvelope",
    fields={
        "status": serializers.ChoiceField(choices=["error"]),
        "error": inline_serializer(
            "Error",
            fields={
                "code": serializers.CharField(),
                "message": serializers.CharField(),
                "details": _error_detail.__class__(many=True, required=False),
                "retry_after": serializers.IntegerField(required=False),
            },
        ),
        "meta": _meta,
    },
)

_ERRORS = {
    401: "AUTH_TOKEN_MISSING or AUTH_TOKEN_INVALID",
    403: "AUTHZ_PERMISSION_DENIED or MODULE_NOT_ENABLED",
    404: "NOT_FOUND",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA",
    422: "VALIDATION_ERROR, with details [{field, message}]",
    429: "RATE_LIMITED (with retry_after and Retry-After) or BUDGET_EXCEEDED",
    502: "SCAIECHO_BACKEND_UNAVAILABLE or BACKEND_ERROR",
    503: "SCAIECHO_QUEUE_UNAVAILABLE: the job queue could not take the work (nothing started, nothing billed)",
    504: "BACKEND_TIMEOUT",
}


def enveloped(name: str, data: Any) -> Any:
    return inline_serializer(name, fields={"status": serializers.ChoiceField(choices=["ok"]), "data": data, "meta": _meta})


def error_responses(*errors: int) -> dict[int, Any]:
    """The error envelopes of these statuses, with those every product endpoint can answer."""
    return {status: OpenApiResponse(ErrorEnvelope, description=_ERRORS[status]) for status in (401, 403, 429, *errors)}


def responses(success_status: int, name: str, data: Any, *errors: int) -> dict[int, Any]:
    """The success envelope plus the error envelopes an endpoint can answer."""
    return {success_status: enveloped(name, data), **error_responses(*errors)}


# Operations whose request body is a raw schema (drf-spectacular marks those optional) but required.
REQUIRED_REQUEST_BODIES = frozenset({"tenant_policy_put"})


def require_request_bodies(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """Postprocessing hook: a PUT without a body is refused (422), so the document says it is required."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict) and operation.get("operationId") in REQUIRED_REQUEST_BODIES:
                operation["requestBody"]["required"] = True
    return result


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "sgk_<key>"}
