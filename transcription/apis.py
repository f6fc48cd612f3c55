"""Batch transcription endpoints: ``POST /transcribe``, ``GET /transcribe/jobs/{id}`` and the
OpenAI-compatible ``POST /oai/v1/audio/transcriptions``.

Views validate shape, call services and serialize. No audio is decoded beyond its header here and
no model is ever loaded: the work happens on a worker, and an inline request waits for its job.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from scaiecho_site import errors
from scaiecho_site.envelope import ok
from scaiecho_site.fields import WholeNumber
from scaiecho_site.schema import ErrorEnvelope, error_responses, responses
from speakers.selectors import unknown_speaker_ids
from speech.audio import probe_audio
from speech.engines.base import Segment, TranscriptionResult, Word
from tenants.models import PERM_DIARIZE, PERM_TRANSCRIBE
from tenants.permissions import TenantApiView
from tenants.services import (
    BACKEND_PREFERENCES,
    audit_record,
    policy_get_or_provision,
    policy_resolve_backend,
    webhook_destination_accept,
)
from transcription import formats
from transcription.failures import error_of
from transcription.limits import InlineWait, inline_wait_acquire, inline_wait_release
from transcription.models import TranscriptionJob
from transcription.selectors import job_for_owner
from transcription.serializers import JobOutput, SegmentOutput, job_data
from transcription.services import job_create, job_wait

ASYNC_NOTE = "Long-form transcribe runs asynchronously. Poll GET /v1/modules/scaiecho/transcribe/jobs/{id}"

# A failed inline job answers with the error its failure stands for.


class InlineResultOutput(serializers.Serializer):
    job_id = serializers.CharField(source="id")
    transcript = serializers.CharField()
    backend_used = serializers.CharField()
    language_detected = serializers.CharField(allow_null=True)
    audio_duration_ms = serializers.IntegerField()
    audio_bytes = serializers.IntegerField()
    segments = SegmentOutput(many=True)


class QueuedOutput(serializers.Serializer):
    job_id = serializers.CharField(source="id")
    status = serializers.CharField()
    audio_bytes = serializers.IntegerField()
    note = serializers.CharField()


def read_upload(upload: Any) -> tuple[bytes, str]:
    """The uploaded bytes and their container's extension; size and format checked by content."""
    if upload.size > settings.SCAIECHO_MAX_UPLOAD_BYTES:
        raise errors.PayloadTooLarge(
            f"The file is {upload.size} bytes; the limit is {settings.SCAIECHO_MAX_UPLOAD_BYTES} bytes."
        )
    data = upload.read()
    # Headers only (container, codec, sample rate, declared duration): decoding is the worker's.
    return data, probe_audio(data, max_duration_s=settings.SCAIECHO_MAX_AUDIO_SECONDS).container


def finish_inline(job: TranscriptionJob, *, wait: InlineWait) -> TranscriptionJob:
    """Wait for an inline job, holding ``wait``'s places; a job still unfinished at the deadline
    stays pollable."""
    job = job_wait(job_id=job.id, timeout_s=settings.SCAIECHO_SYNC_TIMEOUT_SECONDS, heartbeat=wait.refresh)
    if job.status == TranscriptionJob.Status.FAILED:
        raise error_of(code=job.error_code, reason=job.status_reason)
    if job.status != TranscriptionJob.Status.COMPLETED:
        raise errors.BackendTimeout(
            "The transcription did not finish in time; it goes on, and its job can be polled.",
            details=[{"field": "job_id", "message": str(job.id)}],
        )
    return job


def form_with_lists(data: Any, *names: str) -> Any:
    """Multipart list fields as clients send them: repeated, with ``[]``, or comma-separated.

    A plain dict, not ``QueryDict.copy()``: that deep-copies the uploaded files, and a large
    upload (a temporary file on disk) cannot be copied.
    """
    if not hasattr(data, "getlist"):
        return data
    raw = data.dict()
    for name in names:
        raw.pop(f"{name}[]", None)
        values = data.getlist(name) + data.getlist(f"{name}[]")
        values = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
        if values:
            raw[name] = values
        else:
            raw.pop(name, None)
    return raw


VAD_SEGMENTATION_HELP = (
    "Decode the file as Silero VAD's speech windows of up to 25 s, each on its own, with a guard "
    "against repeated text (default true); false reads the whole file as whisper.transcribe does, "
    "for comparison."
)


def form_with_objects(data: Any, *names: str) -> Any:
    """Multipart object fields as the ``openai`` SDK sends them (``name[key]=value``) gathered
    into one dict under ``name``; a plain value (``auto``, or JSON text) is left as it is."""
    if not isinstance(data, dict):
        return data
    for name in names:
        prefix = f"{name}["
        nested = {key[len(prefix) : -1]: data.pop(key) for key in list(data) if key.startswith(prefix) and key.endswith("]")}
        if nested and name not in data:
            data[name] = nested
    return data


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "enum": ["auto"]},
            {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["server_vad"]},
                    "prefix_padding_ms": {"type": "integer"},
                    "silence_duration_ms": {"type": "integer"},
                    "threshold": {"type": "number"},
                },
                "required": ["type"],
            },
        ],
        "description": "OpenAI's chunking_strategy: \"auto\" or {\"type\": \"server_vad\", ...} (as an object or JSON "
        "text). Either one decodes Silero VAD speech windows; the server_vad tuning values are accepted and "
        "our own VAD settings used.",
    }
)
class ChunkingStrategyField(serializers.Field):
    """OpenAI's ``chunking_strategy``: ``"auto"`` or a ``server_vad`` object; both mean VAD windows."""

    default_error_messages = {"invalid": 'Must be "auto" or an object with "type": "server_vad".'}

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, str):
            text = data.strip()
            if text == "auto":
                return "auto"
            try:
                data = json.loads(text)
            except ValueError:
                self.fail("invalid")
        if isinstance(data, dict) and data.get("type") == "server_vad":
            return "server_vad"
        self.fail("invalid")
        raise AssertionError  # fail() raises

    def to_representation(self, value: Any) -> Any:
        return value


class SpeakerCountInput(serializers.Serializer):
    """How many speakers a diarized recording has, when the client knows: exactly
    (``num_speakers``) or bounded (``min_speakers``/``max_speakers``), as pyannote and whisperX take."""

    num_speakers = WholeNumber(min_value=1, max_value=20, required=False)
    min_speakers = WholeNumber(min_value=1, max_value=20, required=False)
    max_speakers = WholeNumber(min_value=1, max_value=20, required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        low, high = attrs.get("min_speakers"), attrs.get("max_speakers")
        if attrs.get("num_speakers") is not None and (low is not None or high is not None):
            field = "min_speakers" if low is not None else "max_speakers"
            raise serializers.ValidationError({field: "num_speakers already fixes the count; give either num_speakers or min/max_speakers."})
        if low is not None and high is not None and low > high:
            raise serializers.ValidationError({"min_speakers": "min_speakers must not exceed max_speakers."})
        return attrs


SPEAKER_COUNT_FIELDS = ("num_speakers", "min_speakers", "max_speakers")


class DiarizeMixin:
    def speaker_counts(self, params: dict[str, Any], *, diarize: bool) -> dict[str, int | None]:
        """``num_speakers``/``min_speakers``/``max_speakers`` for the job; only with diarization."""
        given = [name for name in SPEAKER_COUNT_FIELDS if params.get(name) is not None]
        if given and not diarize:
            raise errors.ValidationError(
                f"{given[0]} only applies to diarized transcription.", details=[{"field": name, "message": "needs diarization"} for name in given]
            )
        return {name: params.get(name) for name in SPEAKER_COUNT_FIELDS}

    def diarize_speakers(self, request: Request, *, diarize: bool, speaker_ids: list[str] | None) -> list[str]:
        """Check ``scaiecho:diarize`` when asked for, and that every named speaker is the tenant's."""
        if speaker_ids and not diarize:
            raise errors.ValidationError(
                "speaker_ids only applies with diarize=true.", details=[{"field": "speaker_ids", "message": "needs diarize"}]
            )
        if not diarize:
            return []
        self.require_permission(request, PERM_DIARIZE)
        unknown = unknown_speaker_ids(tenant_id=self.tenant.pk, speaker_ids=speaker_ids or [])
        if unknown:
            raise errors.ValidationError(
                "Some speaker_ids are not speakers of this tenant.",
                details=[{"field": "speaker_ids", "message": f"unknown speaker {value}"} for value in unknown],
            )
        return list(speaker_ids or [])


class TranscribeApi(DiarizeMixin, TenantApiView):
    required_permission = PERM_TRANSCRIBE
    audit_action = "transcription.create"

    class InputSerializer(SpeakerCountInput):
        file = serializers.FileField(allow_empty_file=True)
        language_hint = serializers.RegexField(r"^[a-z]{2}$", required=False, allow_blank=True)
        backend_preference = serializers.ChoiceField(choices=BACKEND_PREFERENCES, default="any")
        temperature = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
        force_async = serializers.BooleanField(default=False)
        diarize = serializers.BooleanField(default=False)
        speaker_ids = serializers.ListField(child=serializers.CharField(), required=False)
        vad_segmentation = serializers.BooleanField(default=True, help_text=VAD_SEGMENTATION_HELP)
        webhook_url = serializers.CharField(
            required=False,
            max_length=2048,
            help_text="Called (POST, signed per Standard Webhooks) when the job completes or fails; an http or https "
            "URL on a public address, and the tenant needs a signing secret (POST /webhook-secret), else 422. "
            "Without it the tenant policy's default applies.",
        )

        class Meta:
            ref_name = "TranscribeInput"

    @extend_schema(
        operation_id="transcribe",
        request={"multipart/form-data": InputSerializer},
        responses={
            **responses(200, "TranscribeInlineEnvelope", InlineResultOutput(), 413, 415, 422, 502, 503, 504),
            202: responses(202, "TranscribeQueuedEnvelope", QueuedOutput())[202],
        },
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=form_with_lists(request.data, "speaker_ids"))
        serializer.is_valid(raise_exception=True)
        params = serializer.validated_data
        speaker_ids = self.diarize_speakers(request, diarize=params["diarize"], speaker_ids=params.get("speaker_ids"))
        counts = self.speaker_counts(params, diarize=params["diarize"])
        webhook_url = params.get("webhook_url")
        if webhook_url is not None:
            webhook_url = webhook_destination_accept(policy=policy_get_or_provision(tenant=self.tenant), url=webhook_url)
        data, ext = read_upload(params["file"])
        wait: InlineWait | None = None
        if len(data) <= settings.SCAIECHO_ASYNC_AUDIO_THRESHOLD_BYTES and not params["force_async"]:
            try:
                wait = inline_wait_acquire(tenant_id=str(self.tenant.pk))
            except errors.RateLimited:
                pass  # too many inline requests wait already: this one takes the async path (202)
        try:
            if wait is not None:
                # Fail fast instead of queueing work no backend can take; the worker resolves again.
                policy_resolve_backend(policy=policy_get_or_provision(tenant=self.tenant), preference=params["backend_preference"])
            job = job_create(
                ctx=self.actor(),
                data=data,
                ext=ext,
                is_async=wait is None,
                backend_preference=params["backend_preference"],
                language_hint=params.get("language_hint", ""),
                temperature=params.get("temperature"),
                diarize=params["diarize"],
                speaker_ids=speaker_ids,
                vad_segmentation=params["vad_segmentation"],
                webhook_url=webhook_url,
                **counts,
            )
            audit_record(ctx=self.actor(), action="transcription.create", resource_type="transcription_job", resource_id=str(job.id))
            if wait is None:
                queued = {"id": str(job.id), "status": job.status, "audio_bytes": job.audio_bytes, "note": ASYNC_NOTE}
                return ok(request, QueuedOutput(queued).data, status=202)
            job = finish_inline(job, wait=wait)
        finally:
            if wait is not None:
                inline_wait_release(wait)
        inline = {**job_data(job), "id": str(job.id), "segments": job.segments or []}
        return ok(request, InlineResultOutput(inline).data)


class TranscribeJobApi(TenantApiView):
    required_permission = PERM_TRANSCRIBE
    audit_action = "transcription.read"

    @extend_schema(operation_id="transcribe_job_get", responses=responses(200, "TranscribeJobEnvelope", JobOutput(), 404))
    def get(self, request: Request, job_id: str) -> Response:
        job = job_for_owner(job_id=job_id, tenant_id=self.tenant.pk, user_id=request.user.pk)
        audit_record(ctx=self.actor(), action="transcription.read", resource_type="transcription_job", resource_id=str(job.id))
        return ok(request, job_data(job))


def result_from_job(job: TranscriptionJob) -> TranscriptionResult:
    segments = [
        Segment(
            start=item["start"],
            end=item["end"],
            text=item["text"],
            words=[Word(**word) for word in item["words"]] if item.get("words") else None,
            speaker_id=item.get("speaker_id"),
            speaker_label=item.get("speaker_label"),
        )
        for item in job.segments or []
    ]
    return TranscriptionResult(
        text=job.transcript,
        language=job.language_detected or None,
        duration_s=(job.audio_duration_ms or 0) / 1000,
        segments=segments,
    )


class OpenAITranscriptionApi(DiarizeMixin, TenantApiView):
    """OpenAI's ``/v1/audio/transcriptions``, so the official SDKs work with a ScaiEcho key."""

    required_permission = PERM_TRANSCRIBE
    audit_action = "transcription.create"

    class InputSerializer(SpeakerCountInput):
        file = serializers.FileField(allow_empty_file=True)
        model = serializers.CharField(required=False, allow_blank=True)
        language = serializers.RegexField(r"^[a-z]{2}$", required=False, allow_blank=True)
        prompt = serializers.CharField(required=False, allow_blank=True)
        response_format = serializers.ChoiceField(choices=formats.RESPONSE_FORMATS, default="json")
        temperature = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
        timestamp_granularities = serializers.ListField(
            child=serializers.ChoiceField(choices=["segment", "word"]), required=False
        )
        speaker_ids = serializers.ListField(child=serializers.CharField(), required=False)
        chunking_strategy = ChunkingStrategyField(required=False)
        # Our extension; OpenAI leaves a file without chunking_strategy in one block, we decode VAD
        # windows unless told not to.
        vad_segmentation = serializers.BooleanField(required=False, help_text=VAD_SEGMENTATION_HELP)

        class Meta:
            ref_name = "OpenAITranscriptionInput"

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            attrs = super().validate(attrs)
            if attrs.get("chunking_strategy") and attrs.get("vad_segmentation") is False:
                raise serializers.ValidationError(
                    {"vad_segmentation": "chunking_strategy asks for VAD windows; vad_segmentation=false contradicts it."}
                )
            return attrs

    @extend_schema(
        operation_id="openai_audio_transcriptions",
        request={"multipart/form-data": InputSerializer},
        responses={
            200: OpenApiResponse(description="json, text, srt, vtt, verbose_json or diarized_json"),
            # Errors in the envelope, like every other endpoint's (403: diarized_json without
            # scaiecho:diarize, or the module off; 502: no backend available).
            **error_responses(413, 415, 422, 502, 503, 504),
            429: OpenApiResponse(
                ErrorEnvelope,
                description="RATE_LIMITED (with retry_after and Retry-After; also when too many inline requests wait) or BUDGET_EXCEEDED",
            ),
        },
    )
    def post(self, request: Request) -> Response | HttpResponse:
        serializer = self.InputSerializer(
            data=form_with_objects(form_with_lists(request.data, "timestamp_granularities", "speaker_ids"), "chunking_strategy")
        )
        serializer.is_valid(raise_exception=True)
        params = serializer.validated_data
        diarize = params["response_format"] == "diarized_json"
        speaker_ids = self.diarize_speakers(request, diarize=diarize, speaker_ids=params.get("speaker_ids"))
        counts = self.speaker_counts(params, diarize=diarize)
        granularities = params.get("timestamp_granularities") or ["segment"]
        data, ext = read_upload(params["file"])
        policy_resolve_backend(policy=policy_get_or_provision(tenant=self.tenant))
        # OpenAI's clients cannot take a 202: over a waiting cap this is a 429 with Retry-After,
        # before any job exists (nothing staged, nothing billed).
        wait = inline_wait_acquire(tenant_id=str(self.tenant.pk))
        try:
            job = job_create(
                ctx=self.actor(),
                data=data,
                ext=ext,
                is_async=False,
                language_hint=params.get("language", ""),
                temperature=params.get("temperature"),
                word_timestamps="word" in granularities,
                prompt=params.get("prompt", ""),
                source=TranscriptionJob.Source.OPENAI,
                diarize=diarize,
                speaker_ids=speaker_ids,
                vad_segmentation=params.get("vad_segmentation", True),
                **counts,
            )
            audit_record(ctx=self.actor(), action="transcription.create", resource_type="transcription_job", resource_id=str(job.id))
            job = finish_inline(job, wait=wait)
        finally:
            inline_wait_release(wait)
        body, content_type = formats.render(
            result_from_job(job),
            response_format=params["response_format"],
            word_timestamps="word" in granularities,
            segment_timestamps="segment" in granularities,
        )
        if isinstance(body, str):
            return HttpResponse(body, content_type=content_type)
        return Response(body)
