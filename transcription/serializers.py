"""The job as clients see it: ``GET /transcribe/jobs/{id}``'s ``data``, and the ``data`` of a
job's webhook event (contract sections 2 and 8), from one serializer."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from transcription.models import TranscriptionJob


class SegmentOutput(serializers.Serializer):
    start = serializers.FloatField()
    end = serializers.FloatField()
    text = serializers.CharField()
    speaker_id = serializers.CharField(required=False, allow_null=True)
    speaker_label = serializers.CharField(required=False)

    def to_representation(self, instance: Any) -> dict[str, Any]:
        # Speaker fields appear only on diarized output; there an anonymous voice has speaker_id null.
        data = super().to_representation(instance)
        if data.get("speaker_label") is None:
            data.pop("speaker_label", None)
            data.pop("speaker_id", None)
        return data


class JobOutput(serializers.Serializer):
    job_id = serializers.CharField(source="id")
    status = serializers.CharField()
    status_reason = serializers.CharField(allow_null=True)
    transcript = serializers.CharField(allow_null=True)
    segments = SegmentOutput(many=True, allow_null=True)
    backend_used = serializers.CharField(allow_null=True)
    language_detected = serializers.CharField(allow_null=True)
    audio_duration_ms = serializers.IntegerField(allow_null=True)
    audio_bytes = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    completed_at = serializers.DateTimeField(allow_null=True)


def _or_none(value: Any) -> Any:
    return value if value not in ("", None) else None


def job_data(job: TranscriptionJob) -> dict[str, Any]:
    """The job as the contract shows it: fields not set (yet) are ``null``."""
    completed = job.status == TranscriptionJob.Status.COMPLETED
    return JobOutput(
        {
            "id": str(job.id),
            "status": job.status,
            "status_reason": _or_none(job.status_reason),
            "transcript": job.transcript if completed else None,
            "segments": job.segments if completed else None,
            "backend_used": _or_none(job.backend_used),
            "language_detected": _or_none(job.language_detected),
            "audio_duration_ms": job.audio_duration_ms,
            "audio_bytes": job.audio_bytes,
            "created_at": job.created_at,
            "completed_at": job.completed_at,
        }
    ).data
