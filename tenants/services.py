"""Writes for tenants, keys, policies and the audit trail.

Services do not check permissions: the API view (``tenants.permissions``) or the operator
(admin, management commands) has done so before calling. Each service that changes state owns
its transaction and writes its audit row inside it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string

from scaiecho_site import errors
from tenants.context import ActorContext, system_actor
from tenants.models import (
    API_KEY_PREFIX,
    ApiKey,
    AuditEvent,
    Backend,
    BudgetAction,
    Membership,
    PermissionGrant,
    Role,
    StaffTenant,
    Tenant,
    TenantBudget,
    TenantPolicy,
    UsageKind,
    UsageRecord,
    api_key_hash,
)
from tenants.selectors import BudgetUsage, Reservation, budget_usages, budgets_active
from tenants.webhooks import destination_problem, secret_generate, secret_seal

logger = logging.getLogger(__name__)

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


# --- Audit of operators' admin changes -------------------------------------------------------------
# One function per event type. The admin calls them in save_model / delete_model / save_formset /
# its actions, inside the transaction of the change (Django's admin wraps its change and delete
# views in one; actions open their own).


def audit_tenant_saved(*, ctx: ActorContext, tenant: Tenant, created: bool, module_before: bool | None) -> AuditEvent | None:
    """A tenant created, or its ScaiEcho module switched on or off; other edits are not audited."""
    if created:
        action, details = "tenant.create", {"scaiecho_enabled": tenant.scaiecho_enabled, "tier": tenant.tier}
    elif module_before is not None and module_before != tenant.scaiecho_enabled:
        action = "tenant.module_enable" if tenant.scaiecho_enabled else "tenant.module_disable"
        details = {"module": "scaiecho", "before": module_before, "after": tenant.scaiecho_enabled}
    else:
        return None
    return audit_record(
        ctx=ctx, tenant=tenant, action=action, resource_type="tenant", resource_id=str(tenant.pk), details={**details, "via": "admin"}
    )


def audit_tenant_deleted(*, ctx: ActorContext, tenant: Tenant) -> AuditEvent:
    return audit_record(
        ctx=ctx, tenant=tenant, action="tenant.delete", resource_type="tenant", resource_id=str(tenant.pk), details={"via": "admin"}
    )


def audit_membership_saved(*, ctx: ActorContext, membership: Membership, role_before: str | None) -> AuditEvent | None:
    """A member added (``role_before`` None) or their role changed; nothing when the role stayed."""
    return _audit_binding_saved(
        ctx=ctx, binding=membership, changed_action="membership.role_change", before=role_before, after=membership.role
    )


def audit_membership_deleted(*, ctx: ActorContext, membership: Membership) -> AuditEvent:
    return _audit_binding(ctx=ctx, binding=membership, action="membership.delete", details={"role": membership.role})


def audit_grant_added(*, ctx: ActorContext, grant: PermissionGrant) -> AuditEvent:
    return _audit_grant(ctx=ctx, grant=grant, action="permission_grant.create")


def audit_grant_removed(*, ctx: ActorContext, grant: PermissionGrant) -> AuditEvent:
    return _audit_grant(ctx=ctx, grant=grant, action="permission_grant.delete")


def audit_grant_changed(*, ctx: ActorContext, grant: PermissionGrant, permission_before: str) -> AuditEvent | None:
    if permission_before == grant.permission:
        return None
    return _audit_grant(ctx=ctx, grant=grant, action="permission_grant.update", before=permission_before)


def _audit_grant(*, ctx: ActorContext, grant: PermissionGrant, action: str, before: str | None = None) -> AuditEvent:
    membership = grant.membership
    details: dict[str, Any] = {
        "username": membership.user.get_username(),
        "membership": membership.pk,
        "permission": grant.permission,
        "via": "admin",
    }
    if before is not None:
        details["before"] = before
    return audit_record(
        ctx=ctx, tenant=membership.tenant, action=action, resource_type="permission_grant", resource_id=str(grant.pk), details=details
    )


def audit_api_key_renamed(*, ctx: ActorContext, key: ApiKey, name_before: str) -> AuditEvent | None:
    if name_before == key.name:
        return None
    return audit_record(
        ctx=ctx,
        tenant=key.membership.tenant,
        action="api_key.rename",
        resource_type="api_key",
        resource_id=str(key.pk),
        details={"before": name_before, "after": key.name, "via": "admin"},
    )


def audit_staff_tenant_saved(*, ctx: ActorContext, binding: StaffTenant, custodian_before: bool | None) -> AuditEvent | None:
    """A staff user bound to a tenant (``custodian_before`` None), or their custodian grant changed."""
    return _audit_binding_saved(
        ctx=ctx,
        binding=binding,
        changed_action="staff_tenant.custodian_change",
        before=custodian_before,
        after=binding.consent_custodian,
        after_key="consent_custodian",
    )


def audit_staff_tenant_deleted(*, ctx: ActorContext, binding: StaffTenant) -> AuditEvent:
    details = {"consent_custodian": binding.consent_custodian}
    return _audit_binding(ctx=ctx, binding=binding, action="staff_tenant.delete", details=details)


def _audit_binding_saved(
    *,
    ctx: ActorContext,
    binding: Membership | StaffTenant,
    changed_action: str,
    before: object | None,
    after: object,
    after_key: str = "after",
) -> AuditEvent | None:
    """A user's binding to a tenant saved in the admin: ``<resource>.create`` when ``before`` is None
    (a new row), ``changed_action`` when the audited field moved; nothing when it stayed."""
    if before is not None and before == after:
        return None
    resource_type = changed_action.partition(".")[0]
    action = f"{resource_type}.create" if before is None else changed_action
    return _audit_binding(ctx=ctx, binding=binding, action=action, details={"before": before, after_key: after})


def _audit_binding(
    *, ctx: ActorContext, binding: Membership | StaffTenant, action: str, details: dict[str, Any]
) -> AuditEvent:
    """One audit row for an operator's admin change to a membership or a staff binding. The action is
    ``<resource_type>.<verb>``; the row names the user, and ``via: admin`` tells it from API changes."""
    return audit_record(
        ctx=ctx,
        tenant=binding.tenant,
        action=action,
        resource_type=action.partition(".")[0],
        resource_id=str(binding.pk),
        details={"username": binding.user.get_username(), **details, "via": "admin"},
    )


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
    *,
    tenant: Tenant,
    ctx: ActorContext,
    allowed_backends: str | None = None,
    default_backend: str | None = None,
    webhook_url: str | None = None,
) -> TenantPolicy:
    """Change the policy (fields left ``None`` keep their value; ``webhook_url=""`` removes the
    default destination) and audit the change."""
    policy_get_or_provision(tenant=tenant)
    policy = TenantPolicy.objects.select_for_update().get(tenant=tenant)
    before = {"allowed_backends": policy.allowed_backends, "default_backend": policy.default_backend}
    if webhook_url is not None:
        before["webhook_url"] = policy.webhook_url
    new_allowed = allowed_backends if allowed_backends is not None else policy.allowed_backends
    new_default = default_backend if default_backend is not None else policy.default_backend
    policy_validate(allowed_backends=new_allowed, default_backend=new_default)
    if webhook_url:
        webhook_url = webhook_destination_accept(policy=policy, url=webhook_url)
    policy.allowed_backends = new_allowed
    policy.default_backend = new_default
    if webhook_url is not None:
        policy.webhook_url = webhook_url
    policy.save(update_fields=["allowed_backends", "default_backend", "webhook_url", "updated_at"])
    tenant.policy = policy
    after = {"allowed_backends": new_allowed, "default_backend": new_default}
    if webhook_url is not None:
        after["webhook_url"] = policy.webhook_url
    audit_record(
        ctx=ctx,
        tenant=tenant,
        action="tenant_policy.update",
        resource_type="tenant_policy",
        resource_id=str(tenant.pk),
        details={"before": before, "after": after},
    )
    return policy


def webhook_destination_accept(*, policy: TenantPolicy, url: str, field: str = "webhook_url") -> str:
    """``url`` when it may receive the tenant's webhooks (:func:`tenants.webhooks.destination_problem`)
    and the tenant has a signing secret to sign them with; else ``VALIDATION_ERROR`` on ``field``."""
    problem = destination_problem(url)
    if problem is None and policy.webhook_secret_encrypted is None:
        problem = "The tenant has no webhook signing secret yet: create one with POST /v1/modules/scaiecho/webhook-secret."
    if problem is not None:
        raise errors.ValidationError(f"The webhook URL is not accepted: {problem}", details=[{"field": field, "message": problem}])
    return url


@transaction.atomic
def webhook_secret_rotate(*, tenant: Tenant, ctx: ActorContext) -> str:
    """Create the tenant's webhook signing secret, or replace it: deliveries from now on are
    signed with the new one only. Returns the secret, which is stored encrypted and never shown
    again. The caller has checked ``scaiecho:admin``; the audit row names no secret."""
    policy_get_or_provision(tenant=tenant)
    policy = TenantPolicy.objects.select_for_update().get(tenant=tenant)
    rotated = policy.webhook_secret_encrypted is not None
    secret = secret_generate()
    policy.webhook_secret_encrypted = secret_seal(secret)
    policy.webhook_secret_created_at = timezone.now()
    policy.save(update_fields=["webhook_secret_encrypted", "webhook_secret_created_at", "updated_at"])
    tenant.policy = policy
    audit_record(
        ctx=ctx,
        tenant=tenant,
        action="webhook_secret.rotate" if rotated else "webhook_secret.create",
        resource_type="webhook_secret",
        resource_id=str(tenant.pk),
    )
    return secret


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


# --- Metering ------------------------------------------------------------------------------------

COST_QUANTUM = Decimal("0.000001")  # UsageRecord.cost has six decimal places


def usage_price_per_audio_minute(*, backend: str) -> Decimal:
    """The configured price (``SCAIECHO_PRICE_PER_AUDIO_MINUTE``) of one audio minute on ``backend``.

    A backend without a valid price is logged and charged nothing: the audio has already been
    transcribed by the time it is metered, and failing then would lose the transcript.
    """
    raw = settings.SCAIECHO_PRICE_PER_AUDIO_MINUTE.get(backend)
    try:
        price = Decimal(str(raw))
    except InvalidOperation:
        price = None
    if raw is None or price is None or not price.is_finite() or price < 0:
        logger.error("No valid price per audio minute for backend %s in SCAIECHO_PRICE_PER_AUDIO_MINUTE: %r", backend, raw)
        return Decimal("0")
    return price


def usage_cost(*, backend: str, audio_duration_ms: int) -> Decimal:
    """The cost of ``audio_duration_ms`` of audio on ``backend``, rounded half up to six places."""
    return _cost_at(price=usage_price_per_audio_minute(backend=backend), audio_ms=audio_duration_ms)


def _cost_at(*, price: Decimal, audio_ms: int) -> Decimal:
    return (price * Decimal(audio_ms) / Decimal(60_000)).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


def usage_record(
    *,
    tenant: Tenant,
    user: Any,
    api_key: ApiKey | None,
    backend: str,
    kind: str,
    audio_duration_ms: int,
    latency_ms: int,
    reference: str,
) -> UsageRecord:
    """Meter one finished transcription (a batch job or a stream session) and price it.

    Call it inside the transaction that completes the job or closes the session. It writes no
    audit row of its own: the transcription it meters is audited by its caller. Idempotent per
    ``(tenant, kind, reference)``: a redelivered job gets the record it already has.
    """
    if backend not in Backend.values:
        raise ValueError(f"Unknown backend {backend!r}.")
    if kind not in UsageKind.values:
        raise ValueError(f"Unknown usage kind {kind!r}.")
    audio_duration_ms = max(0, int(audio_duration_ms))
    values = {
        "user": user,
        "api_key": api_key,
        "backend": backend,
        "audio_duration_ms": audio_duration_ms,
        "latency_ms": max(0, int(latency_ms)),
        "cost": usage_cost(backend=backend, audio_duration_ms=audio_duration_ms),
    }
    if not reference:
        return UsageRecord.objects.create(tenant=tenant, kind=kind, reference="", **values)
    record, _ = UsageRecord.objects.get_or_create(tenant=tenant, kind=kind, reference=reference, defaults=values)
    return record


# --- Budgets -------------------------------------------------------------------------------------

AUDIT_BUDGET_EXCEEDED = "budget.exceeded"
AUDIT_BUDGET_SOFT_LIMIT = "budget.soft_limit"


@dataclass(frozen=True)
class BudgetStatus:
    """What ``budget_check`` found: every active budget with its usage, and what is left.

    The remaining allowance counts only ``block`` budgets (``notify`` budgets never stop work);
    ``None`` means unlimited. What ``held`` reserves for unfinished work is taken off it. A
    stream uses it to decide when to check again.
    """

    usages: tuple[BudgetUsage, ...]
    held: Reservation = Reservation()

    @property
    def _blocking(self) -> list[BudgetUsage]:
        return [usage for usage in self.usages if usage.budget.hard_action == BudgetAction.BLOCK]

    @property
    def remaining_audio_seconds(self) -> float | None:
        left = [u.remaining_audio_seconds for u in self._blocking if u.remaining_audio_seconds is not None]
        return max(0.0, min(left) - self.held.audio_ms / 1000) if left else None

    @property
    def remaining_cost(self) -> Decimal | None:
        left = [u.remaining_cost for u in self._blocking if u.remaining_cost is not None]
        return max(Decimal("0"), min(left) - self.held.cost) if left else None

    def remaining_audio_seconds_on(self, *, backend: str) -> float | None:
        """Audio seconds left on ``backend``: the audio limits and the cost limits at its price."""
        candidates = []
        if self.remaining_audio_seconds is not None:
            candidates.append(self.remaining_audio_seconds)
        price = usage_price_per_audio_minute(backend=backend)
        if self.remaining_cost is not None and price > 0:
            candidates.append(float(self.remaining_cost / price * 60))
        return min(candidates) if candidates else None

    @property
    def notified(self) -> list[BudgetUsage]:
        """``notify`` budgets over their limit (allowed to go on, but someone has been told)."""
        return [u for u in self.usages if u.exceeded and u.budget.hard_action == BudgetAction.NOTIFY]


def _budget_limits_text(budget: TenantBudget) -> str:
    limits = []
    if budget.limit_audio_seconds is not None:
        limits.append(f"{budget.limit_audio_seconds} audio seconds")
    if budget.limit_cost is not None:
        limits.append(f"a cost of {budget.limit_cost.normalize():f}")
    return " and ".join(limits)


def _budget_audit_details(usage: BudgetUsage) -> dict[str, Any]:
    budget = usage.budget
    return {
        "period": budget.period,
        "period_start": usage.period_start.isoformat() if usage.period_start else None,
        "hard_action": budget.hard_action,
        "limit_audio_seconds": budget.limit_audio_seconds,
        "limit_cost": str(budget.limit_cost) if budget.limit_cost is not None else None,
        "soft_limit_ratio": str(budget.soft_limit_ratio),
        "audio_seconds_used": usage.audio_seconds_used,
        "cost_used": str(usage.cost_used),
    }


def _budget_audit_once(*, usage: BudgetUsage, action: str, ctx: ActorContext, tenant: Tenant) -> bool:
    """Write ``action`` for this budget once per period; True when this call wrote it.

    The audit trail itself is the memory: a row of this budget since the period began (or since
    the budget was last edited, which re-arms it) means it was already said. The budget's row
    lock makes concurrent checks agree on who writes.
    """
    budget = usage.budget
    since = max(usage.period_start, budget.updated_at) if usage.period_start else budget.updated_at
    earlier = AuditEvent.objects.filter(
        action=action, resource_type="tenant_budget", resource_id=str(budget.pk), created_at__gte=since
    )
    if earlier.exists():
        return False
    with transaction.atomic():
        TenantBudget.objects.select_for_update().filter(pk=budget.pk).first()
        if earlier.exists():
            return False
        audit_record(
            ctx=ctx,
            tenant=tenant,
            action=action,
            resource_type="tenant_budget",
            resource_id=str(budget.pk),
            details=_budget_audit_details(usage),
        )
    return True


def budget_check(
    *, tenant: Tenant, ctx: ActorContext | None = None, now: datetime | None = None, held: Reservation | None = None
) -> BudgetStatus:
    """Refuse work when one of the tenant's active ``block`` budgets is used up.

    Call it before any backend spend (and again during a stream). Raises ``BudgetExceeded``
    (429) naming the period and limit, with ``retry_after`` until the period resets (none for a
    ``total`` budget). A ``notify`` budget over its limit does not block: it logs a warning and
    writes one ``budget.exceeded`` audit row per budget per period; any budget past its soft
    limit writes one ``budget.soft_limit`` row per period. Those rows commit in their own
    (nested) transaction; the caller has checked permissions. ``ctx`` defaults to a system actor.
    ``held`` (what the tenant's unfinished work has reserved) is taken off what the status says
    is left; only finished usage decides whether a budget is used up.
    """
    now = now or timezone.now()
    ctx = ctx or system_actor(tenant=tenant, label="budget_check")
    usages = budget_usages(budgets=list(budgets_active(tenant=tenant)), now=now)
    for usage in usages:
        budget = usage.budget
        if usage.soft_limit_reached:
            _budget_audit_once(usage=usage, action=AUDIT_BUDGET_SOFT_LIMIT, ctx=ctx, tenant=tenant)
        if usage.exceeded and _budget_audit_once(usage=usage, action=AUDIT_BUDGET_EXCEEDED, ctx=ctx, tenant=tenant):
            logger.warning(
                "Tenant %s is over its %s budget %s (%s; used %.1f audio seconds, cost %s); action: %s",
                tenant.slug,
                budget.period,
                budget.pk,
                _budget_limits_text(budget),
                usage.audio_seconds_used,
                usage.cost_used,
                budget.hard_action,
            )

    blocking = [u for u in usages if u.exceeded and u.budget.hard_action == BudgetAction.BLOCK]
    if blocking:
        # Name the budget that stays exhausted longest: waiting for any other would not help.
        usage = max(blocking, key=lambda u: u.period_end or datetime.max.replace(tzinfo=now.tzinfo))
        budget = usage.budget
        if usage.period_end is None:
            raise errors.BudgetExceeded(
                f"The tenant's total budget of {_budget_limits_text(budget)} is used up; it does not reset."
            )
        retry_after = max(1, math.ceil((usage.period_end - now).total_seconds()))
        raise errors.BudgetExceeded(
            f"The tenant's {budget.period} budget of {_budget_limits_text(budget)} is used up; "
            f"it resets at {usage.period_end:%Y-%m-%dT%H:%M:%SZ}.",
            retry_after=retry_after,
        )
    return BudgetStatus(usages=tuple(usages), held=held or Reservation())


def budget_reserve(
    *,
    tenant: Tenant,
    audio_ms: int | None,
    longest_ms: int,
    backends: Sequence[str],
    held: Callable[[], Reservation],
    now: datetime | None = None,
) -> Reservation:
    """Admit work of ``audio_ms`` on one of ``backends`` against the tenant's ``block`` budgets,
    counting what the tenant's unfinished work already holds, and return the reservation the
    caller stores with the new work, in this same transaction. Raises ``BudgetExceeded`` (429)
    when it does not fit in what is left; writes nothing itself.

    ``audio_ms`` ``None`` means the length is not known yet (the container does not say): the
    work then holds what is left, at most ``longest_ms``, until it knows. The cost held is the
    audio at the highest price among ``backends``, since the one used is resolved later.

    Call it inside the caller's ``transaction.atomic()``: it locks the tenant's active blocking
    budget rows (``SELECT ... FOR UPDATE``), so the admissions of one tenant take turns until the
    transaction that stores the reservation commits, and none of them can count what another is
    about to take. ``held`` is called once that lock is held: the reservations live with the work
    in a higher layer (transcription's unfinished jobs), which this layer may not import, so the
    caller passes the read in. A tenant without blocking budgets locks nothing.
    """
    now = now or timezone.now()
    price = max((usage_price_per_audio_minute(backend=backend) for backend in backends), default=Decimal("0"))
    blocking = list(budgets_active(tenant=tenant).filter(hard_action=BudgetAction.BLOCK).select_for_update(of=("self",)))
    if not blocking:
        wanted_ms = longest_ms if audio_ms is None else audio_ms
        return Reservation(audio_ms=wanted_ms, cost=_cost_at(price=price, audio_ms=wanted_ms))
    already = held()
    status = BudgetStatus(usages=tuple(budget_usages(budgets=blocking, now=now)), held=already)
    left_ms: list[float] = []
    if status.remaining_audio_seconds is not None:
        left_ms.append(status.remaining_audio_seconds * 1000)
    if status.remaining_cost is not None and price > 0:
        left_ms.append(float(status.remaining_cost / price) * 60_000)
    allowance_ms = math.floor(min(left_ms)) if left_ms else None
    holding = f" ({already.audio_ms / 1000:.1f} s are held by unfinished jobs)" if already.audio_ms else ""
    if allowance_ms is not None and allowance_ms <= 0:
        raise errors.BudgetExceeded(f"Nothing is left of the tenant's budget{holding}.")
    if audio_ms is None:
        wanted_ms = longest_ms if allowance_ms is None else min(longest_ms, allowance_ms)
    elif allowance_ms is not None and audio_ms > allowance_ms:
        raise errors.BudgetExceeded(
            f"The audio is {audio_ms / 1000:.1f} s long; {allowance_ms / 1000:.1f} s of the budget are left{holding}."
        )
    else:
        wanted_ms = audio_ms
    return Reservation(audio_ms=wanted_ms, cost=_cost_at(price=price, audio_ms=wanted_ms))


@transaction.atomic
def budget_save(*, budget: TenantBudget, ctx: ActorContext) -> TenantBudget:
    """Create or change a budget and audit it. The operator (admin) has checked permissions."""
    created = budget._state.adding
    budget.full_clean()
    budget.save()
    audit_record(
        ctx=ctx,
        tenant=budget.tenant,
        action="tenant_budget.create" if created else "tenant_budget.update",
        resource_type="tenant_budget",
        resource_id=str(budget.pk),
        details={
            "period": budget.period,
            "limit_audio_seconds": budget.limit_audio_seconds,
            "limit_cost": str(budget.limit_cost) if budget.limit_cost is not None else None,
            "hard_action": budget.hard_action,
            "soft_limit_ratio": str(budget.soft_limit_ratio),
            "is_active": budget.is_active,
        },
    )
    return budget


@transaction.atomic
def budget_delete(*, budget: TenantBudget, ctx: ActorContext) -> None:
    """Delete a budget and audit it. The operator (admin) has checked permissions."""
    budget_id = budget.pk
    audit_record(
        ctx=ctx,
        tenant=budget.tenant,
        action="tenant_budget.delete",
        resource_type="tenant_budget",
        resource_id=str(budget_id),
        details={"period": budget.period, "hard_action": budget.hard_action},
    )
    budget.delete()
