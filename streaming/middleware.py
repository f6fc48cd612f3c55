"""ASGI middleware that puts a WebSocket's API key (``?token=`` or the Authorization header) into
the scope. It does not refuse anything: the consumer checks the key after ``accept()``, so that a
client sees an error frame and close code 4401 rather than a failed handshake."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs


def token_from_scope(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode(errors="replace").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    query = parse_qs((scope.get("query_string") or b"").decode(errors="replace"))
    tokens = query.get("token")
    return tokens[0] if tokens else None


class TokenScopeMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return await self.app({**scope, "scaiecho_token": token_from_scope(scope)}, receive, send)
