from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from scaiecho_site.health import HealthzApi, ModuleHealthzApi, ModuleReadyzApi, ReadyzApi
from scaiecho_site.monitoring import metrics_view

API_PREFIX = "v1/modules/scaiecho/"

admin.site.site_header = "ScaiEcho"
admin.site.site_title = "ScaiEcho"
admin.site.index_title = "ScaiEcho administration"

urlpatterns = [
    path("healthz", HealthzApi.as_view(), name="healthz"),
    path("readyz", ReadyzApi.as_view(), name="readyz"),
    # The same probes under the module prefix (contract section 0), for platform health aggregators.
    path(API_PREFIX + "healthz", ModuleHealthzApi.as_view(), name="module-healthz"),
    path(API_PREFIX + "readyz", ModuleReadyzApi.as_view(), name="module-readyz"),
    # Prometheus scrapes the root path by convention; the prefixed one is for platforms that
    # reach every module under its own prefix, as with the health probes. Same answer, same access.
    path("metrics", metrics_view, name="metrics"),
    path(API_PREFIX + "metrics", metrics_view, name="module-metrics"),
    path("admin/", admin.site.urls),
    path(API_PREFIX, include("tenants.urls")),
    path(API_PREFIX, include("transcription.urls")),
    path(API_PREFIX, include("speakers.urls")),
    path("oai/v1/", include("transcription.oai_urls")),
    path("captions/", include("streaming.urls")),
    path(API_PREFIX + "openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path(API_PREFIX + "docs", SpectacularSwaggerView.as_view(url_name="openapi-schema"), name="api-docs"),
]
