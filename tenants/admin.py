"""Operators' view of tenants, members, keys, policies and the audit trail.

Every change goes through the same services as the API, so the admin writes the same audit rows
and enforces the same policy rules. A new API key is shown once, on the page that answers its
creation, and never stored or shown again.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from scaiecho_site import errors
from tenants.context import actor_from_request
from tenants.models import ApiKey, AuditEvent, Membership, PermissionGrant, Tenant, TenantPolicy
from tenants.services import api_key_issue, api_key_revoke, audit_record, policy_validate


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
        fields = ("tenant", "allowed_backends", "default_backend")

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
    list_display = ("tenant", "allowed_backends", "default_backend", "updated_at")
    list_filter = ("allowed_backends", "default_backend")

    def save_model(self, request: HttpRequest, obj: TenantPolicy, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_record(
            ctx=actor_from_request(request, tenant=obj.tenant),
            action="tenant_policy.update" if change else "tenant_policy.create",
            resource_type="tenant_policy",
            resource_id=str(obj.tenant.pk),
            details={"allowed_backends": obj.allowed_backends, "default_backend": obj.default_backend, "via": "admin"},
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
