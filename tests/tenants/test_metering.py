"""Metering and tenant budgets: what a transcription costs, and when a tenant's budget stops it."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from scaiecho_site.errors import BudgetExceeded
from tenants.models import AuditEvent, BudgetAction, BudgetPeriod, TenantBudget, UsageKind, UsageRecord
from tenants.selectors import period_bounds, usage_in_period, usage_summary
from tenants.services import budget_check, usage_record
from tests.factories import (
    KeyFactory,
    TenantBudgetFactory,
    TenantFactory,
    UsageRecordFactory,
)

pytestmark = pytest.mark.django_db

# A Wednesday, late in the UTC day: the day resets in 2 hours, the ISO week began on Monday 16th.
NOW = datetime(2026, 3, 18, 22, 0, tzinfo=UTC)


@pytest.fixture
def tenant():
    return TenantFactory(slug="acme")


def audit_rows(action: str, budget: TenantBudget) -> int:
    return AuditEvent.objects.filter(action=action, resource_type="tenant_budget", resource_id=str(budget.pk)).count()


# --- Cost --------------------------------------------------------------------------------------


def test_usage_record_prices_audio_per_backend(tenant):
    issued = KeyFactory.issue(tenant=tenant)
    user = issued.membership.user
    common = {"tenant": tenant, "user": user, "api_key": issued.key, "latency_ms": 800}

    relay = usage_record(backend="B", kind="batch", audio_duration_ms=90_000, reference="job-1", **common)
    own = usage_record(backend="A", kind="stream", audio_duration_ms=90_000, reference="sess-1", **common)

    assert relay.cost == Decimal("0.009000")  # 1.5 minutes at 0.006
    assert own.cost == Decimal("0")  # our own workers are free by default
    stored = UsageRecord.objects.get(pk=relay.pk)
    assert (stored.user, stored.api_key, stored.kind, stored.latency_ms) == (user, issued.key, "batch", 800)


def test_cost_follows_the_configured_prices_and_rounds_half_up(tenant, settings):
    settings.SCAIECHO_PRICE_PER_AUDIO_MINUTE = {"A": "0.001", "B": "0.006"}
    common = {"tenant": tenant, "user": None, "api_key": None, "kind": "batch", "latency_ms": 0}

    assert usage_record(backend="A", audio_duration_ms=60_000, reference="a", **common).cost == Decimal("0.001")
    # 0.006 * 12.345 s / 60 s = 0.0012345 → 0.001235
    assert usage_record(backend="B", audio_duration_ms=12_345, reference="b", **common).cost == Decimal("0.001235")


def test_a_backend_without_a_price_is_logged_and_charged_nothing(tenant, settings, caplog):
    settings.SCAIECHO_PRICE_PER_AUDIO_MINUTE = {"A": "0"}
    with caplog.at_level(logging.ERROR, logger="tenants.services"):
        record = usage_record(
            tenant=tenant, user=None, api_key=None, backend="B", kind="batch", audio_duration_ms=60_000,
            latency_ms=0, reference="job",
        )
    assert record.cost == 0
    assert "SCAIECHO_PRICE_PER_AUDIO_MINUTE" in caplog.text


def test_a_job_is_metered_once_however_often_its_task_runs(tenant):
    kwargs = {
        "tenant": tenant, "user": None, "api_key": None, "backend": "B", "kind": "batch",
        "audio_duration_ms": 30_000, "latency_ms": 10, "reference": "job-42",
    }
    first = usage_record(**kwargs)
    again = usage_record(**kwargs)
    assert again.pk == first.pk
    assert UsageRecord.objects.filter(tenant=tenant).count() == 1
    # A stream session may share an id string with a job without colliding.
    usage_record(**{**kwargs, "kind": UsageKind.STREAM})
    assert UsageRecord.objects.filter(tenant=tenant).count() == 2


def test_unknown_backend_or_kind_is_a_programming_error(tenant):
    common = {"tenant": tenant, "user": None, "api_key": None, "audio_duration_ms": 1, "latency_ms": 0, "reference": ""}
    with pytest.raises(ValueError, match="backend"):
        usage_record(backend="C", kind="batch", **common)
    with pytest.raises(ValueError, match="kind"):
        usage_record(backend="A", kind="realtime", **common)


# --- Usage in a period -------------------------------------------------------------------------


def test_usage_counts_only_the_current_calendar_period(tenant):
    # Durations are powers of two so that each sum names exactly which records counted.
    for when, seconds in [
        (datetime(2026, 3, 18, 0, 0, tzinfo=UTC), 1),  # today, first instant
        (datetime(2026, 3, 17, 23, 59, 59, tzinfo=UTC), 2),  # yesterday
        (datetime(2026, 3, 15, 23, 59, 59, tzinfo=UTC), 4),  # Sunday: the previous ISO week
        (datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC), 8),  # last month
        (datetime(2024, 1, 1, tzinfo=UTC), 16),  # long ago
    ]:
        UsageRecordFactory(tenant=tenant, created_at=when, audio_duration_ms=seconds * 1000)
    UsageRecordFactory(audio_duration_ms=1_000_000, created_at=NOW)  # another tenant's

    assert usage_in_period(tenant=tenant, period="daily", now=NOW)[0] == 1
    assert usage_in_period(tenant=tenant, period="weekly", now=NOW)[0] == 1 + 2
    assert usage_in_period(tenant=tenant, period="monthly", now=NOW)[0] == 1 + 2 + 4
    assert usage_in_period(tenant=tenant, period="total", now=NOW)[0] == 1 + 2 + 4 + 8 + 16
    audio, cost = usage_in_period(tenant=tenant, period="monthly", now=NOW)
    assert cost == Decimal("0.000700")  # 7 s on B at 0.006 per minute


def test_period_bounds_are_utc_calendar_periods():
    new_year_eve = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    assert period_bounds(period="monthly", now=new_year_eve) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds(period="weekly", now=new_year_eve) == (  # Thursday → Monday 28th
        datetime(2026, 12, 28, tzinfo=UTC),
        datetime(2027, 1, 4, tzinfo=UTC),
    )
    # 01:30 in UTC+02:00 is still the previous UTC day.
    local = datetime(2026, 3, 18, 1, 30, tzinfo=timezone.get_fixed_timezone(120))
    assert period_bounds(period="daily", now=local)[0] == datetime(2026, 3, 17, tzinfo=UTC)
    assert period_bounds(period="total", now=local) == (None, None)


# --- Blocking budgets --------------------------------------------------------------------------


def test_a_block_budget_at_its_limit_refuses_with_429_and_retry_after(tenant):
    TenantBudgetFactory(tenant=tenant, period=BudgetPeriod.DAILY, limit_audio_seconds=60)
    UsageRecordFactory(tenant=tenant, audio_duration_ms=60_000, created_at=NOW - timedelta(hours=1))

    with pytest.raises(BudgetExceeded) as caught:
        budget_check(tenant=tenant, now=NOW)

    error = caught.value
    assert (error.http_status, error.code) == (429, "BUDGET_EXCEEDED")
    assert "daily" in error.message
    assert "60 audio seconds" in error.message
    assert error.retry_after == 2 * 3600  # until midnight UTC
    assert error.as_error_body()["retry_after"] == 7200


def test_a_block_budget_just_under_its_limit_lets_work_through(tenant):
    TenantBudgetFactory(tenant=tenant, period=BudgetPeriod.DAILY, limit_audio_seconds=60)
    UsageRecordFactory(tenant=tenant, audio_duration_ms=59_000, created_at=NOW - timedelta(hours=1))
    UsageRecordFactory(tenant=tenant, audio_duration_ms=600_000, created_at=NOW - timedelta(days=1))  # yesterday

    status = budget_check(tenant=tenant, now=NOW)

    assert status.remaining_audio_seconds == pytest.approx(1.0)
    assert status.remaining_audio_seconds_on(backend="B") == pytest.approx(1.0)


def test_a_cost_budget_counts_money_not_seconds(tenant):
    # 0.006 buys one minute on B; A is free, so audio on A never touches this budget.
    TenantBudgetFactory(tenant=tenant, period=BudgetPeriod.MONTHLY, limit_audio_seconds=None, limit_cost="0.006")
    UsageRecordFactory(tenant=tenant, backend="A", audio_duration_ms=3_600_000, created_at=NOW)
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=59_000, created_at=NOW)

    status = budget_check(tenant=tenant, now=NOW)
    assert status.remaining_cost == Decimal("0.000100")
    assert status.remaining_audio_seconds is None
    assert status.remaining_audio_seconds_on(backend="B") == pytest.approx(1.0)
    assert status.remaining_audio_seconds_on(backend="A") is None  # free: no limit applies

    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=1_000, created_at=NOW)
    with pytest.raises(BudgetExceeded) as caught:
        budget_check(tenant=tenant, now=NOW)
    assert "monthly" in caught.value.message
    assert "a cost of 0.006" in caught.value.message
    assert caught.value.retry_after == int((datetime(2026, 4, 1, tzinfo=UTC) - NOW).total_seconds())


def test_a_total_budget_counts_all_time_and_gives_no_retry_after(tenant):
    TenantBudgetFactory(tenant=tenant, period=BudgetPeriod.TOTAL, limit_audio_seconds=100)
    UsageRecordFactory(tenant=tenant, audio_duration_ms=60_000, created_at=datetime(2024, 1, 1, tzinfo=UTC))
    UsageRecordFactory(tenant=tenant, audio_duration_ms=40_000, created_at=NOW)

    with pytest.raises(BudgetExceeded) as caught:
        budget_check(tenant=tenant, now=NOW)
    assert "total" in caught.value.message
    assert caught.value.retry_after is None


def test_a_zero_budget_stops_everything_and_reads_over_in_the_admin(admin_client, tenant):
    TenantBudgetFactory(tenant=tenant, limit_audio_seconds=0)
    with pytest.raises(BudgetExceeded):
        budget_check(tenant=tenant, now=NOW)
    UsageRecordFactory(tenant=tenant, audio_duration_ms=1_000)
    assert "1.0 / 0 s (over a zero limit)" in admin_client.get("/admin/tenants/tenantbudget/").content.decode()


def test_every_active_budget_applies_and_the_longest_wait_is_named(tenant):
    TenantBudgetFactory(tenant=tenant, period=BudgetPeriod.DAILY, limit_audio_seconds=3600)
    TenantBudgetFactory(tenant=tenant, period=BudgetPeriod.MONTHLY, limit_audio_seconds=100)
    UsageRecordFactory(tenant=tenant, audio_duration_ms=100_000, created_at=NOW - timedelta(days=2))

    with pytest.raises(BudgetExceeded) as caught:
        budget_check(tenant=tenant, now=NOW)
    assert "monthly" in caught.value.message


def test_inactive_budgets_are_ignored(tenant):
    budget = TenantBudgetFactory(tenant=tenant, limit_audio_seconds=10, is_active=False)
    UsageRecordFactory(tenant=tenant, audio_duration_ms=60_000, created_at=NOW)

    status = budget_check(tenant=tenant, now=NOW)

    assert status.remaining_audio_seconds is None
    assert audit_rows("budget.exceeded", budget) == audit_rows("budget.soft_limit", budget) == 0


def test_other_tenants_budgets_and_usage_do_not_count(tenant):
    other = TenantFactory()
    TenantBudgetFactory(tenant=other, limit_audio_seconds=10)
    UsageRecordFactory(tenant=other, audio_duration_ms=60_000, created_at=NOW)  # other is blocked
    TenantBudgetFactory(tenant=tenant, limit_audio_seconds=100)
    UsageRecordFactory(tenant=other, audio_duration_ms=500_000, created_at=NOW)

    assert budget_check(tenant=tenant, now=NOW).remaining_audio_seconds == 100
    with pytest.raises(BudgetExceeded):
        budget_check(tenant=other, now=NOW)


# --- Notify budgets and the soft limit ---------------------------------------------------------


def test_a_notify_budget_never_blocks_and_is_audited_once_per_period(tenant, caplog):
    budget = TenantBudgetFactory(tenant=tenant, limit_audio_seconds=60, hard_action=BudgetAction.NOTIFY)
    UsageRecordFactory(tenant=tenant, audio_duration_ms=120_000, created_at=NOW)

    with caplog.at_level(logging.WARNING, logger="tenants.services"):
        for _ in range(4):
            status = budget_check(tenant=tenant, now=NOW)

    assert [usage.budget for usage in status.notified] == [budget]
    assert status.remaining_audio_seconds is None  # notify budgets do not limit the remaining allowance
    assert audit_rows("budget.exceeded", budget) == 1
    row = AuditEvent.objects.get(action="budget.exceeded", resource_id=str(budget.pk))
    assert (row.tenant_id, row.details["period"], row.details["audio_seconds_used"]) == (tenant.pk, "daily", 120.0)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING and "acme" in r.getMessage()]) == 1


def test_the_soft_limit_is_audited_once_and_only_once_crossed(tenant):
    budget = TenantBudgetFactory(tenant=tenant, limit_audio_seconds=100)  # soft limit at 80 s
    UsageRecordFactory(tenant=tenant, audio_duration_ms=79_000, created_at=NOW)
    budget_check(tenant=tenant, now=NOW)
    assert audit_rows("budget.soft_limit", budget) == 0

    UsageRecordFactory(tenant=tenant, audio_duration_ms=1_000, created_at=NOW)
    for _ in range(3):
        budget_check(tenant=tenant, now=NOW)
    assert audit_rows("budget.soft_limit", budget) == 1
    assert audit_rows("budget.exceeded", budget) == 0


def test_a_custom_soft_limit_ratio(tenant):
    budget = TenantBudgetFactory(tenant=tenant, limit_audio_seconds=100, soft_limit_ratio=Decimal("0.50"))
    UsageRecordFactory(tenant=tenant, audio_duration_ms=50_000, created_at=NOW)
    budget_check(tenant=tenant, now=NOW)
    assert audit_rows("budget.soft_limit", budget) == 1


def test_a_budget_needs_a_limit():
    with pytest.raises(Exception, match="budget_has_a_limit"):
        TenantBudgetFactory(limit_audio_seconds=None, limit_cost=None)


# --- Summary -----------------------------------------------------------------------------------


def test_usage_summary_per_tenant_and_backend(tenant):
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=60_000, created_at=NOW)
    UsageRecordFactory(tenant=tenant, backend="A", audio_duration_ms=30_000, created_at=NOW - timedelta(hours=21))
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=120_000, created_at=NOW - timedelta(days=3))
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=60_000, created_at=datetime(2025, 5, 1, tzinfo=UTC))
    quiet = TenantFactory(slug="quiet")

    [summary] = usage_summary(tenant=tenant, now=NOW)

    assert (summary.today.total.requests, summary.today.total.audio_minutes) == (2, 1.5)
    assert summary.today.total.cost == Decimal("0.006")
    assert (summary.this_month.total.requests, summary.this_month.total.audio_minutes) == (3, 3.5)
    assert summary.all_time.total.requests == 4
    assert summary.all_time.by_backend["B"].cost == Decimal("0.024")
    assert summary.all_time.by_backend["A"].audio_minutes == 0.5
    [empty] = usage_summary(tenant=quiet, now=NOW)
    assert empty.all_time.total.requests == 0
    assert [s.tenant.slug for s in usage_summary(now=NOW)] == ["acme"]


# --- Admin -------------------------------------------------------------------------------------


def test_usage_records_are_read_only_in_the_admin(admin_client, tenant):
    record = UsageRecordFactory(tenant=tenant)
    assert admin_client.get("/admin/tenants/usagerecord/add/").status_code == 403
    assert admin_client.get(f"/admin/tenants/usagerecord/{record.pk}/delete/").status_code == 403
    detail = admin_client.get(f"/admin/tenants/usagerecord/{record.pk}/change/")
    assert detail.status_code == 200
    assert 'name="_save"' not in detail.content.decode()
    listing = admin_client.get("/admin/tenants/usagerecord/", {"backend": "B", "tenant__id__exact": str(tenant.pk)})
    assert listing.status_code == 200
    page = listing.content.decode()
    assert record.reference in page
    assert "Delete selected" not in page
    assert "/admin/tenants/usagerecord/summary/" in page  # the summary is linked from the list


def test_admin_adds_a_budget_and_refuses_one_without_limits(admin_client, tenant):
    form = {
        "tenant": tenant.pk, "period": "monthly", "limit_audio_seconds": "", "limit_cost": "",
        "hard_action": "block", "soft_limit_ratio": "0.80", "is_active": "on",
    }
    refused = admin_client.post("/admin/tenants/tenantbudget/add/", form)
    assert refused.status_code == 200
    assert "Set a limit in audio seconds, a cost limit, or both." in refused.content.decode()
    assert not TenantBudget.objects.exists()

    response = admin_client.post("/admin/tenants/tenantbudget/add/", {**form, "limit_cost": "12.50"})
    assert response.status_code == 302
    budget = TenantBudget.objects.get(tenant=tenant)
    assert (budget.period, budget.limit_cost, budget.limit_audio_seconds) == ("monthly", Decimal("12.5"), None)
    assert AuditEvent.objects.filter(
        action="tenant_budget.create", resource_id=str(budget.pk), actor_username="admin"
    ).exists()

    # The budget added in the admin is the one the service enforces.
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=60 * 60_000)  # an hour: 0.36
    assert budget_check(tenant=tenant).remaining_cost == Decimal("12.14")


def test_budget_list_shows_usage_against_each_limit(admin_client, tenant):
    TenantBudgetFactory(tenant=tenant, period=BudgetPeriod.TOTAL, limit_audio_seconds=120, limit_cost="0.0240")
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=30_000)  # 0.003

    page = admin_client.get("/admin/tenants/tenantbudget/").content.decode()

    assert "30.0 / 120 s (25%)" in page
    assert "0.003 / 0.024 (12%)" in page


def test_summary_page_shows_totals_per_tenant(admin_client, tenant):
    now = timezone.now()
    month_start, _ = period_bounds(period="monthly", now=now)
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=90_000, created_at=now)  # 0.009
    UsageRecordFactory(tenant=tenant, backend="A", audio_duration_ms=30_000, created_at=now)
    UsageRecordFactory(tenant=tenant, backend="B", audio_duration_ms=600_000, created_at=month_start - timedelta(days=1))
    UsageRecordFactory(tenant=TenantFactory(slug="zeta"), backend="B", audio_duration_ms=60_000, created_at=now)

    response = admin_client.get("/admin/tenants/usagerecord/summary/")

    assert response.status_code == 200
    page = response.content.decode()
    acme = re.search(r'<tr class="tenant-row" data-tenant="acme">(.*?)</tr>', page, re.S).group(1)
    cells = [re.sub(r"<.*?>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", acme, re.S)]
    # today: 2 requests, 2 minutes, 0.009 | this month: the same | all time: 3, 12 minutes, 0.069
    assert cells == ["2", "2.00", "0.009", "2", "2.00", "0.009", "3", "12.00", "0.069"]
    total = re.search(r'<tr class="total-row">(.*?)</tr>', page, re.S).group(1)
    assert re.findall(r"<td[^>]*>(.*?)</td>", total)[-3:] == ["4", "13.00", "0.075"]
    assert "B: 1 req, 1.50 min, 0.009" in page
