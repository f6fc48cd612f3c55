"""The live caption page (a static page whose script speaks the stream protocol, contract §4), the
exchange that keeps API keys out of its URLs (the page POSTs the key in the Authorization header
and opens the WebSocket with the short-lived ``sct_`` token it gets back), and what the page may
offer its user (the speaker toggle only where the key may diarize)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from scaiecho_site.envelope import ok
from scaiecho_site.fields import WholeNumber
from scaiecho_site.schema import responses
from speech.audio import SAMPLE_RATE
from streaming.tokens import CaptionTokenAuthentication, caption_token_issue, caption_token_ttl
from tenants.models import PERM_DIARIZE, PERM_TRANSCRIBE
from tenants.permissions import TenantApiView
from tenants.selectors import membership_permissions
from tenants.services import audit_record

STREAM_PATH = "/v1/modules/scaiecho/stream/transcribe"


@require_GET
def captions_page(request: HttpRequest) -> HttpResponse:
    context = {
        "stream_path": STREAM_PATH,
        "sample_rate": SAMPLE_RATE,
        "token_url": reverse("streaming:caption-token"),
        "features_url": reverse("streaming:caption-features"),
    }
    response = render(request, "captions.html", context)
    # Keys and tokens are typed into or linked to this page: never let it leak them as a referrer.
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "no-store"
    return response


class CaptionTokenApi(TenantApiView):
    """``POST /captions/token``: trade the bearer key for a caption token (``scaiecho:transcribe``)."""

    required_permission = PERM_TRANSCRIBE
    audit_action = "caption_token.issue"

    class InputSerializer(serializers.Serializer):
        ttl_seconds = WholeNumber(required=False, min_value=1)

        class Meta:
            ref_name = "CaptionTokenInput"

        def get_fields(self) -> dict[str, serializers.Field]:
            # The cap is a setting: read it per instance, so the schema states it as the validation does.
            fields = super().get_fields()
            fields["ttl_seconds"] = WholeNumber(
                required=False, min_value=1, max_value=settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS
            )
            return fields

    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField(help_text="sct_…, for ?token= on the stream WebSocket")
        expires_at = serializers.DateTimeField()
        ttl_seconds = serializers.IntegerField()

        class Meta:
            ref_name = "CaptionToken"

    @extend_schema(
        operation_id="caption_token_issue",
        # JSON, as the caption page sends it (forms parse a malformed body as an empty form).
        request={"application/json": InputSerializer},
        responses=responses(200, "CaptionTokenEnvelope", OutputSerializer(), 415, 422),
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        ttl = caption_token_ttl(serializer.validated_data.get("ttl_seconds"))
        key = request.auth
        token = caption_token_issue(api_key_id=key.pk, ttl_seconds=ttl)
        audit_record(
            ctx=self.actor(), action=self.audit_action, resource_type="api_key", resource_id=str(key.pk), details={"ttl_seconds": ttl}
        )
        expires_at = timezone.now() + timedelta(seconds=ttl)
        response = ok(request, self.OutputSerializer({"token": token, "expires_at": expires_at, "ttl_seconds": ttl}).data)
        response["Cache-Control"] = "no-store"
        return response


class CaptionFeaturesApi(TenantApiView):
    """``GET /captions/features``: what a caption page may offer the holder of this key or caption
    token, so that it shows the speaker toggle only where a diarized stream would be accepted."""

    authentication_classes = [CaptionTokenAuthentication]
    required_permission = PERM_TRANSCRIBE
    audit_action = "caption_features.read"

    class OutputSerializer(serializers.Serializer):
        diarize = serializers.BooleanField(help_text="The key holds scaiecho:diarize: the page may ask for speakers")

        class Meta:
            ref_name = "CaptionFeatures"

    @extend_schema(operation_id="caption_features", responses=responses(200, "CaptionFeaturesEnvelope", OutputSerializer()))
    def get(self, request: Request) -> Response:
        permissions = membership_permissions(membership=request.auth.membership)
        features = {"diarize": PERM_DIARIZE in permissions}
        audit_record(ctx=self.actor(), action=self.audit_action, resource_type="api_key", resource_id=str(request.auth.pk), details=features)
        response = ok(request, self.OutputSerializer(features).data)
        response["Cache-Control"] = "no-store"
        return response
