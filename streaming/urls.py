from django.urls import path

from streaming.views import captions_page

app_name = "streaming"

urlpatterns = [
    path("", captions_page, name="captions"),
]
