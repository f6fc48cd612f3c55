"""Who is acting, for whom, from where: what services need to authorize and audit a call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaiecho_site.envelope import request_id_of

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

    from tenants.models import ApiKey, Tenant


@dataclass(frozen=True)
class ActorContext:
    user: AbstractBaseUser | None
    tenant: Tenant | None
    api_key: ApiKey | None = None
    ip: str | None = None
    user_agent: str = ""
    request_id: str = ""


def client_ip(request: Any) -> str | None:
    # REMOTE_ADDR only: X-Forwarded-For is client-controlled unless a trusted proxy rewrites it.
    return request.META.get("REMOTE_ADDR") or None


def actor_from_request(request: Any, *, tenant: Tenant | None = None) -> ActorContext:
    """Build the context of an API request (``request.auth`` is the ApiKey) or an admin request."""
    api_key = getattr(request, "auth", None)
    user = getattr(request, "user", None)
    if api_key is not None:
        tenant = api_key.membership.tenant
    return ActorContext(
        user=user if user is not None and user.is_authenticated else None,
        tenant=tenant,
        api_key=api_key,
        ip=client_ip(request),
        user_agent=request.META.get("HTTP_USER_AGENT", "")[:512],
        request_id=request_id_of(request),
    )


def system_actor(*, tenant: Tenant | None = None, label: str = "system") -> ActorContext:
    """For operator commands and workers, where no HTTP request exists."""
    return ActorContext(user=None, tenant=tenant, user_agent=label)
