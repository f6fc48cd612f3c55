"""Request body limits, enforced before a body is buffered.

Every route has a body limit: the upload routes take an upload (``SCAIECHO_MAX_UPLOAD_BYTES``, or
two speaker recordings of ``SCAIECHO_SPEAKER_MAX_UPLOAD_BYTES``) plus a little multipart framing;
every other route takes ``SCAIECHO_MAX_REQUEST_BYTES``. A body over its limit is answered 413
``PAYLOAD_TOO_LARGE`` in the envelope, with or without ``Content-Length``.

The limit has to act below Django, and below ASGI too: daphne (through Twisted) receives the whole
body, in memory or a temporary file, before it calls the application, then hands all of it to the
application's queue at once, and Twisted parses every multipart body it receives into memory (a
copy the application never uses, and a bare ``400`` with no envelope when the body is malformed).
So there are two guards, one rule (:func:`body_limit`):

- :class:`LimitedWebRequest`, daphne's request class with the limit in Twisted's callbacks: a
  declared length over the limit is refused as soon as the headers are in, a chunked body as soon
  as the bytes received pass it (at most the limit is ever spooled, to a file that is then
  closed), and the rest of the body is read and dropped for a moment so the client sees the answer
  rather than a reset connection. :func:`install_daphne_guard` puts it in daphne's place.
- :class:`BodyLimitMiddleware`, the same rule as ASGI middleware, for any other ASGI server (which
  stream the body as ``http.request`` messages): it counts them and stops at the limit.

A new route that takes a large body needs its line in :func:`body_limit`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

from daphne import http_protocol
from django.conf import settings

from scaiecho_site import errors
from scaiecho_site.envelope import REQUEST_ID_HEADER, error_body, error_headers, request_id_from_header

logger = logging.getLogger("scaiecho.bodylimit")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Multipart framing (boundaries, part headers, the form's small fields) on top of the files.
MULTIPART_ALLOWANCE = 64 * 1024
# After a refusal, how long the rest of the body is read and dropped before the connection closes:
# closing a socket with unread data resets it, and a client still sending may then lose the 413.
REFUSAL_LINGER_SECONDS = 2.0

_UPLOAD_ROUTES = ("/v1/modules/scaiecho/transcribe", "/oai/v1/audio/transcriptions")
_SPEAKER_ENROLL_ROUTE = "/v1/modules/scaiecho/speakers"


def body_limit(method: str, path: str) -> int:
    """The largest body, in bytes, that ``method`` on ``path`` accepts."""
    if method.upper() == "POST":
        route = path.rstrip("/")
        if route.endswith(_UPLOAD_ROUTES):
            return settings.SCAIECHO_MAX_UPLOAD_BYTES + MULTIPART_ALLOWANCE
        if route.endswith(_SPEAKER_ENROLL_ROUTE):
            # A reference recording and a consent recording.
            return 2 * settings.SCAIECHO_SPEAKER_MAX_UPLOAD_BYTES + MULTIPART_ALLOWANCE
    return settings.SCAIECHO_MAX_REQUEST_BYTES


def too_large(*, limit: int, declared: int | None = None) -> errors.PayloadTooLarge:
    if declared is not None:
        return errors.PayloadTooLarge(f"The request body is {declared} bytes; this route accepts at most {limit} bytes.")
    return errors.PayloadTooLarge(f"The request body is over the {limit} bytes this route accepts.")


def refusal(error: errors.ApplicationError, request_id_header: str | None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The envelope and headers of a refusal made outside Django (no request object yet)."""
    request_id = request_id_from_header(request_id_header)
    body = json.dumps(error_body(error, request_id), separators=(",", ":")).encode()
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
        (REQUEST_ID_HEADER.encode(), request_id.encode()),
        (b"Connection", b"close"),
    ]
    headers.extend((name.encode(), value.encode()) for name, value in error_headers(error).items())
    return headers, body


def _declared_length(value: bytes | str | None) -> int | None:
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return int(text) if text.strip().isdigit() else None


class BodyLimitMiddleware:
    """ASGI middleware: refuse a body over its route's limit, counting it as it arrives.

    A declared ``Content-Length`` over the limit is answered at once, without reading anything.
    Otherwise the ``http.request`` messages are counted as the application reads them; past the
    limit the application is told the client left (Django then drops what it read) and the client
    gets the 413.
    """

    def __init__(self, app: AsgiApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limit = body_limit(scope["method"], scope["path"])
        request_id = headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1") or None
        declared = _declared_length(headers.get(b"content-length"))
        if declared is not None and declared > limit:
            await self._refuse(send, too_large(limit=limit, declared=declared), request_id)
            return

        received = 0
        refused = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal response_started
            if refused and not response_started:
                return  # the answer to a body it never got in full: the 413 goes instead
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, limited_receive, tracked_send)
        if refused and not response_started:
            await self._refuse(send, too_large(limit=limit), request_id)

    @staticmethod
    async def _refuse(send: Send, error: errors.ApplicationError, request_id: str | None) -> None:
        headers, body = refusal(error, request_id)
        await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# --- daphne -------------------------------------------------------------------------------------


def _request_target(raw: bytes) -> str:
    """The path of a request line's target (origin or absolute form), decoded as daphne does."""
    target = raw.decode("latin-1")
    if target.startswith(("http://", "https://")):
        target = urlsplit(target).path or "/"
    return unquote(target.split("?", 1)[0])


class LimitedWebRequest(http_protocol.WebRequest):
    """daphne's request with the body limit applied while the body is received."""

    _body_limit: int
    _body_route: tuple[str, str]
    _body_received: int = 0
    _body_refused: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Twisted would parse every multipart body into ``args`` (in memory, unused by daphne)
        # and answer a malformed one with a bare 400; Django parses the body itself, in the
        # envelope.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        # The request line is parsed, but it reaches the request itself only with the whole body.
        self._body_route = (self.channel._command.decode("latin-1"), _request_target(self.channel._path))
        self._body_limit = body_limit(*self._body_route)
        if length is not None and length > self._body_limit:
            # No 100 Continue for a body that will be refused: the 413 is the answer.
            self.requestHeaders.removeHeader(b"Expect")
            super().gotLength(0)
            self._refuse(too_large(limit=self._body_limit, declared=length))
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_refused:
            return
        self._body_received += len(data)
        if self._body_received > self._body_limit:
            self._refuse(too_large(limit=self._body_limit))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._body_refused:
            return  # answered already; the application never sees this request
        super().requestReceived(command, path, version)

    def _refuse(self, error: errors.ApplicationError) -> None:
        self._body_refused = True
        self.content.close()  # drops what was spooled (a temporary file is deleted on close)
        channel = self.channel
        request_id = self.requestHeaders.getRawHeaders(REQUEST_ID_HEADER.encode(), [b""])[0].decode("latin-1")
        headers, body = refusal(error, request_id or None)
        head = b"HTTP/1.1 %d Payload Too Large\r\n" % error.http_status
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        transport = channel.transport
        transport.write(head + b"\r\n" + body)
        method, path = self._body_route
        logger.info("refused request body method=%s path=%s limit=%d: %s", method, path, self._body_limit, error.message)

        # Whatever else the client sends is read and dropped, then the connection closes.
        def discard(data: bytes) -> None:
            return None

        channel.dataReceived = discard
        channel.rawDataReceived = discard
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()  # the response is complete: the client sees end-of-stream after it
        channel.callLater(REFUSAL_LINGER_SECONDS, channel.loseConnection)


def install_daphne_guard() -> None:
    """Make daphne build :class:`LimitedWebRequest` for every HTTP request it serves.

    daphne's ``HTTPFactory`` looks its request class up in ``daphne.http_protocol`` for every new
    connection, and daphne imports the application before it listens, so this takes effect for
    every connection when ``scaiecho_site.asgi`` calls it.
    """
    http_protocol.WebRequest = LimitedWebRequest
