"""A real local relay: an HTTP server speaking OpenAI's ``POST /v1/audio/transcriptions``.

Backend B talks to a third party we do not run, so the tests replace that party with a real server
on 127.0.0.1 rather than a mock: the client's multipart encoding, headers, timeouts and error
handling all go over a real socket. ``mode`` picks the behaviour and can be changed between
requests::

    with RelayServer(api_key="relay-secret") as relay:
        client = RelayClient(base_url=relay.base_url, api_key="relay-secret", model="whisper-1", timeout_s=5)
        relay.mode = "ratelimit"
        ...
        assert relay.requests[-1].fields["model"] == ["whisper-1"]

Modes: ``static`` (answer ``static_body``: a dict as JSON, a str as text/plain), ``forward``
(re-post the same multipart body to ``forward_base_url`` with ``forward_key`` and relay the answer),
``hang`` (wait ``hang_s``, then answer as ``static``), ``ratelimit`` (429 with ``Retry-After:
retry_after`` unless that is ``None``), ``error`` (``error_status``), ``badshape`` (200, HTML) and
``notext`` (200, JSON without ``text``). Waits are cut short when the server stops, so a test that
gives up on a hanging request does not hold up shutdown.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

import httpx

Mode = Literal["static", "forward", "hang", "ratelimit", "error", "badshape", "notext"]

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"

DEFAULT_VERBOSE_JSON: dict[str, Any] = {
    "task": "transcribe",
    "language": "english",
    "duration": 4.0,
    "text": "Hello there. General Kenobi.",
    "segments": [
        {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": 1.8,
            "text": " Hello there.",
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": -0.2,
            "compression_ratio": 1.1,
            "no_speech_prob": 0.01,
        },
        {
            "id": 1,
            "seek": 0,
            "start": 2.0,
            "end": 4.0,
            "text": " General Kenobi.",
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": -0.3,
            "compression_ratio": 1.2,
            "no_speech_prob": 0.02,
        },
    ],
    "words": [
        {"word": "Hello", "start": 0.0, "end": 0.7},
        {"word": "there.", "start": 0.8, "end": 1.8},
        {"word": "General", "start": 2.0, "end": 2.9},
        {"word": "Kenobi.", "start": 3.0, "end": 4.0},
    ],
}


@dataclass(frozen=True)
class RecordedRequest:
    """What one request carried, for tests to assert on."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    fields: dict[str, list[str]]  # form fields other than the file; repeated fields keep order
    file_name: str | None
    file_size: int | None
    file_content_type: str | None


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


class RelayServer:
    """An OpenAI-shaped transcription server on a free port of 127.0.0.1, in a background thread."""

    def __init__(
        self,
        *,
        api_key: str,
        mode: Mode = "static",
        static_body: dict[str, Any] | str | None = None,
        hang_s: float = 5.0,
        retry_after: int | str | None = 7,
        error_status: int = 500,
        forward_base_url: str | None = None,
        forward_key: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.mode: Mode = mode
        self.static_body: dict[str, Any] | str = DEFAULT_VERBOSE_JSON if static_body is None else static_body
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.error_status = error_status
        self.forward_base_url = forward_base_url
        self.forward_key = forward_key
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RelayServer:
        handler = type("_BoundRelayHandler", (_RelayHandler,), {"relay": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # Handler threads are joined on close (their waits end on the stop event), so no thread
        # outlives the test that started the server.
        httpd.daemon_threads = False
        httpd.block_on_close = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"relay-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("The relay server is not running.")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- request handling (called from handler threads) -------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _answer(self, *, raw_body: bytes, content_type: str) -> _Answer | None:
        """The answer for an authenticated request; ``None`` means drop the connection."""
        mode = self.mode
        if mode == "hang":
            if self._stop.wait(self.hang_s):
                return None
            return self._static()
        if mode == "static":
            return self._static()
        if mode == "forward":
            return self._forward(raw_body=raw_body, content_type=content_type)
        if mode == "ratelimit":
            headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
            return _json_answer(429, _error("Rate limit reached for requests.", "rate_limit_exceeded"), headers)
        if mode == "error":
            return _json_answer(
                self.error_status, _error("The server had an error processing your request.", "server_error")
            )
        if mode == "badshape":
            return _Answer(200, b"<html><body>Service temporarily unavailable</body></html>", "text/html")
        if mode == "notext":
            return _json_answer(200, {"task": "transcribe", "language": "english", "duration": 1.0, "segments": []})
        raise ValueError(f"Unknown relay mode {mode!r}.")

    def _static(self) -> _Answer:
        if isinstance(self.static_body, str):
            return _Answer(200, self.static_body.encode(), "text/plain; charset=utf-8")
        return _json_answer(200, self.static_body)

    def _forward(self, *, raw_body: bytes, content_type: str) -> _Answer:
        if not self.forward_base_url:
            raise RuntimeError("mode 'forward' needs forward_base_url.")
        headers = {"Content-Type": content_type}
        if self.forward_key:
            headers["Authorization"] = f"Bearer {self.forward_key}"
        upstream = httpx.post(
            f"{self.forward_base_url.rstrip('/')}/audio/transcriptions",
            content=raw_body,
            headers=headers,
            timeout=60,
        )
        passed = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
        return _Answer(
            upstream.status_code,
            upstream.content,
            upstream.headers.get("content-type", "application/octet-stream"),
            passed,
        )


class _RelayHandler(BaseHTTPRequestHandler):
    relay: RelayServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Quiet: pytest output is for the tests, and the requests are recorded anyway."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._send(_json_answer(405, _error("Use POST.", "method_not_allowed")))

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        raw_body = self._read_body()
        content_type = self.headers.get("Content-Type", "")
        fields, file_part = _parse_multipart(raw_body, content_type)
        self.relay._record(
            RecordedRequest(
                method="POST",
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                fields=fields,
                file_name=file_part.get_filename() if file_part else None,
                file_size=len(file_part.get_payload(decode=True) or b"") if file_part else None,
                file_content_type=file_part.get_content_type() if file_part else None,
            )
        )
        if self.path.split("?", 1)[0] != TRANSCRIPTIONS_PATH:
            self._send(_json_answer(404, _error(f"Unknown path {self.path}.", "not_found")))
            return
        if self.headers.get("Authorization") != f"Bearer {self.relay.api_key}":
            # Like OpenAI, and unlike what a client should do with it, echo a hint of the key.
            self._send(
                _json_answer(
                    401,
                    _error(
                        f"Incorrect API key provided: {self.headers.get('Authorization', '')[7:]}.", "invalid_api_key"
                    ),
                )
            )
            return
        if file_part is None:
            self._send(_json_answer(400, _error("No file was sent.", "invalid_request_error")))
            return
        answer = self.relay._answer(raw_body=raw_body, content_type=content_type)
        if answer is None:
            self.close_connection = True
            return
        self._send(answer)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, answer: _Answer) -> None:
        # One request per connection: a kept-alive idle connection would hold its handler thread,
        # and with it the server's close.
        self.close_connection = True
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Connection", "close")
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a timeout test); nothing to answer to.
            self.close_connection = True


def _parse_multipart(raw_body: bytes, content_type: str) -> tuple[dict[str, list[str]], EmailMessage | None]:
    """Split a multipart/form-data body into its text fields and its ``file`` part (stdlib only)."""
    if not content_type.lower().startswith("multipart/form-data"):
        return {}, None
    message = BytesParser(_class=EmailMessage, policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw_body
    )
    fields: dict[str, list[str]] = {}
    file_part: EmailMessage | None = None
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if name == "file" or part.get_filename() is not None:
            file_part = part
            continue
        payload = part.get_payload(decode=True) or b""
        fields.setdefault(name, []).append(payload.decode(part.get_content_charset() or "utf-8"))
    return fields, file_part


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def _json_answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(status, json.dumps(body).encode(), "application/json", headers or {})
