"""Consent custodians' view of the speaker library.

Custodians see enrollments with their consent text, stated purpose and verification scores, play the consent recording in the page,
approve or reject pending reviews with a note, and erase speakers. Every decision goes through
the same services as the API, so it writes the same consent events and audit rows. Embeddings are
never shown: :class:`~speakers.models.SpeakerEmbedding` is not registered and no field shows it.
Consent events and erasure audits are read-only here, as everywhere.

Custody is granted per tenant: a custodian of a tenant is a superuser, or a staff user with the
``speakers.review_consent`` permission whose :class:`~tenants.models.StaffTenant` binding to that
tenant is marked ``consent_custodian``. Like every admin here, these pages are tenant-scoped
(:class:`~tenants.admin.TenantScopedAdmin`): another tenant's speaker answers 404, and a
custodian of tenant A cannot review, play or erase tenant B's speakers.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from scaiecho_site import errors
from speakers.models import ConsentEvent, ErasureAudit, Speaker
from speakers.services import recording_read, speaker_erase, speaker_review
from speech.audio import sniff_extension
from tenants.admin import TenantScopedAdmin, custodian_tenant_ids
from tenants.context import actor_from_request
from tenants.services import audit_record

REVIEW_PERMISSION = "speakers.review_consent"
_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg", "m4a": "audio/mp4"}


class ReviewForm(forms.Form):
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")], widget=forms.RadioSelect)
    note = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}), required=False, max_length=2000)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("decision") == "reject" and not cleaned.get("note", "").strip():
            self.add_error("note", "Say why the consent is rejected.")
        return cleaned


class PendingReviewFilter(admin.SimpleListFilter):
    title = "consent review"
    parameter_name = "review"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("pending", "Waiting for review")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Speaker]) -> QuerySet[Speaker]:
        if self.value() == "pending":
            return queryset.filter(status=Speaker.Status.PENDING_REVIEW)
        return queryset


def is_custodian(request: HttpRequest, *, tenant_id: Any = None) -> bool:
    """Whether this admin user is a consent custodian of ``tenant_id`` (of any tenant when ``None``)."""
    if not request.user.has_perm(REVIEW_PERMISSION):
        return False
    tenants = custodian_tenant_ids(request)
    if tenants is None:
        return True
    return tenant_id in tenants if tenant_id is not None else bool(tenants)


@admin.register(Speaker)
class SpeakerAdmin(TenantScopedAdmin):
    list_display = ("display_name_or_tombstone", "tenant", "status", "stage", "created_at", "verified_at", "erased_at")
    list_filter = (PendingReviewFilter, "status", "tenant")
    search_fields = ("display_name", "id")
    date_hierarchy = "created_at"
    change_form_template = "admin/speakers/speaker/change_form.html"
    fields = (
        "id", "tenant", "display_name", "description", "language_primary", "status", "stage",
        "status_reasons", "verification", "attempts", "created_by", "created_at", "updated_at",
        "verified_at", "erased_at",
    )  # fmt: skip
    readonly_fields = fields

    @admin.display(description="display name", ordering="display_name")
    def display_name_or_tombstone(self, obj: Speaker) -> str:
        return obj.display_name or f"(erased {obj.pk})"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # enrollment needs the speaker's recordings and consent: the API takes them

    def has_delete_permission(self, request: HttpRequest, obj: Speaker | None = None) -> bool:
        return False  # a plain delete would skip the erasure audit; "Erase" goes through the service

    def has_change_permission(self, request: HttpRequest, obj: Speaker | None = None) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if not is_custodian(request):
            actions.pop("erase_selected", None)
        return actions

    actions = ["erase_selected"]

    @admin.action(description="Erase selected speakers (destroys voice data)")
    def erase_selected(self, request: HttpRequest, queryset: QuerySet[Speaker]) -> None:
        # The changelist's queryset holds only this user's tenants; custody is checked per speaker,
        # for all of them before any is erased, so a mixed selection erases nothing.
        speakers = list(queryset.select_related("tenant").exclude(status=Speaker.Status.ERASED))
        for speaker in speakers:
            self._require_custodian(request, speaker)
        with transaction.atomic():
            for speaker in speakers:
                speaker_erase(ctx=actor_from_request(request, tenant=speaker.tenant), speaker_id=speaker.pk, via="admin")
        count = len(speakers)
        self.message_user(request, f"Erased {count} speaker(s).", messages.SUCCESS)

    # --- custodian pages ---------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path("<uuid:speaker_id>/review/", view(self.review_view), name="speakers_speaker_review"),
            path("<uuid:speaker_id>/erase/", view(self.erase_view), name="speakers_speaker_erase"),
            path(
                "<uuid:speaker_id>/recording/<str:which>/",
                view(self.recording_view),
                name="speakers_speaker_recording",
            ),
            *super().get_urls(),
        ]

    def _require_custodian(self, request: HttpRequest, speaker: Speaker) -> None:
        if not is_custodian(request, tenant_id=speaker.tenant_id):
            raise PermissionDenied

    def _speaker(self, request: HttpRequest, speaker_id: Any) -> Speaker:
        """The speaker, if this user's tenant scope holds it; another tenant's is not found."""
        speaker = self.get_queryset(request).select_related("tenant", "consent").filter(pk=speaker_id).first()
        if speaker is None:
            raise Http404("No such speaker.")
        return speaker

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None) -> HttpResponse:
        speaker = self._speaker(request, object_id)
        context = {
            **(extra_context or {}),
            "speaker": speaker,
            "consent": getattr(speaker, "consent", None),
            "events": ConsentEvent.objects.filter(speaker_id=speaker.pk),
            "is_custodian": is_custodian(request, tenant_id=speaker.tenant_id),
            "review_form": ReviewForm(),
        }
        return super().change_view(request, object_id, form_url, extra_context=context)

    def review_view(self, request: HttpRequest, speaker_id: Any) -> HttpResponse:
        speaker = self._speaker(request, speaker_id)
        self._require_custodian(request, speaker)
        change_url = reverse("admin:speakers_speaker_change", args=[speaker.pk])
        if request.method != "POST":
            return HttpResponseRedirect(change_url)
        form = ReviewForm(request.POST)
        if not form.is_valid():
            for field, problems in form.errors.items():
                self.message_user(request, f"{field}: {' '.join(problems)}", messages.ERROR)
            return HttpResponseRedirect(change_url)
        try:
            speaker_review(
                ctx=actor_from_request(request, tenant=speaker.tenant),
                speaker_id=speaker.pk,
                approve=form.cleaned_data["decision"] == "approve",
                note=form.cleaned_data["note"],
            )
        except errors.ValidationError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return HttpResponseRedirect(change_url)
        self.message_user(request, f"Consent {form.cleaned_data['decision']}d.", messages.SUCCESS)
        return HttpResponseRedirect(change_url)

    def erase_view(self, request: HttpRequest, speaker_id: Any) -> HttpResponse:
        speaker = self._speaker(request, speaker_id)
        self._require_custodian(request, speaker)
        if request.method == "POST":
            speaker_erase(ctx=actor_from_request(request, tenant=speaker.tenant), speaker_id=speaker.pk, via="admin")
            self.message_user(request, "The speaker was erased: embedding and recordings destroyed.", messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:speakers_speaker_change", args=[speaker.pk]))
        context = {**self.admin_site.each_context(request), "speaker": speaker, "opts": self.model._meta, "title": "Erase speaker"}
        return TemplateResponse(request, "admin/speakers/speaker/erase_confirm.html", context)

    def recording_view(self, request: HttpRequest, speaker_id: Any, which: str) -> HttpResponse:
        """Stream one decrypted recording to a custodian; the playback is audited, never cached."""
        speaker = self._speaker(request, speaker_id)
        self._require_custodian(request, speaker)
        consent = getattr(speaker, "consent", None)
        name = {"consent": getattr(consent, "consent_path", ""), "reference": getattr(consent, "reference_path", "")}.get(which)
        if not name:
            raise Http404("No such recording (erased, or never stored).")
        data = recording_read(name=name)
        audit_record(
            ctx=actor_from_request(request, tenant=speaker.tenant),
            action="speaker.recording_played",
            resource_type="speaker",
            resource_id=str(speaker.pk),
            details={"recording": which, "via": "admin"},
        )
        response = HttpResponse(data, content_type=_AUDIO_TYPES.get(sniff_extension(data), "application/octet-stream"))
        response["Cache-Control"] = "no-store"
        response["Content-Disposition"] = "inline"
        return response


class ReadOnlyAdmin(TenantScopedAdmin):
    tenant_lookup = "tenant_id"  # the append-only trails copy the tenant id: they outlive the tenant

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        return {}


@admin.register(ConsentEvent)
class ConsentEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "kind", "speaker_id", "actor_username", "request_id")
    list_filter = ("kind", "created_at")
    search_fields = ("speaker_id", "actor_username", "request_id")
    readonly_fields = ("created_at", "tenant_id", "speaker_id", "kind", "actor_id", "actor_username", "api_key_id", "request_id", "details")


@admin.register(ErasureAudit)
class ErasureAuditAdmin(ReadOnlyAdmin):
    list_display = ("erased_at", "speaker_id", "tenant_slug", "actor_username", "via", "request_id")
    list_filter = ("via", "erased_at")
    search_fields = ("speaker_id", "tenant_slug", "actor_username", "request_id")
    readonly_fields = (
        "erased_at", "tenant_id", "tenant_slug", "speaker_id", "actor_id", "actor_username", "api_key_id",
        "via", "request_id", "destroyed",
    )  # fmt: skip
