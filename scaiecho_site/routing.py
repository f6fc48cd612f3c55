"""WebSocket routes."""

from streaming.routing import websocket_urlpatterns

__all__ = ["websocket_urlpatterns"]
