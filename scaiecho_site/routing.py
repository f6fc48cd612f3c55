"""WebSocket routes. The streaming app adds its consumer here."""

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []
