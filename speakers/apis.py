"""The speaker library: ``POST/GET /speakers`` and ``GET/PATCH/DELETE /speakers/{id}``.

All behind ``scaiecho:enroll`` and scoped to the key's tenant. No response ever carries an
embedding or a recording: the output serializers name every field they show.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from scaiecho_site import errors
from scaiecho_site.envelope import ok
from scaiecho_site.fields import WholeNumber
from scaiecho_site.schema import responses
from speakers.models import Speaker
from speakers.selectors import speaker_of_tenant, speakers_of_tenant
from speakers.services import EnrollmentInput, speaker_enroll, speaker_erase, speaker_update
from tenants.models import PERM_ENROLL
from tenants.permissions import TenantApiView
from tenants.services import audit_record

LANGUAGE = r"^[a-z]{2}$"
MAX_OFFSET = 1_000_000_000
# What a text field accepts: DRF strips Python's whitespace and refuses NUL, so a value needs one
# character that is neither, and no NUL anywhere.
_PY_SPACE = "\\t\\n\\u000b\\u000c\\r\\u001c-\\u001f \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
TEXT = {"type": "string", "pattern": f"^[^\\u0000]*[^\\u0000{_PY_SPACE}][^\\u0000]*$"}
SPEAKER_PATCH_SCHEMA = {
    "type": "object",
    "description": "Only display_name, description and language_primary can change; any other field is 422.",
    "properties": {
        "display_name": {**TEXT, "maxLength": 200},
        "description": {"type": "string", "pattern": "^[^\\u0000]*$"},
        "language_primary": {"type": "string", "pattern": LANGUAGE},
    },
    "additionalProperties": False,
}


class SpeakerOutput(serializers.Serializer):
    id = serializers.CharField()
    display_name = serializers.CharField(allow_null=True)
    description = serializers.CharField(allow_blank=True)
    language_primary = serializers.CharField()
    status = serializers.CharField()
    status_reasons = serializers.ListField(child=serializers.CharField())
    enrollment = serializers.DictField()
    verification = serializers.DictField(allow_null=True)
    consent = serializers.DictField(allow_null=True)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    verified_at = serializers.DateTimeField(allow_null=True)
    erased_at = serializers.DateTimeField(allow_null=True)


def speaker_data(speaker: Speaker) -> dict[str, Any]:
    consent = getattr(speaker, "consent", None)
    return SpeakerOutput(
        {
            "id": str(speaker.pk),
            "display_name": speaker.display_name or None,
            "description": speaker.description,
            "language_primary": speaker.language_primary,
            "status": speaker.status,
            "status_reasons": speaker.status_reasons or [],
            "enrollment": {"stage": speaker.stage, "attempts": speaker.attempts},
            "verification": speaker.verification or None,
            "consent": None
            if consent is None
            else {
                "user_full_name": consent.full_name or None,
                "stated_purpose": consent.stated_purpose,
                "consent_text": consent.consent_text,
                "captured_at": consent.captured_at,
            },
            "created_at": speaker.created_at,
            "updated_at": speaker.updated_at,
            "verified_at": speaker.verified_at,
            "erased_at": speaker.erased_at,
        }
    ).data


def _read(upload: Any, *, field: str) -> bytes:
    limit = settings.SCAIECHO_SPEAKER_MAX_UPLOAD_BYTES
    if upload.size > limit:
        raise errors.PayloadTooLarge(
            f"The {field} file is {upload.size} bytes; the limit is {limit} bytes.",
            details=[{"field": field, "message": f"over {limit} bytes"}],
        )
    data = upload.read()
    if not data:
        raise errors.ValidationError(f"The {field} file is empty.", details=[{"field": field, "message": "empty"}])
    return data


class SpeakerListApi(TenantApiView):
    required_permission = PERM_ENROLL
    audit_action = "speaker.enroll"
    audit_actions = {"GET": "speaker.list"}

    class InputSerializer(serializers.Serializer):
        display_name = serializers.CharField(max_length=200)
        language_primary = serializers.RegexField(LANGUAGE)
        description = serializers.CharField(required=False, allow_blank=True, default="")
        consent_user_full_name = serializers.CharField(max_length=200)
        consent_stated_purpose = serializers.CharField()
        consent_text = serializers.CharField()
        reference = serializers.FileField(allow_empty_file=True)
        consent = serializers.FileField(allow_empty_file=True)

        class Meta:
            ref_name = "SpeakerEnrollInput"

    class PageSerializer(serializers.Serializer):
        limit = WholeNumber(min_value=1, max_value=200, default=50)
        # Bounded so that offset + limit stays a PostgreSQL bigint (a larger one was a 500).
        offset = WholeNumber(min_value=0, max_value=MAX_OFFSET, default=0)
        status = serializers.ChoiceField(choices=Speaker.Status.choices, required=False)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            # DRF reads an empty query value (``?status=``) as absent; it is no value of the field.
            blank = [name for name in self.fields if self.initial_data.get(name) == ""]
            if blank:
                raise serializers.ValidationError({name: "May not be blank." for name in blank})
            return attrs

    class PageOutput(serializers.Serializer):
        items = SpeakerOutput(many=True)
        count = serializers.IntegerField()
        limit = serializers.IntegerField()
        offset = serializers.IntegerField()
        next_offset = serializers.IntegerField(allow_null=True)

        class Meta:
            ref_name = "SpeakerPage"

    @extend_schema(
        operation_id="speakers_enroll",
        request={"multipart/form-data": InputSerializer},
        responses=responses(202, "SpeakerEnrollEnvelope", SpeakerOutput(), 413, 415, 422, 503),
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        params = serializer.validated_data
        speaker = speaker_enroll(
            ctx=self.actor(),
            data=EnrollmentInput(
                display_name=params["display_name"],
                language_primary=params["language_primary"],
                description=params["description"],
                consent_user_full_name=params["consent_user_full_name"],
                consent_stated_purpose=params["consent_stated_purpose"],
                consent_text=params["consent_text"],
                reference=_read(params["reference"], field="reference"),
                consent=_read(params["consent"], field="consent"),
            ),
        )
        return ok(request, speaker_data(speaker), status=202)

    @extend_schema(operation_id="speakers_list", parameters=[PageSerializer], responses=responses(200, "SpeakerListEnvelope", PageOutput(), 422))
    def get(self, request: Request) -> Response:
        page = self.PageSerializer(data=request.query_params)
        page.is_valid(raise_exception=True)
        limit, offset = page.validated_data["limit"], page.validated_data["offset"]
        speakers = speakers_of_tenant(tenant_id=self.tenant.pk)
        if "status" in page.validated_data:
            speakers = speakers.filter(status=page.validated_data["status"])
        count = speakers.count()
        items = [speaker_data(speaker) for speaker in speakers[offset : offset + limit]]
        audit_record(ctx=self.actor(), action="speaker.list", resource_type="speaker")
        return ok(
            request,
            {
                "items": items,
                "count": count,
                "limit": limit,
                "offset": offset,
                "next_offset": offset + limit if offset + limit < count else None,
            },
        )


class JsonText(serializers.CharField):
    """A string in a JSON body: a number or a boolean is refused, not turned into text (DRF's
    ``CharField`` would store ``0.0`` as the name "0.0")."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class SpeakerDetailApi(TenantApiView):
    required_permission = PERM_ENROLL
    audit_action = "speaker.read"
    audit_actions = {"PATCH": "speaker.update", "DELETE": "speaker.erase"}

    class PatchSerializer(serializers.Serializer):
        display_name = JsonText(max_length=200, required=False)
        description = JsonText(required=False, allow_blank=True)
        language_primary = serializers.RegexField(LANGUAGE, required=False)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: "This field cannot be changed." for name in unknown})
            return attrs

    @extend_schema(operation_id="speakers_get", responses=responses(200, "SpeakerEnvelope", SpeakerOutput(), 404))
    def get(self, request: Request, speaker_id: str) -> Response:
        speaker = speaker_of_tenant(tenant_id=self.tenant.pk, speaker_id=speaker_id)
        audit_record(ctx=self.actor(), action="speaker.read", resource_type="speaker", resource_id=str(speaker.pk))
        return ok(request, speaker_data(speaker))

    @extend_schema(operation_id="speakers_update", request={"application/json": SPEAKER_PATCH_SCHEMA}, responses=responses(200, "SpeakerUpdateEnvelope", SpeakerOutput(), 404, 422))
    def patch(self, request: Request, speaker_id: str) -> Response:
        speaker = speaker_of_tenant(tenant_id=self.tenant.pk, speaker_id=speaker_id)
        serializer = self.PatchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        speaker = speaker_update(ctx=self.actor(), speaker=speaker, changes=serializer.validated_data)
        return ok(request, speaker_data(speaker_of_tenant(tenant_id=self.tenant.pk, speaker_id=str(speaker.pk))))

    @extend_schema(operation_id="speakers_erase", responses=responses(200, "SpeakerEraseEnvelope", SpeakerOutput(), 404))
    def delete(self, request: Request, speaker_id: str) -> Response:
        speaker = speaker_of_tenant(tenant_id=self.tenant.pk, speaker_id=speaker_id)
        speaker = speaker_erase(ctx=self.actor(), speaker_id=speaker.pk, via="api")
        return ok(request, speaker_data(speaker_of_tenant(tenant_id=self.tenant.pk, speaker_id=str(speaker.pk))))
