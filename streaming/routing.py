from django.urls import path

from streaming.consumers import TranscribeStreamConsumer
from streaming.realtime import RealtimeTranscriptionConsumer

websocket_urlpatterns = [
    path("v1/modules/scaiecho/stream/transcribe", TranscribeStreamConsumer.as_asgi()),
    path("oai/v1/realtime", RealtimeTranscriptionConsumer.as_asgi()),
]
