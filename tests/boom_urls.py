"""Routes that fail on purpose, to show what a client sees when the server breaks."""

from django.http import HttpRequest, HttpResponse
from django.urls import include, path
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.models import PERM_TRANSCRIBE
from tenants.permissions import TenantApiView


class BoomApi(TenantApiView):
    required_permission = PERM_TRANSCRIBE
    audit_action = "test.boom"

    def get(self, request: Request) -> Response:
        raise RuntimeError("secret internal detail sk-live-123")


def plain_boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("secret internal detail sk-live-456")


urlpatterns = [
    path("v1/modules/scaiecho/boom", BoomApi.as_view()),
    path("plain-boom", plain_boom),
    path("", include("scaiecho_site.urls")),
]
