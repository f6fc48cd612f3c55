from django.urls import path

from streaming.consumers import TranscribeStreamConsumer

websocket_urlpatterns = [
    path("v1/modules/scaiecho/stream/transcribe", TranscribeStreamConsumer.as_asgi()),
]
