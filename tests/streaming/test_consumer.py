"""The live streaming protocol, as a WebSocket client sees it (contract section 4).

The consumer runs in-process through Channels' ``WebsocketCommunicator``; Backend B is a real
local server speaking OpenAI's transcription protocol.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import connections

from streaming.middleware import TokenScopeMiddleware
from streaming.routing import websocket_urlpatterns
from tenants.context import system_actor
from tenants.models import Role, TenantBudget, TenantPolicy, UsageRecord
from tenants.services import api_key_revoke
from tests.factories import IssuedKey, KeyFactory
from tests.relay_server import DEFAULT_VERBOSE_JSON
from tests.streaming.conftest import RELAY_KEY

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "/v1/modules/scaiecho/stream/transcribe"
APP = TokenScopeMiddleware(URLRouter(websocket_urlpatterns))


def issue(role: str = Role.TENANT_VIEWER, *, policy: tuple[str, str] = ("B", "B")) -> IssuedKey:
    key = KeyFactory.issue(role=role)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends=policy[0], default_backend=policy[1])
    return key


class Client:
    """A WebSocket client: frames go out, frames and the close code come back."""

    def __init__(self, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.ws = WebsocketCommunicator(APP, path, headers=headers or [])

    async def __aenter__(self) -> Client:
        connected, _ = await self.ws.connect()
        assert connected
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.disconnect()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_to(text_data=json.dumps(frame))

    async def send_audio(self, data: bytes, frame_size: int = 8192) -> None:
        for offset in range(0, len(data), frame_size):
            await self.ws.send_to(bytes_data=data[offset : offset + frame_size])

    async def frames_until_close(self, wait: float = 30) -> tuple[list[dict[str, Any]], int]:
        frames: list[dict[str, Any]] = []
        while True:
            output = await self.ws.receive_output(timeout=wait)
            if output["type"] == "websocket.close":
                return frames, output.get("code", 1000)
            frames.append(json.loads(output["text"]))

    async def next_frame(self, wait: float = 30) -> dict[str, Any]:
        output = await self.ws.receive_output(timeout=wait)
        assert output["type"] == "websocket.send", output
        return json.loads(output["text"])


def run(scenario: Any) -> Any:
    async def and_close_connections() -> Any:
        try:
            return await scenario
        finally:
            # The consumer's database calls ran on asgiref's shared thread; close its connection
            # there, or the test database could not be dropped at the end of the run.
            await sync_to_async(connections.close_all)()

    return asyncio.run(and_close_connections())


@asynccontextmanager
async def stream_opened(secret: str, **fields: Any) -> AsyncIterator[Client]:
    """A client whose stream is open: ``open`` sent with ``fields``, the answer to it read."""
    async with Client(f"{PATH}?token={secret}") as client:
        await client.send({"type": "open", **fields})
        await client.next_frame()
        yield client


def open_until_close(secret: str, **fields: Any) -> tuple[list[dict[str, Any]], int]:
    """Send ``open`` with ``fields``; every frame until the server closes, and the close code."""

    async def scenario():
        async with Client(f"{PATH}?token={secret}") as client:
            await client.send({"type": "open", **fields})
            return await client.frames_until_close()

    return run(scenario())


def stream_until_close(
    secret: str, audio: bytes, *, frame_size: int = 8192, **fields: Any
) -> tuple[list[dict[str, Any]], int]:
    """Open with ``fields``, send ``audio`` in frames of ``frame_size`` bytes and ``close``; every
    frame after the answer to ``open`` until the server closes, and the close code."""

    async def scenario():
        async with stream_opened(secret, **fields) as client:
            await client.send_audio(audio, frame_size=frame_size)
            await client.send({"type": "close"})
            return await client.frames_until_close()

    return run(scenario())


def assert_error_close(frames: list[dict[str, Any]], code: int, close: int, expected_code: str) -> dict[str, Any]:
    assert code == close, frames
    assert frames[-1]["type"] == "error", frames
    assert frames[-1]["code"] == expected_code
    assert frames[-1]["message"]
    return frames[-1]


def test_missing_token_is_4401_after_accept():
    async def scenario():
        async with Client(PATH) as client:
            return await client.frames_until_close()

    frames, code = run(scenario())
    assert_error_close(frames, code, 4401, "AUTH_TOKEN_MISSING")


def test_bad_token_is_4401():
    async def scenario():
        async with Client(PATH + "?token=sgk_" + "x" * 43) as client:
            return await client.frames_until_close()

    frames, code = run(scenario())
    assert_error_close(frames, code, 4401, "AUTH_TOKEN_INVALID")


def test_happy_path_over_the_relay_with_header_auth(relay, speech_wav):
    key = issue()

    async def scenario():
        async with Client(PATH, headers=[(b"authorization", f"Bearer {key.secret}".encode())]) as client:
            await client.send({"type": "open", "media_type": "audio/wav", "chunk_seconds": 2.0, "language_hint": "en"})
            ready = await client.next_frame()
            await client.send_audio(speech_wav)
            await client.send({"type": "close"})
            frames, code = await client.frames_until_close()
            return ready, frames, code

    ready, frames, code = run(scenario())
    assert ready["type"] == "ready"
    assert ready["backend_used"] == "B"
    assert ready["session_id"].startswith("str_")
    assert ready["expires_at"].endswith("Z")
    assert code == 1000
    deltas = [f for f in frames if f["type"] == "delta"]
    duration = (len(speech_wav) - 44) / 2 / 22050
    assert len(deltas) == len(relay.requests) >= int(duration / 2)
    assert all(d["is_final"] and d["text"] == DEFAULT_VERBOSE_JSON["text"] for d in deltas)
    assert [d["start"] for d in deltas] == sorted(d["start"] for d in deltas)
    assert deltas[0]["start"] == 0.0
    assert abs(deltas[-1]["end"] - duration) < 0.05
    closed = frames[-1]
    assert closed == {"type": "closed", "audio_bytes": len(speech_wav), "audio_duration_ms": closed["audio_duration_ms"]}
    assert abs(closed["audio_duration_ms"] - duration * 1000) < 50
    sent = relay.requests[0]
    assert sent.headers["authorization"] == f"Bearer {RELAY_KEY}"
    assert sent.fields["language"] == ["en"]
    usage = UsageRecord.objects.get(tenant=key.tenant)
    assert (usage.kind, usage.backend, usage.audio_duration_ms) == ("stream", "B", closed["audio_duration_ms"])


def test_finalize_flushes_without_closing(relay, speech_wav):
    key = issue()

    async def scenario():
        async with stream_opened(key.secret, chunk_seconds=30) as client:
            await client.send_audio(speech_wav)
            await client.send({"type": "finalize"})
            delta = await client.next_frame()
            await client.send({"type": "keepalive"})
            await client.send_audio(speech_wav)
            await client.send({"type": "close"})
            frames, code = await client.frames_until_close()
            return delta, frames, code

    delta, frames, code = run(scenario())
    assert delta["type"] == "delta"
    assert delta["is_final"]
    assert code == 1000
    assert [f["type"] for f in frames] == ["delta", "closed"]
    assert frames[0]["start"] == delta["end"]


@pytest.mark.parametrize(
    ("frames_to_send", "field"),
    [
        ([b"\x00\x01"], "type"),  # audio before open
        (["not json"], "frame"),
        ([{"kind": "open"}], "type"),
        ([{"type": "open", "chunk_seconds": 100}], "chunk_seconds"),
        ([{"type": "open", "sample_rate": "fast"}], "sample_rate"),
        ([{"type": "open", "language_hint": "english"}], "language_hint"),
        ([{"type": "open", "backend_preference": "cheapest"}], "backend_preference"),
        ([{"type": "open", "media_type": "video/mp4"}], "media_type"),
        ([{"type": "open", "colour": "blue"}], "colour"),
        ([{"type": "open"}, {"type": "open"}], "type"),
        ([{"type": "open"}, {"type": "dance"}], "type"),
        ([{"type": "open"}, b""], "audio"),
    ],
)
def test_protocol_violations_are_4400_naming_the_field(relay, frames_to_send, field):
    key = issue()

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            for frame in frames_to_send:
                if isinstance(frame, bytes):
                    await client.ws.send_input({"type": "websocket.receive", "bytes": frame})
                elif isinstance(frame, str):
                    await client.ws.send_to(text_data=frame)
                else:
                    await client.send(frame)
            return await client.frames_until_close()

    frames, code = run(scenario())
    error = assert_error_close(frames, code, 4400, frames[-1]["code"])
    assert error["code"] in ("VALIDATION_ERROR", "UNSUPPORTED_MEDIA")
    assert field in error["message"]
    assert error["field"] == field


def test_undecodable_audio_is_4400(relay):
    key = issue()

    frames, code = stream_until_close(key.secret, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64, media_type="audio/wav")
    assert_error_close(frames, code, 4400, "UNSUPPORTED_MEDIA")


def test_oversize_frame_is_4413(relay, settings):
    settings.SCAIECHO_STREAM_MAX_FRAME_BYTES = 1000
    key = issue()

    async def scenario():
        async with stream_opened(key.secret, media_type="audio/pcm") as client:
            await client.ws.send_to(bytes_data=bytes(1001))
            return await client.frames_until_close()

    frames, code = run(scenario())
    assert_error_close(frames, code, 4413, "PAYLOAD_TOO_LARGE")


def test_idle_stream_is_closed_4408_and_keepalive_prevents_it(relay, settings):
    settings.SCAIECHO_STREAM_IDLE_TIMEOUT_SECONDS = 0.6
    key = issue()

    async def scenario():
        async with stream_opened(key.secret, media_type="audio/pcm") as client:
            for _ in range(4):  # 1.2 s kept alive
                await asyncio.sleep(0.3)
                await client.send({"type": "keepalive"})
            return await client.frames_until_close(wait=10)

    frames, code = run(scenario())
    assert_error_close(frames, code, 4408, "STREAM_TIMEOUT")


@pytest.mark.parametrize(("role", "code_expected"), [(Role.TENANT_USER, "AUTHZ_PERMISSION_DENIED")])
def test_missing_permission_is_4403(relay, role, code_expected):
    key = issue(role)

    frames, code = open_until_close(key.secret)
    assert_error_close(frames, code, 4403, code_expected)


def test_diarize_needs_the_diarize_permission(relay):
    key = issue(Role.TENANT_VIEWER)

    frames, code = open_until_close(key.secret, diarize=True)
    assert_error_close(frames, code, 4403, "AUTHZ_PERMISSION_DENIED")


def test_disabled_module_is_4403(relay):
    key = issue()
    key.tenant.scaiecho_enabled = False
    key.tenant.save(update_fields=["scaiecho_enabled"])

    frames, code = open_until_close(key.secret)
    assert_error_close(frames, code, 4403, "MODULE_NOT_ENABLED")


def test_no_available_backend_is_4502(relay):
    key = issue(policy=("A", "A"))  # no stream worker is running

    frames, code = open_until_close(key.secret)
    assert_error_close(frames, code, 4502, "SCAIECHO_BACKEND_UNAVAILABLE")


def test_budget_exceeded_at_open_is_4429(relay):
    key = issue()
    TenantBudget.objects.create(tenant=key.tenant, period="total", limit_audio_seconds=1, hard_action="block")
    UsageRecord.objects.create(tenant=key.tenant, backend="B", kind="batch", audio_duration_ms=5000, latency_ms=1, cost=0, reference="x")

    frames, code = open_until_close(key.secret)
    assert_error_close(frames, code, 4429, "BUDGET_EXCEEDED")


def test_budget_exhausted_during_the_stream_is_4429(relay, speech_wav, settings):
    settings.SCAIECHO_STREAM_RECHECK_SECONDS = 0
    key = issue()

    async def scenario():
        async with stream_opened(key.secret, chunk_seconds=30) as client:
            await client.send_audio(speech_wav[: len(speech_wav) // 2])
            await asyncio.to_thread(_exhaust_budget, key)
            await client.send_audio(speech_wav[len(speech_wav) // 2 :])
            return await client.frames_until_close()

    frames, code = run(scenario())
    assert_error_close(frames, code, 4429, "BUDGET_EXCEEDED")
    # The audio received before the end is still metered.
    assert UsageRecord.objects.filter(tenant=key.tenant, kind="stream").get().audio_duration_ms > 0


def _exhaust_budget(key: IssuedKey) -> None:
    TenantBudget.objects.create(tenant=key.tenant, period="total", limit_audio_seconds=1, hard_action="block")
    UsageRecord.objects.create(tenant=key.tenant, backend="B", kind="batch", audio_duration_ms=5000, latency_ms=1, cost=0, reference="y")


def test_revoked_key_ends_a_live_stream_4401(relay, speech_wav, settings):
    settings.SCAIECHO_STREAM_RECHECK_SECONDS = 0
    key = issue()

    async def scenario():
        async with stream_opened(key.secret, chunk_seconds=30) as client:
            await client.send_audio(speech_wav[:8192])
            await asyncio.to_thread(api_key_revoke, key=key.key, ctx=system_actor())
            await client.send_audio(speech_wav[8192:16384])
            return await client.frames_until_close()

    frames, code = run(scenario())
    assert_error_close(frames, code, 4401, "AUTH_TOKEN_INVALID")


def test_relay_failure_is_an_error_and_4502(relay, speech_wav):
    relay.mode = "error"
    relay.error_status = 500
    key = issue()

    frames, code = stream_until_close(key.secret, speech_wav, chunk_seconds=1.0)
    assert_error_close(frames, code, 4502, "BACKEND_ERROR")
    assert RELAY_KEY not in json.dumps(frames)


@pytest.mark.parametrize("media_type", ["audio/ogg", "audio/webm", "audio/mpeg", "audio/L16"])
def test_each_media_type_streams_end_to_end(relay, speech_wav, media_type):
    from tests.speech.test_decoders import media_recorder_webm, pcm_payload
    from tests.voices import convert_audio

    make = {
        "audio/ogg": lambda: convert_audio(speech_wav, "ogg"),
        "audio/webm": lambda: media_recorder_webm(speech_wav),
        "audio/mpeg": lambda: convert_audio(speech_wav, "mp3"),
        "audio/L16": lambda: pcm_payload(speech_wav),
    }
    payload = make[media_type]()
    rate = 22050 if media_type == "audio/L16" else 16000  # espeak-ng writes 22.05 kHz
    key = issue()

    frames, code = stream_until_close(
        key.secret, payload, frame_size=4096, media_type=media_type, sample_rate=rate, chunk_seconds=2.0
    )
    assert code == 1000, frames[-1]
    duration_ms = (len(speech_wav) - 44) / 2 / 22050 * 1000
    assert abs(frames[-1]["audio_duration_ms"] - duration_ms) < 120
    assert frames[-1]["audio_bytes"] == len(payload)
    assert [f["type"] for f in frames].count("delta") == len(relay.requests) >= 1


def test_session_longer_than_the_maximum_is_4408(relay, settings):
    settings.SCAIECHO_STREAM_MAX_SESSION_SECONDS = 1
    key = issue()

    async def scenario():
        async with stream_opened(key.secret, media_type="audio/pcm") as client:
            for _ in range(8):  # kept alive, but past the maximum length
                await asyncio.sleep(0.25)
                await client.send({"type": "keepalive"})
            return await client.frames_until_close(wait=10)

    frames, code = run(scenario())
    error = assert_error_close(frames, code, 4408, "STREAM_TIMEOUT")
    assert "maximum length" in error["message"]
