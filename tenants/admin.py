"""Operators' view of tenants, members, keys, policies and the audit trail.

Every change goes through the same services as the API, so the admin writes the same audit rows
and enforces the same policy rules. A new API key is shown once, on the page that answers its
creation, and never stored or shown again.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from scaiecho_site import errors
from tenants.context import actor_from_request
from tenants.models import (
    ApiKey,
    AuditEvent,
    Membership,
    PermissionGrant,
    Tenant,
    TenantBudget,
    TenantPolicy,
    UsageRecord,
)
from tenants.selectors import BudgetUsage, UsageTotals, budget_usages, usage_summary
from tenants.services import (
    api_key_issue,
    api_key_revoke,
    audit_record,
    budget_delete,
    budget_save,
    policy_validate,
)


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)
    raw_id_fields = ("user",)
    show_change_link = True


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "tier", "scaiecho_enabled", "created_at")
    list_filter = ("tier", "scaiecho_enabled")
    search_fields = ("slug", "name")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]


class PermissionGrantInline(admin.TabularInline):
    model = PermissionGrant
    extra = 0


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role", "tenant")
    search_fields = ("user__username", "tenant__slug")
    raw_id_fields = ("user",)
    inlines = [PermissionGrantInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("__str__", "tenant", "user", "created_at", "last_used_at", "revoked_at")
    list_filter = ("membership__tenant", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("name", "last_four", "membership__user__username", "membership__tenant__slug")
    # The hash is never shown: not in the list, not on the change page.
    fields = ("membership", "name", "last_four", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("last_four", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke_selected"]

    @admin.display(ordering="membership__tenant__slug")
    def tenant(self, obj: ApiKey) -> Tenant:
        return obj.membership.tenant

    @admin.display(ordering="membership__user__username")
    def user(self, obj: ApiKey) -> Any:
        return obj.membership.user

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        if obj is not None:  # a key's owner never changes; revoke it and issue another
            return ("membership", *self.readonly_fields)
        return self.readonly_fields

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        return ("membership", "name") if obj is None else self.fields

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoke instead: the row keeps the key's history

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        if change:
            obj.save(update_fields=["name"])
            return
        obj._issued_secret = api_key_issue(key=obj, ctx=actor_from_request(request, tenant=obj.membership.tenant))

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "key": obj,
            "secret": obj._issued_secret,
            "title": "API key created",
        }
        response = TemplateResponse(request, "admin/tenants/apikey/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke selected API keys")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = 0
        for key in queryset.select_related("membership__tenant").filter(revoked_at__isnull=True):
            api_key_revoke(key=key, ctx=actor_from_request(request, tenant=key.membership.tenant))
            count += 1
        self.message_user(request, f"Revoked {count} API key(s).", messages.SUCCESS)


class TenantPolicyForm(forms.ModelForm):
    class Meta:
        model = TenantPolicy
        fields = ("tenant", "allowed_backends", "default_backend", "speaker_review_required")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        try:
            policy_validate(
                allowed_backends=cleaned.get("allowed_backends"), default_backend=cleaned.get("default_backend")
            )
        except errors.ValidationError as exc:
            for detail in exc.details or []:
                self.add_error(detail["field"] if detail["field"] in self.fields else None, detail["message"])
        return cleaned


@admin.register(TenantPolicy)
class TenantPolicyAdmin(admin.ModelAdmin):
    form = TenantPolicyForm
    list_display = ("tenant", "allowed_backends", "default_backend", "speaker_review_required", "updated_at")
    list_filter = ("allowed_backends", "default_backend", "speaker_review_required")

    def save_model(self, request: HttpRequest, obj: TenantPolicy, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_record(
            ctx=actor_from_request(request, tenant=obj.tenant),
            action="tenant_policy.update" if change else "tenant_policy.create",
            resource_type="tenant_policy",
            resource_id=str(obj.tenant.pk),
            details={
                "allowed_backends": obj.allowed_backends,
                "default_backend": obj.default_backend,
                "speaker_review_required": obj.speaker_review_required,
                "via": "admin",
            },
        )


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant_slug", "actor_username", "action", "resource_type", "resource_id", "outcome", "request_id")
    list_filter = ("outcome", "action", "tenant_slug", "created_at")
    search_fields = ("actor_username", "request_id", "resource_id", "action")
    date_hierarchy = "created_at"

    def get_readonly_fields(self, request: HttpRequest, obj: AuditEvent | None = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False


def format_money(amount: Decimal) -> str:
    """A cost with at least two and at most six decimals: 0.36, 0.0001, 12.50."""
    text = f"{amount.quantize(Decimal('0.000001')):f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def format_percent(ratio: float | None) -> str:
    """Rounded down, so that a budget reads 100% only once it is used up."""
    if ratio is None:
        return ""
    return f"{math.floor(ratio * 100)}%" if math.isfinite(ratio) else "over a zero limit"


@admin.register(TenantBudget)
class TenantBudgetAdmin(admin.ModelAdmin):
    list_display = (
        "tenant",
        "period",
        "limit_audio_seconds",
        "limit_cost",
        "hard_action",
        "soft_limit_ratio",
        "is_active",
        "usage",
    )
    list_filter = ("tenant", "period", "hard_action", "is_active")
    list_select_related = ("tenant",)
    search_fields = ("tenant__slug", "tenant__name")
    fields = ("tenant", "period", "limit_audio_seconds", "limit_cost", "hard_action", "soft_limit_ratio", "is_active")

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # One usage aggregate per (tenant, period) on the page rather than one per budget; kept on
        # the page's own objects, since this admin instance is shared by concurrent requests.
        for usage in budget_usages(budgets=list(changelist.result_list)):
            usage.budget.period_usage = usage
        return changelist

    @admin.display(description="Used this period")
    def usage(self, obj: TenantBudget) -> str:
        usage: BudgetUsage = getattr(obj, "period_usage", None) or budget_usages(budgets=[obj])[0]
        parts = []
        if obj.limit_audio_seconds is not None:
            parts.append(
                f"{usage.audio_seconds_used:,.1f} / {obj.limit_audio_seconds:,} s ({format_percent(usage.audio_ratio)})"
            )
        if obj.limit_cost is not None:
            parts.append(
                f"{format_money(usage.cost_used)} / {format_money(obj.limit_cost)} ({format_percent(usage.cost_ratio)})"
            )
        return "; ".join(parts)

    def save_model(self, request: HttpRequest, obj: TenantBudget, form: forms.ModelForm, change: bool) -> None:
        budget_save(budget=obj, ctx=actor_from_request(request, tenant=obj.tenant))

    def delete_model(self, request: HttpRequest, obj: TenantBudget) -> None:
        budget_delete(budget=obj, ctx=actor_from_request(request, tenant=obj.tenant))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[TenantBudget]) -> None:
        with transaction.atomic():
            for budget in queryset.select_related("tenant"):
                budget_delete(budget=budget, ctx=actor_from_request(request, tenant=budget.tenant))


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    """Metered usage is evidence for billing: operators read it, nobody edits it here."""

    list_display = (
        "created_at",
        "tenant",
        "user",
        "backend",
        "kind",
        "audio_seconds",
        "latency_ms",
        "cost",
        "reference",
    )
    list_filter = ("tenant", "backend", "kind", "created_at")
    list_select_related = ("tenant", "user")
    search_fields = ("reference", "tenant__slug", "user__username")
    date_hierarchy = "created_at"

    @admin.display(description="Audio (s)", ordering="audio_duration_ms")
    def audio_seconds(self, obj: UsageRecord) -> str:
        return f"{obj.audio_duration_ms / 1000:,.1f}"

    def get_readonly_fields(self, request: HttpRequest, obj: UsageRecord | None = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        summary = path(
            "summary/",
            self.admin_site.admin_view(self.summary_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_summary",
        )
        return [summary, *super().get_urls()]

    def summary_view(self, request: HttpRequest) -> HttpResponse:
        """Totals per tenant for today, this month (UTC) and all time, per backend."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        summaries = usage_summary()
        grand = {name: UsageTotals() for name in ("today", "this_month", "all_time")}
        for summary in summaries:
            for name, totals in grand.items():
                window = getattr(summary, name).total
                totals.add(window.requests, window.audio_ms, window.cost)
        rows = [
            {
                "tenant": summary.tenant,
                "windows": [
                    _window_cells(getattr(summary, name).total, getattr(summary, name).by_backend)
                    for name in ("today", "this_month", "all_time")
                ],
            }
            for summary in summaries
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Usage summary",
            "rows": rows,
            "grand": [_window_cells(grand[name], {}) for name in ("today", "this_month", "all_time")],
        }
        return TemplateResponse(request, "admin/tenants/usagerecord/summary.html", context)


def _window_cells(total: UsageTotals, by_backend: dict[str, UsageTotals]) -> dict[str, Any]:
    return {
        "requests": total.requests,
        "audio_minutes": f"{total.audio_minutes:,.2f}",
        "cost": format_money(total.cost),
        "by_backend": [
            {
                "backend": backend,
                "requests": totals.requests,
                "audio_minutes": f"{totals.audio_minutes:,.2f}",
                "cost": format_money(totals.cost),
            }
            for backend, totals in sorted(by_backend.items())
            if totals.requests
        ],
    }
