"""The live caption page: a static page whose script speaks the stream protocol (contract §4)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from speech.audio import SAMPLE_RATE

STREAM_PATH = "/v1/modules/scaiecho/stream/transcribe"


@require_GET
def captions_page(request: HttpRequest) -> HttpResponse:
    response = render(request, "captions.html", {"stream_path": STREAM_PATH, "sample_rate": SAMPLE_RATE})
    # Keys and tokens are typed into or linked to this page: never let it leak them as a referrer.
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "no-store"
    return response
