"""Operators' read-only view of transcription jobs and the speech workers that run them.

Jobs are records (the result and the metering reference), so the admin never adds, edits or
deletes them. Audio is never shown: only the staged object's name while the job still needs it.
The changelist opens with a dashboard: backlog, live workers and the last day's outcomes.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import SEARCH_VAR
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.safestring import SafeString

from transcription.models import SpeechWorker, TranscriptionJob
from transcription.selectors import queue_backlog


class ReadOnlyAdmin(admin.ModelAdmin):
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
            TranscriptionJob.objects.exclude(error_code="")
            .order_by("error_code")
            .values_list("error_code", flat=True)
            .distinct()
        )
        return [(code, code) for code in codes]

    def queryset(self, request: HttpRequest, queryset: QuerySet[TranscriptionJob]) -> QuerySet[TranscriptionJob]:
        if self.value():
            return queryset.filter(error_code=self.value())
        return queryset


def transcription_dashboard(*, now: Any = None) -> dict[str, Any]:
    """What an operator checks first: is work piling up, who is taking it, how did the day go."""
    now = now or timezone.now()
    day_ago = now - timedelta(hours=24)
    oldest = (
        TranscriptionJob.objects.filter(status=TranscriptionJob.Status.QUEUED)
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    finished = TranscriptionJob.objects.filter(completed_at__gte=day_ago)
    return {
        "backlog": queue_backlog(),
        "workers": list(SpeechWorker.objects.filter(expires_at__gt=now).order_by("kind", "worker_id")),
        "completed_24h": finished.filter(status=TranscriptionJob.Status.COMPLETED).count(),
        "failed_24h": finished.filter(status=TranscriptionJob.Status.FAILED).count(),
        "oldest_queued_age_s": int((now - oldest).total_seconds()) if oldest else None,
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
        return super().changelist_view(request, {**(extra_context or {}), "dashboard": transcription_dashboard()})


@admin.register(SpeechWorker)
class SpeechWorkerAdmin(ReadOnlyAdmin):
    list_display = ("worker_id", "kind", "hostname", "model_name", "device", "started_at", "last_seen_at", "alive")
    list_filter = ("kind", "model_name", "device")
    search_fields = ("worker_id", "hostname")
    ordering = ("-last_seen_at",)

    @admin.display(description="alive", boolean=True)
    def alive(self, worker: SpeechWorker) -> bool:
        return worker.expires_at > timezone.now()

