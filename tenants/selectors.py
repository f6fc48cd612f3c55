"""Reads for tenants and keys. Tenant scoping lives here so that no view can forget it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from scaiecho_site import errors
from tenants.models import (
    ROLE_PERMISSIONS,
    ApiKey,
    BudgetPeriod,
    Membership,
    Tenant,
    TenantBudget,
    TenantPolicy,
    UsageRecord,
    api_key_hash,
)
from tenants.webhooks import secret_open


def api_key_by_hash(*, key_hash: str) -> ApiKey | None:
    """An active key with its member, user and tenant, or ``None``."""
    return (
        ApiKey.objects.select_related("membership__tenant", "membership__user")
        .filter(key_hash=key_hash, revoked_at__isnull=True)
        .first()
    )


def api_keys_matching(*, reference: str) -> list[ApiKey]:
    """Keys an operator may mean by ``reference``: a full key, a key id, or a unique id prefix."""
    if reference.startswith("sgk_"):
        return list(ApiKey.objects.filter(key_hash=api_key_hash(reference)))
    try:
        return list(ApiKey.objects.filter(pk=uuid.UUID(reference)))
    except ValueError:
        pass
    prefix = reference.lower().replace("-", "")
    if len(prefix) < 6:
        return []
    # UUIDs are stored as 32 hex digits on SQLite and as uuid on PostgreSQL; compare as text.
    candidates = ApiKey.objects.filter(Q(id__startswith=reference.lower()) | Q(id__startswith=prefix))
    return list(candidates[:2])


def membership_permissions(*, membership: Membership) -> frozenset[str]:
    """The role's permissions plus the member's explicit grants."""
    granted = {grant.permission for grant in membership.grants.all()}
    return ROLE_PERMISSIONS.get(membership.role, frozenset()) | granted


def api_keys_of_tenant(*, tenant_id: uuid.UUID) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(membership__tenant_id=tenant_id).select_related("membership__user", "membership__tenant")


def api_key_of_tenant(*, tenant_id: uuid.UUID, key_id: str) -> ApiKey:
    """One key of the tenant; any other id, including another tenant's, is simply not found."""
    try:
        return api_keys_of_tenant(tenant_id=tenant_id).get(pk=uuid.UUID(key_id))
    except (ValueError, ApiKey.DoesNotExist) as exc:
        raise errors.NotFound("No API key with that id in this tenant.") from exc


# --- Usage and budgets ---------------------------------------------------------------------------


def period_bounds(*, period: str, now: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    """The calendar period (UTC) that contains ``now``: ``[start, end)``; ``(None, None)`` for total."""
    now = (now or timezone.now()).astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == BudgetPeriod.DAILY:
        return day, day + timedelta(days=1)
    if period == BudgetPeriod.WEEKLY:
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        return start, start + timedelta(days=7)
    if period == BudgetPeriod.MONTHLY:
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    if period == BudgetPeriod.TOTAL:
        return None, None
    raise ValueError(f"Unknown budget period {period!r}.")


def usage_in_period(*, tenant: Tenant, period: str, now: datetime | None = None) -> tuple[float, Decimal]:
    """The tenant's usage in the period containing ``now``: (audio seconds, cost)."""
    start, end = period_bounds(period=period, now=now)
    records = UsageRecord.objects.filter(tenant=tenant)
    if start is not None:
        records = records.filter(created_at__gte=start, created_at__lt=end)
    totals = records.aggregate(ms=Sum("audio_duration_ms"), cost=Sum("cost"))
    return (totals["ms"] or 0) / 1000, totals["cost"] or Decimal("0")


@dataclass(frozen=True)
class Reservation:
    """Audio, and its cost, that admitted but unfinished work holds against a tenant's budgets
    until the work's usage record replaces it (or the work fails and holds nothing)."""

    audio_ms: int = 0
    cost: Decimal = Decimal("0")


@dataclass(frozen=True)
class BudgetUsage:
    """One budget against the usage of its current period."""

    budget: TenantBudget
    period_start: datetime | None
    period_end: datetime | None
    audio_seconds_used: float
    cost_used: Decimal

    @property
    def audio_ratio(self) -> float | None:
        limit = self.budget.limit_audio_seconds
        if limit is None:
            return None
        if not limit:  # a zero limit is reached at once, and overrun by any use
            return 1.0 if not self.audio_seconds_used else float("inf")
        return self.audio_seconds_used / limit

    @property
    def cost_ratio(self) -> float | None:
        limit = self.budget.limit_cost
        if limit is None:
            return None
        if not limit:
            return 1.0 if not self.cost_used else float("inf")
        return float(self.cost_used / limit)

    @property
    def ratio(self) -> float:
        """The largest fraction of any of the budget's limits used so far (1.0 = reached)."""
        return max(r for r in (self.audio_ratio, self.cost_ratio, 0.0) if r is not None)

    @property
    def exceeded(self) -> bool:
        """A limit is reached: usage equal to the limit already counts, so the next request stops."""
        budget = self.budget
        return (budget.limit_audio_seconds is not None and self.audio_seconds_used >= budget.limit_audio_seconds) or (
            budget.limit_cost is not None and self.cost_used >= budget.limit_cost
        )

    @property
    def soft_limit_reached(self) -> bool:
        return self.ratio >= float(self.budget.soft_limit_ratio)

    @property
    def remaining_audio_seconds(self) -> float | None:
        limit = self.budget.limit_audio_seconds
        return None if limit is None else max(0.0, limit - self.audio_seconds_used)

    @property
    def remaining_cost(self) -> Decimal | None:
        limit = self.budget.limit_cost
        return None if limit is None else max(Decimal("0"), limit - self.cost_used)


def budgets_active(*, tenant: Tenant) -> QuerySet[TenantBudget]:
    return TenantBudget.objects.filter(tenant=tenant, is_active=True).select_related("tenant").order_by("pk")


def budget_usages(*, budgets: list[TenantBudget], now: datetime | None = None) -> list[BudgetUsage]:
    """Each budget with its current period's usage; one aggregate per (tenant, period), not per budget."""
    now = now or timezone.now()
    totals: dict[tuple[object, str], tuple[float, Decimal]] = {}
    usages = []
    for budget in budgets:
        key = (budget.tenant_id, budget.period)
        if key not in totals:
            totals[key] = usage_in_period(tenant=budget.tenant, period=budget.period, now=now)
        start, end = period_bounds(period=budget.period, now=now)
        audio_seconds, cost = totals[key]
        usages.append(
            BudgetUsage(budget=budget, period_start=start, period_end=end, audio_seconds_used=audio_seconds, cost_used=cost)
        )
    return usages


@dataclass
class UsageTotals:
    requests: int = 0
    audio_ms: int = 0
    cost: Decimal = Decimal("0")

    @property
    def audio_minutes(self) -> float:
        return self.audio_ms / 60000

    def add(self, requests: int, audio_ms: int, cost: Decimal) -> None:
        self.requests += requests
        self.audio_ms += audio_ms
        self.cost += cost


@dataclass
class UsageWindow:
    """Totals for one window (today, this month, all time), overall and per backend."""

    total: UsageTotals = field(default_factory=UsageTotals)
    by_backend: dict[str, UsageTotals] = field(default_factory=dict)


@dataclass
class TenantUsageSummary:
    tenant: Tenant
    today: UsageWindow = field(default_factory=UsageWindow)
    this_month: UsageWindow = field(default_factory=UsageWindow)
    all_time: UsageWindow = field(default_factory=UsageWindow)


USAGE_WINDOWS = ("today", "this_month", "all_time")


def usage_summary(*, tenant: Tenant | None = None, now: datetime | None = None) -> list[TenantUsageSummary]:
    """Per tenant: requests, audio and cost today, this month (UTC) and all time, per backend.

    With ``tenant``, exactly one summary (zeros when it has no usage); without, every tenant that
    has usage, by slug. One grouped query.
    """
    now = now or timezone.now()
    day_start, _ = period_bounds(period=BudgetPeriod.DAILY, now=now)
    month_start, _ = period_bounds(period=BudgetPeriod.MONTHLY, now=now)
    windows = {"today": Q(created_at__gte=day_start), "this_month": Q(created_at__gte=month_start), "all_time": Q()}
    aggregates = {}
    for name, condition in windows.items():
        aggregates[f"{name}_requests"] = Count("id", filter=condition)
        aggregates[f"{name}_ms"] = Sum("audio_duration_ms", filter=condition)
        aggregates[f"{name}_cost"] = Sum("cost", filter=condition)
    records = UsageRecord.objects.all() if tenant is None else UsageRecord.objects.filter(tenant=tenant)
    rows = list(records.order_by().values("tenant_id", "backend").annotate(**aggregates))

    summaries: dict[object, TenantUsageSummary] = {}
    if tenant is not None:
        summaries[tenant.pk] = TenantUsageSummary(tenant=tenant)
    tenants = {t.pk: t for t in Tenant.objects.filter(pk__in={row["tenant_id"] for row in rows})}
    for row in rows:
        summary = summaries.setdefault(row["tenant_id"], TenantUsageSummary(tenant=tenants[row["tenant_id"]]))
        for name in USAGE_WINDOWS:
            window: UsageWindow = getattr(summary, name)
            numbers = (row[f"{name}_requests"], row[f"{name}_ms"] or 0, row[f"{name}_cost"] or Decimal("0"))
            window.total.add(*numbers)
            window.by_backend.setdefault(row["backend"], UsageTotals()).add(*numbers)
    return sorted(summaries.values(), key=lambda summary: summary.tenant.slug)


# --- Operations: /metrics and the admin charts -----------------------------------------------------


@dataclass(frozen=True)
class UsageCount:
    """Metered transcriptions of one kind on one backend, and their audio."""

    kind: str
    backend: str
    records: int
    audio_ms: int


def usage_counts() -> list[UsageCount]:
    """Every usage record there is, counted by kind (batch, stream) and backend: one grouped query."""
    rows = UsageRecord.objects.order_by().values("kind", "backend").annotate(n=Count("id"), ms=Sum("audio_duration_ms"))
    return [UsageCount(kind=row["kind"], backend=row["backend"], records=row["n"], audio_ms=row["ms"] or 0) for row in rows]


@dataclass(frozen=True)
class DailyAudio:
    tenant_slug: str
    day: date
    audio_ms: int


def usage_audio_per_day(*, since: datetime, tenant_ids: frozenset[uuid.UUID] | None = None) -> list[DailyAudio]:
    """Audio metered per tenant per UTC day from ``since`` on; ``tenant_ids`` limits it to those
    tenants (``None``: every tenant). One grouped query."""
    records = UsageRecord.objects.filter(created_at__gte=since)
    if tenant_ids is not None:
        records = records.filter(tenant_id__in=tenant_ids)
    rows = (
        records.annotate(day=TruncDate("created_at", tzinfo=UTC))
        .order_by()
        .values("tenant__slug", "day")
        .annotate(ms=Sum("audio_duration_ms"))
        .order_by("day", "tenant__slug")
    )
    return [DailyAudio(tenant_slug=row["tenant__slug"], day=row["day"], audio_ms=row["ms"] or 0) for row in rows]
def webhook_secret_of(*, tenant_id: uuid.UUID) -> str | None:
    """The tenant's webhook signing secret, decrypted, or ``None`` when it has none. For the
    delivery that signs with it: never for an answer to a client."""
    token = TenantPolicy.objects.filter(tenant_id=tenant_id).values_list("webhook_secret_encrypted", flat=True).first()
    return None if token is None else secret_open(token)
