from django.urls import path

from streaming.views import CaptionFeaturesApi, CaptionTokenApi, captions_page

app_name = "streaming"

urlpatterns = [
    path("", captions_page, name="captions"),
    path("token", CaptionTokenApi.as_view(), name="caption-token"),
    path("features", CaptionFeaturesApi.as_view(), name="caption-features"),
]
