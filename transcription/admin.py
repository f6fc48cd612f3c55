"""Operators' read-only view of transcription jobs and the speech workers that run them.

Jobs are records (the result and the metering reference), so the admin never adds, edits or
deletes them. Audio is never shown: only the staged object's name while the job still needs it.
The changelist opens with a dashboard: backlog, live workers, the last day's outcomes, and charts
of the last 30 days (``transcription.charts``: audio per tenant, outcomes, latency percentiles).
Each job's webhook deliveries show every attempt (status code or error, duration, next retry).
Staff bound to tenants see their tenants' jobs, deliveries and numbers only (:class:`~tenants.admin.TenantScopedAdmin`);
the workers serve every tenant and hold no tenant's data, so every staff user with the view
permission sees them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import SEARCH_VAR
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.safestring import SafeString

from tenants.admin import TenantScopedAdmin, TenantScopedInline, staff_tenant_ids
from tenants.selectors import usage_audio_per_day
from transcription import charts
from transcription.models import SpeechWorker, TranscriptionJob, WebhookAttempt, WebhookDelivery
from transcription.selectors import job_latency_per_day, jobs_by_outcome, queue_backlog


class ReadOnlyAdmin(TenantScopedAdmin):
    """Rows written only by services and workers: viewable, never added, changed or deleted here."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class HasErrorFilter(admin.SimpleListFilter):
    title = "has error"
    parameter_name = "has_error"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[TranscriptionJob]) -> QuerySet[TranscriptionJob]:
        if self.value() == "yes":
            return queryset.exclude(error_code="")
        if self.value() == "no":
            return queryset.filter(error_code="")
        return queryset


class ErrorCodeFilter(admin.SimpleListFilter):
    """The error codes that actually occur, rather than a free-text field filter."""

    title = "error code"
    parameter_name = "error_code"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        codes = (
            model_admin.get_queryset(request)  # only the codes of jobs this user may see
            .exclude(error_code="")
            .order_by("error_code")
            .values_list("error_code", flat=True)
            .distinct()
        )
        return [(code, code) for code in codes]

    def queryset(self, request: HttpRequest, queryset: QuerySet[TranscriptionJob]) -> QuerySet[TranscriptionJob]:
        if self.value():
            return queryset.filter(error_code=self.value())
        return queryset


CHART_DAYS = 30


def dashboard_charts(
    *, now: Any, jobs: QuerySet[TranscriptionJob], tenant_ids: frozenset[uuid.UUID] | None
) -> dict[str, charts.Chart]:
    """The last ``CHART_DAYS`` UTC days (today included): audio minutes per day per tenant from
    the usage records, jobs by outcome and the daily latency percentiles from ``jobs``."""
    days = charts.last_days(today=now.astimezone(UTC).date(), count=CHART_DAYS)
    since = datetime.combine(days[0], time.min, tzinfo=UTC)
    return {
        "audio": charts.audio_minutes_chart(rows=usage_audio_per_day(since=since, tenant_ids=tenant_ids), days=days),
        "outcomes": charts.outcome_chart(counts=jobs_by_outcome(jobs=jobs, since=since)),
        "latency": charts.latency_chart(rows=job_latency_per_day(jobs=jobs, since=since), days=days),
    }


def transcription_dashboard(
    *, now: Any = None, jobs: QuerySet[TranscriptionJob] | None = None, tenant_ids: frozenset[uuid.UUID] | None = None
) -> dict[str, Any]:
    """What an operator checks first: is work piling up, who is taking it, how did the day go,
    and the last 30 days in charts.

    With ``jobs`` (a tenant-scoped queryset) and ``tenant_ids`` (the staff user's tenants), the
    numbers are those jobs' and tenants' only.
    """
    now = now or timezone.now()
    day_ago = now - timedelta(hours=24)
    scoped = jobs is not None
    jobs = TranscriptionJob.objects.all() if jobs is None else jobs
    oldest = (
        jobs.filter(status=TranscriptionJob.Status.QUEUED)
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    finished = jobs.filter(completed_at__gte=day_ago)
    if scoped:
        waiting = (TranscriptionJob.Status.QUEUED, TranscriptionJob.Status.RUNNING)
        backlog = {status: jobs.filter(status=status).count() for status in waiting}
    else:
        backlog = queue_backlog()
    return {
        "backlog": backlog,
        "workers": list(SpeechWorker.objects.filter(expires_at__gt=now).order_by("kind", "worker_id")),
        "completed_24h": finished.filter(status=TranscriptionJob.Status.COMPLETED).count(),
        "failed_24h": finished.filter(status=TranscriptionJob.Status.FAILED).count(),
        "oldest_queued_age_s": int((now - oldest).total_seconds()) if oldest else None,
        "charts": dashboard_charts(now=now, jobs=jobs, tenant_ids=tenant_ids if scoped else None),
        "chart_days": CHART_DAYS,
    }


@admin.register(TranscriptionJob)
class TranscriptionJobAdmin(ReadOnlyAdmin):
    list_display = (
        "id", "tenant", "user", "status", "backend_used", "audio_duration", "error_code", "created_at", "completed_at",
    )
    list_filter = ("status", "backend_used", "tenant", ErrorCodeFilter, HasErrorFilter, "is_async", "source")
    list_select_related = ("tenant", "user")
    search_fields = ("=id", "tenant__slug", "user__username", "=audio_sha256")
    date_hierarchy = "created_at"
    fieldsets = (
        (None, {"fields": ("id", "tenant", "user", "api_key", "source", "is_async", "status", "status_reason", "error_code")}),
        ("Request", {"fields": ("backend_preference", "language_hint", "temperature", "word_timestamps", "prompt")}),
        ("Audio", {"fields": ("audio_sha256", "audio_bytes", "audio_ext", "staged_audio")}),
        ("Result", {"fields": ("backend_used", "language_detected", "audio_duration", "transcript_view")}),
        ("Run", {"fields": ("attempts", "worker_id", "created_at", "started_at", "completed_at")}),
    )
    readonly_fields = tuple(field for _, options in fieldsets for field in options["fields"])

    def get_search_fields(self, request: HttpRequest) -> tuple[str, ...]:
        # An exact id lookup with a term that is not a UUID would raise, so offer it only for UUIDs.
        try:
            uuid.UUID(request.GET.get(SEARCH_VAR, "").strip())
        except ValueError:
            return tuple(field for field in self.search_fields if field != "=id")
        return self.search_fields

    @admin.display(description="audio (s)", ordering="audio_duration_ms")
    def audio_duration(self, job: TranscriptionJob) -> str:
        if job.audio_duration_ms is None:
            return "-"
        return f"{job.audio_duration_ms / 1000:.1f}"

    @admin.display(description="staged audio")
    def staged_audio(self, job: TranscriptionJob) -> str:
        if job.is_terminal:
            return "audio deleted after completion"
        return job.staged_path or "-"

    @admin.display(description="transcript")
    def transcript_view(self, job: TranscriptionJob) -> SafeString | str:
        if not job.transcript and not job.segments:
            return "-"
        return SafeString(
            render_to_string(
                "admin/transcription/transcriptionjob/transcript.html",
                {"transcript": job.transcript, "segments": job.segments or []},
            )
        )

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        tenant_ids = staff_tenant_ids(request)
        jobs = None if tenant_ids is None else self.get_queryset(request)
        dashboard = transcription_dashboard(jobs=jobs, tenant_ids=tenant_ids)
        return super().changelist_view(request, {**(extra_context or {}), "dashboard": dashboard})


class AliveFilter(admin.SimpleListFilter):
    title = "heartbeat"
    parameter_name = "alive"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "Alive"), ("no", "Expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[SpeechWorker]) -> QuerySet[SpeechWorker]:
        if self.value() == "yes":
            return queryset.filter(expires_at__gt=timezone.now())
        if self.value() == "no":
            return queryset.filter(expires_at__lte=timezone.now())
        return queryset


@admin.register(SpeechWorker)
class SpeechWorkerAdmin(ReadOnlyAdmin):
    tenant_lookup = None  # the workers serve every tenant and hold no tenant's data
    list_display = ("worker_id", "kind", "hostname", "model_name", "device", "started_at", "last_seen_at", "alive")
    list_filter = (AliveFilter, "kind", "model_name", "device")
    search_fields = ("worker_id", "hostname")
    ordering = ("-last_seen_at",)

    @admin.display(description="alive", boolean=True)
    def alive(self, worker: SpeechWorker) -> bool:
        return worker.expires_at > timezone.now()



class WebhookAttemptInline(TenantScopedInline):
    model = WebhookAttempt
    tenant_lookup = "delivery__tenant"
    extra = 0
    can_delete = False
    fields = ("number", "started_at", "status_code", "error", "duration_ms", "next_retry_at", "response_excerpt")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """Every webhook event and each attempt to deliver it, as the receiver answered."""

    list_display = ("message_id", "tenant", "job", "event_type", "status", "attempts", "created_at", "next_attempt_at", "finished_at")
    list_filter = ("status", "event_type", "tenant")
    list_select_related = ("tenant", "job")
    search_fields = ("url", "tenant__slug")
    date_hierarchy = "created_at"
    fields = ("message_id", "tenant", "job", "event_type", "url", "status", "attempts", "created_at", "next_attempt_at", "finished_at", "body")
    readonly_fields = fields
    inlines = [WebhookAttemptInline]

    @admin.display(description="webhook-id")
    def message_id(self, delivery: WebhookDelivery) -> str:
        return delivery.message_id
