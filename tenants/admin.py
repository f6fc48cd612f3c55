"""Operators' view of tenants, members, keys, policies and the audit trail.

Every change goes through the same services as the API, so the admin writes the same audit rows
and enforces the same policy rules; changes the API cannot make (members' roles, grants, key
names, the module switch, staff bindings) write their own audit rows in the admin's transaction.
A new API key is shown once, on the page that answers its creation, and never stored or shown again.

Staff are scoped to tenants: every ModelAdmin of every app derives from
:class:`TenantScopedAdmin`, which shows a staff user only the rows of the tenants a
:class:`~tenants.models.StaffTenant` binds them to (superusers see all), limits foreign-key
choices and list filters to those tenants, refuses to save a row into another tenant, and answers
404 for another tenant's object URLs. Only superusers bind staff to tenants.
"""

from __future__ import annotations

import math
import uuid
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import NotRelationField, get_fields_from_path, unquote
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.db import models, transaction
from django.db.models import QuerySet
from django.forms.models import BaseModelFormSet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from scaiecho_site import errors
from tenants.context import actor_from_request
from tenants.models import (
    ApiKey,
    AuditEvent,
    Membership,
    PermissionGrant,
    StaffTenant,
    Tenant,
    TenantBudget,
    TenantPolicy,
    UsageRecord,
)
from tenants.selectors import BudgetUsage, UsageTotals, budget_usages, usage_summary
from tenants.services import (
    api_key_issue,
    api_key_revoke,
    audit_api_key_renamed,
    audit_grant_added,
    audit_grant_changed,
    audit_grant_removed,
    audit_membership_deleted,
    audit_membership_saved,
    audit_record,
    audit_staff_tenant_deleted,
    audit_staff_tenant_saved,
    audit_tenant_deleted,
    audit_tenant_saved,
    budget_delete,
    budget_save,
    policy_validate,
)

# --- Tenant scope ----------------------------------------------------------------------------------

_SCOPE_CACHE = "_scaiecho_staff_tenant_ids"
_CUSTODIAN_CACHE = "_scaiecho_custodian_tenant_ids"


def staff_tenant_ids(request: HttpRequest) -> frozenset[uuid.UUID] | None:
    """The tenants this admin user may see; ``None`` means every tenant (superusers)."""
    if not hasattr(request, _SCOPE_CACHE):
        user = request.user
        if user.is_active and user.is_superuser:
            ids = None
        elif user.is_active and user.is_staff:
            ids = frozenset(StaffTenant.objects.filter(user=user).values_list("tenant_id", flat=True))
        else:
            ids = frozenset()
        setattr(request, _SCOPE_CACHE, ids)
    return getattr(request, _SCOPE_CACHE)


def custodian_tenant_ids(request: HttpRequest) -> frozenset[uuid.UUID] | None:
    """The tenants whose bindings make this user a consent custodian; ``None``: every tenant
    (superusers). The caller also checks the ``speakers.review_consent`` model permission."""
    if not hasattr(request, _CUSTODIAN_CACHE):
        user = request.user
        if user.is_active and user.is_superuser:
            ids = None
        elif user.is_active and user.is_staff:
            bindings = StaffTenant.objects.filter(user=user, consent_custodian=True)
            ids = frozenset(bindings.values_list("tenant_id", flat=True))
        else:
            ids = frozenset()
        setattr(request, _CUSTODIAN_CACHE, ids)
    return getattr(request, _CUSTODIAN_CACHE)


# How a row of each model reaches its tenant, for models the admin offers as foreign-key choices.
# Any other model with a ``tenant`` field is scoped through it.
_TENANT_LOOKUPS: dict[type[models.Model], str] = {
    Tenant: "pk",
    Membership: "tenant",
    ApiKey: "membership__tenant",
    PermissionGrant: "membership__tenant",
}


def _tenant_lookup_of(model: type[models.Model]) -> str | None:
    if model in _TENANT_LOOKUPS:
        return _TENANT_LOOKUPS[model]
    try:
        model._meta.get_field("tenant")
    except FieldDoesNotExist:
        return None
    return "tenant"


def _tenant_id_of(obj: models.Model, lookup: str) -> Any:
    """Follow ``lookup`` (``pk``, ``tenant``, ``tenant_id``, ``membership__tenant``) to a tenant id."""
    if lookup == "pk":
        return obj.pk
    *path, last = lookup.split("__")
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return getattr(obj, last if last.endswith("_id") else f"{last}_id", None)


class TenantScopeMixin:
    """Tenant scope for a ModelAdmin or an inline; see the module docstring.

    ``tenant_lookup`` is the path from the model to its tenant (``tenant``, ``tenant_id`` for the
    append-only trails that copy the id, ``membership__tenant``, ``pk`` for Tenant itself);
    ``None`` marks rows that hold no tenant's data (the speech workers): the model permissions
    alone decide who sees them.
    """

    tenant_lookup: str | None = "tenant"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request)
        ids = staff_tenant_ids(request)
        if ids is None or self.tenant_lookup is None:
            return queryset
        field = self.tenant_lookup if self.tenant_lookup.endswith("_id") or self.tenant_lookup == "pk" else f"{self.tenant_lookup}_id"
        return queryset.filter(**{f"{field}__in": ids})

    def in_tenant_scope(self, request: HttpRequest, obj: models.Model | None) -> bool:
        ids = staff_tenant_ids(request)
        # An inline is asked about its parent row, which the parent's admin has scoped already.
        if ids is None or obj is None or self.tenant_lookup is None or not isinstance(obj, self.model):
            return True
        return _tenant_id_of(obj, self.tenant_lookup) in ids

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_view_permission(request, obj) and self.in_tenant_scope(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and self.in_tenant_scope(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_delete_permission(request, obj) and self.in_tenant_scope(request, obj)

    def formfield_for_foreignkey(self, db_field: models.ForeignKey, request: HttpRequest, **kwargs: Any) -> Any:
        ids = staff_tenant_ids(request)
        lookup = _tenant_lookup_of(db_field.related_model)
        if ids is not None and lookup is not None and "queryset" not in kwargs:
            field = lookup if lookup == "pk" else f"{lookup}_id"
            kwargs["queryset"] = db_field.related_model._default_manager.filter(**{f"{field}__in": ids})
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class TenantScopedAdmin(TenantScopeMixin, admin.ModelAdmin):
    """The base of every ModelAdmin: tenant scope on lists, pages, forms, filters and actions."""

    def get_list_filter(self, request: HttpRequest) -> Any:
        filters = super().get_list_filter(request)
        if staff_tenant_ids(request) is None:
            return filters
        # A related-field filter lists every row of the related model (every tenant's slug):
        # offer only the values found in the rows this user may see.
        scoped = []
        for entry in filters:
            if isinstance(entry, str):
                try:
                    is_relation = get_fields_from_path(self.model, entry)[-1].is_relation
                except (FieldDoesNotExist, NotRelationField):
                    is_relation = False
                if is_relation:
                    entry = (entry, admin.RelatedOnlyFieldListFilter)
            scoped.append(entry)
        return scoped

    def _visible_or_404(self, request: HttpRequest, object_id: str | None) -> None:
        # Django redirects a missing object's URL to the index; another tenant's row must not be
        # told apart from one that does not exist, and both answer 404.
        if object_id is not None and self.get_object(request, unquote(object_id)) is None:
            raise Http404("No such object.")

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None) -> HttpResponse:
        self._visible_or_404(request, object_id)
        return super().change_view(request, object_id, form_url, extra_context)

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        self._visible_or_404(request, object_id)
        return super().delete_view(request, object_id, extra_context)

    def history_view(self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        self._visible_or_404(request, object_id)
        return super().history_view(request, object_id, extra_context)

    def save_form(self, request: HttpRequest, form: forms.ModelForm, change: bool) -> Any:
        obj = super().save_form(request, form, change)
        if not self.in_tenant_scope(request, obj):
            raise PermissionDenied("That row belongs to a tenant outside your scope.")
        return obj

    def save_formset(self, request: HttpRequest, form: forms.ModelForm, formset: BaseModelFormSet, change: bool) -> None:
        """Save inline rows one by one so that role, grant and binding changes are audited."""
        instances = formset.save(commit=False)
        for obj in formset.deleted_objects:
            audit_admin_delete(request, obj)
            obj.delete()
        for obj in instances:
            before = audited_value(obj)
            obj.save()
            audit_admin_save(request, obj, before)
        formset.save_m2m()

    def save_model(self, request: HttpRequest, obj: Any, form: forms.ModelForm, change: bool) -> None:
        before = audited_value(obj)
        super().save_model(request, obj, form, change)
        audit_admin_save(request, obj, before)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        audit_admin_delete(request, obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        # One row at a time, so that each deletion writes its own audit row.
        with transaction.atomic():
            for obj in queryset:
                self.delete_model(request, obj)


class TenantScopedInline(TenantScopeMixin, admin.TabularInline):
    pass


# --- Audit of admin changes --------------------------------------------------------------------

_AUDITED_FIELDS: dict[type[models.Model], str] = {
    Tenant: "scaiecho_enabled",
    Membership: "role",
    PermissionGrant: "permission",
    ApiKey: "name",
    StaffTenant: "consent_custodian",
}
_NEW = object()


def audited_value(obj: models.Model) -> Any:
    """The stored value of the field whose change is audited, read before the save; ``_NEW`` for a new row."""
    field = _AUDITED_FIELDS.get(type(obj))
    if field is None or obj._state.adding:
        return _NEW
    return type(obj)._default_manager.filter(pk=obj.pk).values_list(field, flat=True).first()


def audit_admin_save(request: HttpRequest, obj: models.Model, before: Any) -> None:
    """Write the audit row of an admin save, if the change is one that is audited."""
    ctx = actor_from_request(request)
    created = before is _NEW
    if isinstance(obj, Tenant):
        audit_tenant_saved(ctx=ctx, tenant=obj, created=created, module_before=None if created else before)
    elif isinstance(obj, Membership):
        audit_membership_saved(ctx=ctx, membership=obj, role_before=None if created else before)
    elif isinstance(obj, PermissionGrant):
        if created:
            audit_grant_added(ctx=ctx, grant=obj)
        else:
            audit_grant_changed(ctx=ctx, grant=obj, permission_before=before)
    elif isinstance(obj, ApiKey) and not created:
        audit_api_key_renamed(ctx=ctx, key=obj, name_before=before)
    elif isinstance(obj, StaffTenant):
        audit_staff_tenant_saved(ctx=ctx, binding=obj, custodian_before=None if created else before)


def audit_admin_delete(request: HttpRequest, obj: models.Model) -> None:
    """Write the audit row of an admin delete; call it before the row goes (it needs the pk)."""
    ctx = actor_from_request(request)
    if isinstance(obj, Tenant):
        audit_tenant_deleted(ctx=ctx, tenant=obj)
    elif isinstance(obj, Membership):
        audit_membership_deleted(ctx=ctx, membership=obj)
    elif isinstance(obj, PermissionGrant):
        audit_grant_removed(ctx=ctx, grant=obj)
    elif isinstance(obj, StaffTenant):
        audit_staff_tenant_deleted(ctx=ctx, binding=obj)


class MembershipInline(TenantScopedInline):
    model = Membership
    extra = 0
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)
    raw_id_fields = ("user",)
    show_change_link = True


@admin.register(Tenant)
class TenantAdmin(TenantScopedAdmin):
    tenant_lookup = "pk"
    list_display = ("slug", "name", "tier", "scaiecho_enabled", "created_at")
    list_filter = ("tier", "scaiecho_enabled")
    search_fields = ("slug", "name")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A new tenant would be outside every staff scope: only superusers create tenants.
        return request.user.is_superuser and super().has_add_permission(request)


class PermissionGrantInline(TenantScopedInline):
    model = PermissionGrant
    tenant_lookup = "membership__tenant"
    extra = 0


@admin.register(StaffTenant)
class StaffTenantAdmin(TenantScopedAdmin):
    """Who sees which tenant, and who is its consent custodian: only superusers decide."""

    list_display = ("user", "tenant", "consent_custodian", "created_at")
    list_filter = ("consent_custodian", "tenant")
    search_fields = ("user__username", "tenant__slug")
    raw_id_fields = ("user",)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser


@admin.register(Membership)
class MembershipAdmin(TenantScopedAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role", "tenant")
    search_fields = ("user__username", "tenant__slug")
    raw_id_fields = ("user",)
    inlines = [PermissionGrantInline]


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdmin):
    tenant_lookup = "membership__tenant"
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
            name_before = audited_value(obj)
            obj.save(update_fields=["name"])
            audit_api_key_renamed(ctx=actor_from_request(request, tenant=obj.membership.tenant), key=obj, name_before=name_before)
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
        with transaction.atomic():
            # The changelist's queryset is already limited to this user's tenants.
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
class TenantPolicyAdmin(TenantScopedAdmin):
    form = TenantPolicyForm
    list_display = ("tenant", "allowed_backends", "default_backend", "speaker_review_required", "updated_at")
    list_filter = ("allowed_backends", "default_backend", "speaker_review_required")
    # Set through the API, which checks the destination (PATCH /tenant-policy, POST /webhook-secret).
    readonly_fields = ("webhook_url", "webhook_secret_created_at")

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
class AuditEventAdmin(TenantScopedAdmin):
    tenant_lookup = "tenant_id"  # a plain copy of the id: the trail outlives its tenant
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
class TenantBudgetAdmin(TenantScopedAdmin):
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
class UsageRecordAdmin(TenantScopedAdmin):
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
        scope = staff_tenant_ids(request)
        summaries = [summary for summary in usage_summary() if scope is None or summary.tenant.pk in scope]
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
