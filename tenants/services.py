"""Writes for tenants, keys, policies and the audit trail.

Services do not check permissions: the API view (``tenants.permissions``) or the operator
(admin, management commands) has done so before calling. Each service that changes state owns
its transaction and writes its audit row inside it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string

from scaiecho_site import errors
from tenants.context import ActorContext
from tenants.models import (
    ApiKey,
    AuditEvent,
    Backend,
    Membership,
    Role,
    Tenant,
    TenantPolicy,
)

API_KEY_PREFIX = "sgk_"
API_KEY_RANDOM_BYTES = 32  # 43 URL-safe characters

VALID_ALLOWED_BACKENDS = ("A", "B", "AB", "BA")
VALID_BACKENDS = ("A", "B")
BACKEND_PREFERENCES = ("prefer_self_hosted", "prefer_relay", "any")


# --- Audit ---------------------------------------------------------------------------------------


def audit_record(
    *,
    ctx: ActorContext,
    action: str,
    outcome: str = AuditEvent.Outcome.SUCCESS,
    resource_type: str = "",
    resource_id: str = "",
    details: dict[str, Any] | None = None,
    tenant: Tenant | None = None,
) -> AuditEvent:
    """Append one audit row. Call it inside the transaction of the change it records."""
    tenant = tenant or ctx.tenant
    user = ctx.user
    return AuditEvent.objects.create(
        tenant_id=tenant.pk if tenant else None,
        tenant_slug=tenant.slug if tenant else "",
        actor_id=user.pk if user is not None else None,
        actor_username=user.get_username() if user is not None else ctx.user_agent[:150],
        api_key_id=ctx.api_key.pk if ctx.api_key else None,
        action=action,
        resource_type=resource_type,
        resource_id=str(resource_id),
        ip=ctx.ip,
        user_agent=ctx.user_agent,
        outcome=outcome,
        request_id=ctx.request_id,
        details=details or {},
    )


def audit_permission_denied(*, ctx: ActorContext, action: str, reason: str) -> AuditEvent:
    return audit_record(ctx=ctx, action=action, outcome=AuditEvent.Outcome.FAILURE, details={"reason": reason})


# --- Tenants and members -------------------------------------------------------------------------


@transaction.atomic
def membership_ensure(*, tenant_slug: str, username: str, role: str, ctx: ActorContext) -> Membership:
    """Create the tenant, user and membership when missing; set the role. For operators."""
    if role not in Role.values:
        raise errors.ValidationError(details=[{"field": "role", "message": f"Must be one of {', '.join(Role.values)}."}])
    tenant, tenant_created = Tenant.objects.get_or_create(slug=tenant_slug, defaults={"name": tenant_slug})
    user_model = get_user_model()
    user, user_created = user_model.objects.get_or_create(**{user_model.USERNAME_FIELD: username})
    if user_created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    membership, created = Membership.objects.get_or_create(tenant=tenant, user=user, defaults={"role": role})
    if not created and membership.role != role:
        membership.role = role
        membership.save(update_fields=["role"])
        created = True
    if tenant_created or created:
        audit_record(
            ctx=ctx,
            tenant=tenant,
            action="membership.ensure",
            resource_type="membership",
            resource_id=str(membership.pk),
            details={"username": username, "role": role, "tenant_created": tenant_created},
        )
    return membership


# --- API keys ------------------------------------------------------------------------------------


def api_key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_generate() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_RANDOM_BYTES)


@transaction.atomic
def api_key_issue(*, key: ApiKey, ctx: ActorContext) -> str:
    """Give an unsaved ``ApiKey`` its secret, save it, and return the secret: shown once, never stored."""
    raw_key = api_key_generate()
    key.key_hash = api_key_hash(raw_key)
    key.last_four = raw_key[-4:]
    key.save()
    audit_record(
        ctx=ctx,
        tenant=key.membership.tenant,
        action="api_key.create",
        resource_type="api_key",
        resource_id=str(key.pk),
        details={"name": key.name, "user": key.membership.user.get_username(), "role": key.membership.role},
    )
    return raw_key


def api_key_create(*, membership: Membership, name: str = "", ctx: ActorContext) -> tuple[ApiKey, str]:
    key = ApiKey(membership=membership, name=name)
    return key, api_key_issue(key=key, ctx=ctx)


@transaction.atomic
def api_key_revoke(*, key: ApiKey, ctx: ActorContext) -> ApiKey:
    """Revoke at once: authentication reads ``revoked_at`` on every request, nothing caches it."""
    key = ApiKey.objects.select_for_update().select_related("membership__tenant").get(pk=key.pk)
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        audit_record(
            ctx=ctx,
            tenant=key.membership.tenant,
            action="api_key.revoke",
            resource_type="api_key",
            resource_id=str(key.pk),
        )
    return key


def api_key_touch(*, key: ApiKey) -> None:
    """Record a use at most once per interval, so a busy key does not write on every request."""
    now = timezone.now()
    interval = timedelta(seconds=settings.SCAIECHO_KEY_LAST_USED_INTERVAL_SECONDS)
    if key.last_used_at is not None and now - key.last_used_at < interval:
        return
    stale_before = now - interval
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale_before)
    if ApiKey.objects.filter(stale, pk=key.pk).update(last_used_at=now):
        key.last_used_at = now


# --- Tenant policy -------------------------------------------------------------------------------


def policy_validate(*, allowed_backends: Any, default_backend: Any) -> None:
    """The contract's rules, shared by the API and the admin. Raises ``ValidationError``."""
    details = []
    if allowed_backends not in VALID_ALLOWED_BACKENDS:
        details.append({"field": "allowed_backends", "message": "Must be one of A, B, AB, BA."})
    if default_backend not in VALID_BACKENDS:
        details.append({"field": "default_backend", "message": "Must be A or B."})
    if not details and default_backend not in allowed_backends:
        details.append(
            {"field": "default_backend", "message": f"Must be one of the allowed backends ({allowed_backends})."}
        )
    if details:
        raise errors.ValidationError("The tenant policy is not valid.", details=details)


def policy_tier_defaults(*, tier: str) -> tuple[str, str]:
    table = settings.SCAIECHO_TIER_POLICY_DEFAULTS
    allowed, default = table.get(tier) or table.get("default") or ("AB", "B")
    return allowed, default


def policy_get_or_provision(*, tenant: Tenant) -> TenantPolicy:
    """The tenant's policy; a tenant without one gets its tier's defaults on first use."""
    try:
        return tenant.policy
    except TenantPolicy.DoesNotExist:
        pass
    allowed, default = policy_tier_defaults(tier=tenant.tier)
    try:
        with transaction.atomic():
            policy = TenantPolicy.objects.create(tenant=tenant, allowed_backends=allowed, default_backend=default)
    except IntegrityError:  # another request provisioned it first
        policy = TenantPolicy.objects.get(tenant=tenant)
    tenant.policy = policy
    return policy


@transaction.atomic
def policy_update(
    *, tenant: Tenant, ctx: ActorContext, allowed_backends: str | None = None, default_backend: str | None = None
) -> TenantPolicy:
    """Change the policy (fields left ``None`` keep their value) and audit the change."""
    policy_get_or_provision(tenant=tenant)
    policy = TenantPolicy.objects.select_for_update().get(tenant=tenant)
    before = {"allowed_backends": policy.allowed_backends, "default_backend": policy.default_backend}
    new_allowed = allowed_backends if allowed_backends is not None else policy.allowed_backends
    new_default = default_backend if default_backend is not None else policy.default_backend
    policy_validate(allowed_backends=new_allowed, default_backend=new_default)
    policy.allowed_backends = new_allowed
    policy.default_backend = new_default
    policy.save(update_fields=["allowed_backends", "default_backend", "updated_at"])
    tenant.policy = policy
    audit_record(
        ctx=ctx,
        tenant=tenant,
        action="tenant_policy.update",
        resource_type="tenant_policy",
        resource_id=str(tenant.pk),
        details={"before": before, "after": {"allowed_backends": new_allowed, "default_backend": new_default}},
    )
    return policy


def backend_candidates(*, allowed_backends: str, default_backend: str, preference: str) -> list[str]:
    """The order in which backends are tried. The preference never widens the allowed set."""
    if preference == "prefer_self_hosted":
        order = ["A", "B"]
    elif preference == "prefer_relay":
        order = ["B", "A"]
    else:  # "any": the default first, then the rest of the allowed set in letter order
        order = [default_backend, *sorted(set(allowed_backends) - {default_backend})]
    return [backend for backend in order if backend in allowed_backends]


def backend_available(backend: str) -> bool:
    """Ask the configured availability check (``SCAIECHO_BACKEND_AVAILABILITY_CHECKS``)."""
    check: Callable[[], bool] = import_string(settings.SCAIECHO_BACKEND_AVAILABILITY_CHECKS[backend])
    return bool(check())


def policy_resolve_backend(
    *,
    policy: TenantPolicy,
    preference: str = "any",
    is_available: Callable[[str], bool] = backend_available,
) -> str:
    """The contract's resolution: the first available backend in preference order, or 502."""
    if preference not in BACKEND_PREFERENCES:
        raise errors.ValidationError(
            details=[{"field": "backend_preference", "message": f"Must be one of {', '.join(BACKEND_PREFERENCES)}."}]
        )
    candidates: Iterable[str] = backend_candidates(
        allowed_backends=policy.allowed_backends, default_backend=policy.default_backend, preference=preference
    )
    for backend in candidates:
        if is_available(backend):
            return Backend(backend).value
    raise errors.BackendUnavailable(
        f"None of the backends this tenant allows ({policy.allowed_backends}) is available."
    )
