"""ASGI middleware that puts a WebSocket's API key (``?token=``, the Authorization header, or
OpenAI's ``openai-insecure-api-key.<key>`` subprotocol) into the scope. It does not judge the key: the consumer checks it after ``accept()``, so that a client
sees an error frame and close code 4401 rather than a failed handshake.

It does count failed authentication per client address (the consumer's 4401 before the client's
first frame), and answers an address over ``SCAIECHO_AUTH_FAILURES_PER_ADDRESS`` itself: an error
frame with ``RATE_LIMITED`` and close 4429, without reaching the consumer or the database."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async

from tenants.ratelimit import auth_failure_record, auth_failures_retry_after, client_address

CLOSE_AUTH = 4401
CLOSE_LIMIT = 4429


# OpenAI's browser form of the key: a WebSocket subprotocol (browsers cannot set headers).
SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."


def token_from_scope(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode(errors="replace").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    for subprotocol in scope.get("subprotocols") or []:
        if subprotocol.startswith(SUBPROTOCOL_KEY_PREFIX) and len(subprotocol) > len(SUBPROTOCOL_KEY_PREFIX):
            return subprotocol[len(SUBPROTOCOL_KEY_PREFIX) :]
    query = parse_qs((scope.get("query_string") or b"").decode(errors="replace"))
    tokens = query.get("token")
    return tokens[0] if tokens else None


def client_address_from_scope(scope: dict[str, Any]) -> str | None:
    """:func:`tenants.ratelimit.client_address` of an ASGI connection."""
    peer = (scope.get("client") or (None, None))[0]
    forwarded = [value.decode("latin-1") for name, value in scope.get("headers") or [] if name == b"x-forwarded-for"]
    return client_address(remote_addr=peer, forwarded_for=",".join(forwarded) or None)


async def refuse_rate_limited(receive: Any, send: Any, *, retry_after: int) -> None:
    """Accept, say why in the contract's error frame, close 4429."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    frame = {
        "type": "error",
        "code": "RATE_LIMITED",
        "message": f"Too many failed authentication attempts from this address. Retry in {retry_after} s.",
        "retry_after": retry_after,
    }
    await send({"type": "websocket.send", "text": json.dumps(frame)})
    await send({"type": "websocket.close", "code": CLOSE_LIMIT})


class TokenScopeMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        token = token_from_scope(scope)
        scope = {**scope, "scaiecho_token": token}
        address = client_address_from_scope(scope) if scope.get("type") == "websocket" else None
        if not address:
            return await self.app(scope, receive, send)
        retry_after = await sync_to_async(auth_failures_retry_after)(address=address)
        if retry_after is not None:
            return await refuse_rate_limited(receive, send, retry_after=retry_after)

        client_spoke = False

        async def watched_receive() -> dict[str, Any]:
            nonlocal client_spoke
            message = await receive()
            if message["type"] == "websocket.receive":
                client_spoke = True
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            # Auth is decided at connect, before the client's first frame is read: a 4401 then is a
            # refused credential (a key revoked mid-stream closes 4401 later, and is not a guess).
            if message["type"] == "websocket.close" and message.get("code") == CLOSE_AUTH and token and not client_spoke:
                await sync_to_async(auth_failure_record)(address=address)
            await send(message)

        return await self.app(scope, watched_receive, watched_send)
