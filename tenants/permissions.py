"""The base API view: authentication, rate limits, module and permission checks, in that order.

Every product endpoint subclasses :class:`TenantApiView` and names its ``required_permission``
and ``audit_action``. A refused permission writes a FAILURE audit row here, explicitly, before
the 403 leaves.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from scaiecho_site import errors
from scaiecho_site.envelope import to_application_error
from tenants.context import ActorContext, actor_from_request
from tenants.models import ApiKey, AuditEvent, Tenant
from tenants.ratelimit import api_limits, ratelimit_hit
from tenants.selectors import membership_permissions
from tenants.services import audit_permission_denied, audit_record


class TenantApiView(APIView):
    required_permission: ClassVar[str]
    audit_action: ClassVar[str]
    # Per-method actions where one view serves several operations (``{"DELETE": "speaker.erase"}``).
    audit_actions: ClassVar[dict[str, str]] = {}

    def get_audit_action(self) -> str:
        return self.audit_actions.get(self.request.method or "", self.audit_action)

    def check_permissions(self, request: Request) -> None:
        key: ApiKey | None = request.auth
        if key is None:
            raise exceptions.NotAuthenticated()
        membership = key.membership
        state = ratelimit_hit(
            limits=api_limits(key_id=str(key.pk), user_id=str(membership.user_id), tenant_id=str(membership.tenant_id))
        )
        request._request.scaiecho_ratelimit_headers = state.headers()
        if not state.allowed:
            raise errors.RateLimited(
                f"Rate limit of {state.limit} requests per minute reached.", retry_after=state.retry_after
            )
        tenant = membership.tenant
        if not tenant.scaiecho_enabled:
            audit_permission_denied(ctx=self.actor(request), action=self.get_audit_action(), reason="module_not_enabled")
            raise errors.ModuleNotEnabled()
        self.require_permission(request, self.required_permission)
        self.permitted = True

    def require_permission(self, request: Request, permission: str) -> None:
        """Refuse (and audit) unless the key's member holds ``permission``."""
        if permission not in membership_permissions(membership=request.auth.membership):
            audit_permission_denied(ctx=self.actor(request), action=self.get_audit_action(), reason="permission_denied")
            raise errors.PermissionDenied(f"This call needs the permission {permission}.")

    def handle_exception(self, exc: Exception) -> Response:
        """A permitted call that fails still leaves its FAILURE row in the audit trail."""
        if getattr(self, "permitted", False):
            error = to_application_error(exc)
            audit_record(
                ctx=self.actor(),
                action=self.get_audit_action(),
                outcome=AuditEvent.Outcome.FAILURE,
                details={"code": error.code, "details": error.details},
            )
        return super().handle_exception(exc)

    @property
    def tenant(self) -> Tenant:
        return self.request.auth.membership.tenant

    def actor(self, request: Request | None = None) -> ActorContext:
        return actor_from_request(request or self.request)

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        for name, value in getattr(request._request, "scaiecho_ratelimit_headers", {}).items():
            response[name] = value
        return response
