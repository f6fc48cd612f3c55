"""WebSocket routes.

A WebSocket to any other path is refused at the handshake (HTTP 403, as for a refused origin):
no consumer exists to accept it, so there is no stream to give a close code to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.urls import re_path

from streaming.routing import websocket_urlpatterns as stream_urlpatterns

Message = MutableMapping[str, Any]


async def refuse_unknown_route(
    scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    """Close before accepting: daphne answers the handshake with 403 instead of a 500."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


websocket_urlpatterns = [*stream_urlpatterns, re_path(r"", refuse_unknown_route)]

__all__ = ["websocket_urlpatterns"]
