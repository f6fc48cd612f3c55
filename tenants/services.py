"""Writes for tenants, keys, policies and the audit trail.

Services do not check permissions: the API view (``tenants.permissions``) or the operator
(admin, management commands) has done so before calling. Each service that changes state owns
its transaction and writes its audit row inside it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterable
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
    Role,
    Tenant,
    TenantBudget,
    TenantPolicy,
    UsageKind,
    UsageRecord,
    api_key_hash,
)
from tenants.selectors import BudgetUsage, budget_usages, budgets_active

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
    price = usage_price_per_audio_minute(backend=backend)
    return (price * Decimal(audio_duration_ms) / Decimal(60_000)).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


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
    ``None`` means unlimited. A stream uses it to decide when to check again.
    """

    usages: tuple[BudgetUsage, ...]

    @property
    def _blocking(self) -> list[BudgetUsage]:
        return [usage for usage in self.usages if usage.budget.hard_action == BudgetAction.BLOCK]

    @property
    def remaining_audio_seconds(self) -> float | None:
        left = [u.remaining_audio_seconds for u in self._blocking if u.remaining_audio_seconds is not None]
        return min(left) if left else None

    @property
    def remaining_cost(self) -> Decimal | None:
        left = [u.remaining_cost for u in self._blocking if u.remaining_cost is not None]
        return min(left) if left else None

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


def budget_check(*, tenant: Tenant, ctx: ActorContext | None = None, now: datetime | None = None) -> BudgetStatus:
    """Refuse work when one of the tenant's active ``block`` budgets is used up.

    Call it before any backend spend (and again during a stream). Raises ``BudgetExceeded``
    (429) naming the period and limit, with ``retry_after`` until the period resets (none for a
    ``total`` budget). A ``notify`` budget over its limit does not block: it logs a warning and
    writes one ``budget.exceeded`` audit row per budget per period; any budget past its soft
    limit writes one ``budget.soft_limit`` row per period. Those rows commit in their own
    (nested) transaction; the caller has checked permissions. ``ctx`` defaults to a system actor.
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
    return BudgetStatus(usages=tuple(usages))


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
