from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from scaiecho_site.health import HealthzApi, ReadyzApi

API_PREFIX = "v1/modules/scaiecho/"

urlpatterns = [
    path("healthz", HealthzApi.as_view(), name="healthz"),
    path("readyz", ReadyzApi.as_view(), name="readyz"),
    path("admin/", admin.site.urls),
    path(API_PREFIX, include("tenants.urls")),
    path(API_PREFIX, include("transcription.urls")),
    path(API_PREFIX, include("speakers.urls")),
    path("oai/v1/", include("transcription.oai_urls")),
    path("captions/", include("streaming.urls")),
    path(API_PREFIX + "openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path(API_PREFIX + "docs", SpectacularSwaggerView.as_view(url_name="openapi-schema"), name="api-docs"),
]
