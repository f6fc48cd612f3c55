"""Request bodies over their route's limit are refused while they arrive, before they are buffered,
with or without Content-Length, in the envelope; a malformed multipart body gets the envelope too.

The daphne tests send bodies twice the upload limit (the 100 MiB default) to a real server over a
raw socket and measure the server process's peak memory around them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core.asgi import get_asgi_application

from scaiecho_site.bodylimit import MULTIPART_ALLOWANCE, BodyLimitMiddleware
from tests.factories import KeyFactory
from transcription.models import TranscriptionJob

MIB = 1024 * 1024
TRANSCRIBE_PATH = "/v1/modules/scaiecho/transcribe"
OAI_PATH = "/oai/v1/audio/transcriptions"
POLICY_PATH = "/v1/modules/scaiecho/tenant-policy"
# Peak growth the issue allows the web process for a refused 2x body.
MAX_GROWTH_BYTES = 50 * 1000 * 1000


# --- a raw HTTP/1.1 client that keeps sending while it reads -------------------------------------


class Sent:
    """A request sent in the background; ``answered_after`` is how much of its body the client
    had sent when the first byte of the answer came back."""

    def __init__(self) -> None:
        self.body_bytes = 0
        self.answered_after: int | None = None
        self.response = b""


def send_body(port: int, path: str, total: int, *, content_length: bool, headers: dict[str, str] | None = None) -> Sent:
    """POST ``total`` bytes to ``path``, declared with Content-Length or chunked, and read the
    answer while the body is still going out (as a client that streams an upload does)."""
    sent = Sent()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
    head += f"Content-Length: {total}\r\n" if content_length else "Transfer-Encoding: chunked\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock.sendall(head.encode() + b"\r\n")
    piece = b"\0" * (256 * 1024)
    stop = threading.Event()

    def pump() -> None:
        try:
            while sent.body_bytes < total and not stop.is_set():
                size = min(len(piece), total - sent.body_bytes)
                data = piece[:size] if content_length else b"%x\r\n%s\r\n" % (size, piece[:size])
                sock.sendall(data)
                sent.body_bytes += size
            if not content_length and not stop.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server closed the connection after its answer

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        while True:
            data = sock.recv(65536)
            if sent.answered_after is None:
                sent.answered_after = sent.body_bytes
            if not data:
                break
            sent.response += data
            if _complete(sent.response):
                break
    except OSError:
        pass
    finally:
        stop.set()
        sock.close()
        sender.join(timeout=30)
    return sent


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def parse(response: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


def assert_too_large(response: bytes, *, request_id: str | None = None) -> dict:
    status, headers, body = parse(response)
    assert status == 413, response[:500]
    assert body["status"] == "error"
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert body["meta"]["request_id"] == headers["x-request-id"]
    if request_id is not None:
        assert headers["x-request-id"] == request_id
    return body


# --- memory of the server process ----------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def peak_growth(pid: int, action) -> tuple[int, object]:
    """Run ``action`` and return how far the process's resident memory peaked above where it was."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _status_kib(pid, "VmRSS")
    result = action()
    time.sleep(0.5)
    return (_status_kib(pid, "VmHWM") - before) * 1024, result


# --- against a real daphne server -----------------------------------------------------------------


@pytest.fixture
def daphne(daphne_server):
    # Everything the first upload loads (the multipart parser, the upload views) is in memory
    # before the measurements start.
    httpx.post(f"{daphne_server.url}{TRANSCRIBE_PATH}", files={"file": ("a.wav", b"RIFF" * 100)}, timeout=30)
    return daphne_server


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
def test_twice_the_upload_limit_is_refused_without_the_server_growing(daphne, content_length):
    key = KeyFactory.issue(role="tenant_admin")
    limit = settings.SCAIECHO_MAX_UPLOAD_BYTES + MULTIPART_ALLOWANCE
    total = 2 * settings.SCAIECHO_MAX_UPLOAD_BYTES

    growth, sent = peak_growth(
        daphne.process.pid,
        lambda: send_body(
            daphne.port,
            TRANSCRIBE_PATH,
            total,
            content_length=content_length,
            headers={"Authorization": f"Bearer {key.secret}", "X-Request-Id": "upload-2x-0001"},
        ),
    )

    body = assert_too_large(sent.response, request_id="upload-2x-0001")
    assert str(limit) in body["error"]["message"]
    assert growth < MAX_GROWTH_BYTES, f"the server grew by {growth / MIB:.0f} MiB"
    # The answer came while the body was still going out: it was not read to the end first.
    assert sent.answered_after is not None
    assert sent.answered_after < total
    if content_length:
        assert sent.answered_after < limit  # refused from the headers alone
    assert not TranscriptionJob.objects.exists()
    assert httpx.get(f"{daphne.url}/healthz", timeout=10).status_code == 200


@pytest.mark.slow
def test_oversize_declared_body_with_expect_continue_gets_413_instead_of_100(daphne):
    """curl asks before sending a large upload; the answer is the refusal, not ``100 Continue``."""
    with socket.create_connection(("127.0.0.1", daphne.port), timeout=30) as sock:
        sock.sendall(
            f"POST {OAI_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {3 * settings.SCAIECHO_MAX_UPLOAD_BYTES}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        response = b""
        while not _complete(response):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    assert not response.startswith(b"HTTP/1.1 100")
    assert_too_large(response)


@pytest.mark.slow
@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
def test_other_routes_take_the_small_limit(daphne, content_length):
    total = settings.SCAIECHO_MAX_REQUEST_BYTES + 1
    sent = send_body(daphne.port, POLICY_PATH, total, content_length=content_length)
    body = assert_too_large(sent.response)
    assert str(settings.SCAIECHO_MAX_REQUEST_BYTES) in body["error"]["message"]


@pytest.mark.slow
def test_streaming_client_sees_the_envelope(daphne):
    """httpx streaming a body of unknown length (chunked) gets the 413 envelope."""

    def body():
        for _ in range(4):
            yield b"{" * (settings.SCAIECHO_MAX_REQUEST_BYTES // 2)

    response = httpx.patch(f"{daphne.url}{POLICY_PATH}", content=body(), headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert response.json()["meta"]["request_id"] == response.headers["X-Request-Id"]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=\x7f"],
    ids=["no-boundary", "empty-boundary", "bad-boundary"],
)
def test_malformed_multipart_is_an_enveloped_validation_error(daphne, content_type):
    key = KeyFactory.issue(role="tenant_admin")
    response = httpx.post(
        f"{daphne.url}{TRANSCRIBE_PATH}",
        content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF',
        headers={"Authorization": f"Bearer {key.secret}", "Content-Type": content_type},
        timeout=30,
    )
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["error"]["details"][0]["field"] == "body"
    assert "multipart" in body["error"]["details"][0]["message"].lower()
    assert body["meta"]["request_id"] == response.headers["X-Request-Id"]
    assert not TranscriptionJob.objects.exists()


# --- the ASGI middleware, for servers that stream the body to the application ---------------------


@pytest.fixture
def asgi_app():
    return BodyLimitMiddleware(get_asgi_application())


def http_scope(path: str, *, method: str = "POST", headers: list[tuple[bytes, bytes]] = ()) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def answer(communicator: ApplicationCommunicator) -> tuple[int, dict[bytes, bytes], dict]:
    start = await communicator.receive_output(timeout=10)
    assert start["type"] == "http.response.start"
    body = await communicator.receive_output(timeout=10)
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def test_asgi_declared_oversize_body_is_refused_unread(asgi_app, settings):
    settings.SCAIECHO_MAX_REQUEST_BYTES = 1000
    communicator = ApplicationCommunicator(
        asgi_app, http_scope(POLICY_PATH, method="PATCH", headers=[(b"content-length", b"5000"), (b"x-request-id", b"asgi-trace-01")])
    )

    async def scenario():
        await communicator.send_input({"type": "http.request", "body": b"x" * 5000, "more_body": False})
        answered = await answer(communicator)
        unread = communicator.input_queue.qsize()
        await communicator.wait(timeout=5)
        return answered, unread

    (status, headers, body), unread = asyncio.run(scenario())

    assert status == 413
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert headers[b"X-Request-Id"] == b"asgi-trace-01" == body["meta"]["request_id"].encode()
    assert unread == 1  # the body was never read


def test_asgi_streamed_body_is_refused_at_the_limit(asgi_app, settings):
    settings.SCAIECHO_MAX_UPLOAD_BYTES = 10_000
    limit = 10_000 + MULTIPART_ALLOWANCE
    communicator = ApplicationCommunicator(asgi_app, http_scope(OAI_PATH, headers=[(b"content-type", b"multipart/form-data; boundary=b")]))
    chunk = b"x" * 16 * 1024
    messages = 2 * limit // len(chunk)

    async def scenario():
        for _ in range(messages):
            await communicator.send_input({"type": "http.request", "body": chunk, "more_body": True})
        answered = await answer(communicator)
        unread = communicator.input_queue.qsize()
        await communicator.wait(timeout=5)
        return answered, unread

    (status, _, body), unread = asyncio.run(scenario())

    assert status == 413
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    read = messages - unread
    assert read * len(chunk) <= limit + len(chunk)  # stopped at the first chunk past the limit


def test_asgi_body_within_the_limit_reaches_the_application(asgi_app, settings):
    settings.SCAIECHO_MAX_REQUEST_BYTES = 1000
    communicator = ApplicationCommunicator(asgi_app, http_scope("/healthz", method="GET"))

    async def scenario():
        await communicator.send_input({"type": "http.request", "body": b"x" * 600, "more_body": True})
        await communicator.send_input({"type": "http.request", "body": b"x" * 400, "more_body": False})
        answered = await answer(communicator)
        await communicator.wait(timeout=5)
        return answered

    status, _, body = asyncio.run(scenario())

    assert status == 200
    assert body == {"status": "ok", "module": "scaiecho"}
