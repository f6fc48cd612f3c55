"""Bounds on live streams (issue 11, "Streams"), as a WebSocket client sees them.

Concurrent sessions per key and per tenant, the open rate, the budget metered as audio arrives,
the pace of the audio, the declared sample rate, and the bounded queues between the client, the
web process and the stream worker. Every refusal is an ``error`` frame and a documented close
code, and each test also checks that nothing was consumed past the bound (relay calls, audio
transcribed, usage billed). Backend B is a real local relay server; the stream worker tests run a
real stream worker with the real Whisper model in this process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from speech.audio import SAMPLE_RATE, decode_audio, float_to_pcm
from streaming import worker as worker_module
from streaming.limits import stream_slots_acquire
from streaming.tokens import caption_token_issue
from streaming.worker import StreamWorker
from tenants.models import Role, TenantBudget, UsageRecord
from tests.factories import IssuedKey, KeyFactory
from tests.streaming.test_consumer import (
    PATH,
    Client,
    assert_error_close,
    issue,
    open_until_close,
    run,
    stream_opened,
    stream_until_close,
)

pytestmark = pytest.mark.django_db(transaction=True)


def pcm_seconds(speech_wav: bytes, seconds: float) -> bytes:
    """``seconds`` of 16 kHz s16 PCM: the speech, repeated as needed."""
    samples = decode_audio(speech_wav).samples
    needed = round(seconds * SAMPLE_RATE)
    return float_to_pcm(np.resize(samples, needed))


async def open_stream(key_or_token: str, **fields: Any) -> tuple[Client, dict[str, Any]]:
    """A connected client that sent ``open``, and its first frame (``ready`` or ``error``)."""
    client = Client(f"{PATH}?token={key_or_token}")
    await client.__aenter__()
    await client.send({"type": "open", "media_type": "audio/pcm", "sample_rate": 16000, **fields})
    return client, await client.next_frame()


async def close_all(clients: list[Client]) -> None:
    for client in clients:
        await client.__aexit__()


def same_tenant_key(key: IssuedKey) -> IssuedKey:
    return KeyFactory.issue(role=Role.TENANT_VIEWER, tenant=key.tenant)


def stream_usage_ms(key: IssuedKey) -> int:
    return sum(UsageRecord.objects.filter(tenant=key.tenant, kind="stream").values_list("audio_duration_ms", flat=True))


# --- concurrent sessions --------------------------------------------------------------------------


def test_the_ninth_concurrent_stream_of_one_key_is_closed_4429_at_defaults(relay):
    key = issue()

    async def scenario():
        clients = []
        try:
            for _ in range(8):
                client, ready = await open_stream(key.secret)
                clients.append(client)
                assert ready["type"] == "ready", ready
            ninth = Client(f"{PATH}?token={key.secret}")
            async with ninth:
                await ninth.send({"type": "open"})
                refused = await ninth.frames_until_close()
            # One of the eight ends: its slot is free again at once.
            await clients[0].send({"type": "close"})
            _, first_code = await clients[0].frames_until_close()
            again, ready_again = await open_stream(key.secret)
            clients.append(again)
            return refused, first_code, ready_again
        finally:
            await close_all(clients)

    (frames, code), first_code, ready_again = run(scenario())
    error = assert_error_close(frames, code, 4429, "RATE_LIMITED")
    assert [f["type"] for f in frames] == ["error"]  # never ready: no session was started for it
    assert "8 live streams" in error["message"]
    assert error["retry_after"] >= 1
    assert first_code == 1000
    assert ready_again["type"] == "ready"


def test_caption_token_sessions_count_toward_the_key_that_minted_them(relay, settings):
    settings.SCAIECHO_STREAM_MAX_PER_KEY = 2
    key = issue()
    token = caption_token_issue(api_key_id=key.key.pk)

    async def scenario():
        clients = []
        try:
            for secret in (key.secret, token):
                client, ready = await open_stream(secret)
                clients.append(client)
                assert ready["type"] == "ready", ready
            third = Client(f"{PATH}?token={token}")
            async with third:
                await third.send({"type": "open"})
                return await third.frames_until_close()
        finally:
            await close_all(clients)

    frames, code = run(scenario())
    assert_error_close(frames, code, 4429, "RATE_LIMITED")


def test_the_tenant_cap_counts_every_key_of_the_tenant(relay, settings):
    settings.SCAIECHO_STREAM_MAX_PER_TENANT = 2
    first = issue()
    second, third = same_tenant_key(first), same_tenant_key(first)
    other_tenant = issue()

    async def scenario():
        clients = []
        try:
            for key in (first, second):
                client, ready = await open_stream(key.secret)
                clients.append(client)
                assert ready["type"] == "ready", ready
            refused = Client(f"{PATH}?token={third.secret}")
            async with refused:
                await refused.send({"type": "open"})
                frames = await refused.frames_until_close()
            elsewhere, ready_elsewhere = await open_stream(other_tenant.secret)
            clients.append(elsewhere)
            return frames, ready_elsewhere
        finally:
            await close_all(clients)

    (frames, code), ready_elsewhere = run(scenario())
    error = assert_error_close(frames, code, 4429, "RATE_LIMITED")
    assert "tenant already has 2 live streams" in error["message"]
    assert ready_elsewhere["type"] == "ready"  # another tenant is not affected


def test_slots_of_a_crashed_web_process_expire_after_their_ttl(relay, settings):
    settings.SCAIECHO_STREAM_MAX_PER_KEY = 1
    settings.SCAIECHO_STREAM_SLOT_TTL_SECONDS = 1
    key = issue()
    # A web process took the key's only slot, then died without releasing or refreshing it.
    stream_slots_acquire(key_id=str(key.key.pk), tenant_id=str(key.tenant.pk), session_id="str_crashed", backend="B")

    async def scenario():
        blocked = Client(f"{PATH}?token={key.secret}")
        async with blocked:
            await blocked.send({"type": "open"})
            frames = await blocked.frames_until_close()
        await asyncio.sleep(1.5)
        client, ready = await open_stream(key.secret)
        await close_all([client])
        return frames, ready

    (frames, code), ready = run(scenario())
    assert_error_close(frames, code, 4429, "RATE_LIMITED")
    assert ready["type"] == "ready"


def test_a_live_session_keeps_its_slot_past_the_ttl(relay, settings):
    settings.SCAIECHO_STREAM_MAX_PER_KEY = 1
    settings.SCAIECHO_STREAM_SLOT_TTL_SECONDS = 1
    key = issue()

    async def scenario():
        live, ready = await open_stream(key.secret)
        try:
            for _ in range(6):  # 1.8 s, well past the TTL, kept alive
                await asyncio.sleep(0.3)
                await live.send({"type": "keepalive"})
            second = Client(f"{PATH}?token={key.secret}")
            async with second:
                await second.send({"type": "open"})
                return ready, await second.frames_until_close()
        finally:
            await close_all([live])

    ready, (frames, code) = run(scenario())
    assert ready["type"] == "ready"
    assert_error_close(frames, code, 4429, "RATE_LIMITED")


# --- open rate ------------------------------------------------------------------------------------


def test_stream_opens_are_rate_limited_per_key_and_per_tenant(relay, settings):
    settings.SCAIECHO_STREAM_OPENS_PER_KEY = 3
    settings.SCAIECHO_STREAM_OPENS_PER_TENANT = 4
    key = issue()
    sibling = same_tenant_key(key)

    async def open_and_close(secret: str) -> tuple[list[dict[str, Any]], int]:
        async with Client(f"{PATH}?token={secret}") as client:
            await client.send({"type": "open"})
            first = await client.next_frame()
            if first["type"] != "ready":
                return [first], (await client.frames_until_close())[1]
            await client.send({"type": "close"})
            frames, code = await client.frames_until_close()
            return [first, *frames], code

    async def scenario():
        return [await open_and_close(key.secret) for _ in range(4)] + [
            await open_and_close(sibling.secret) for _ in range(2)
        ]

    outcomes = run(scenario())
    assert [code for _, code in outcomes] == [1000, 1000, 1000, 4429, 1000, 4429]
    for frames, code in (outcomes[3], outcomes[5]):
        error = assert_error_close(frames, code, 4429, "RATE_LIMITED")
        assert error["retry_after"] >= 1
        assert "Too many streams opened" in error["message"]


# --- the budget, metered as the audio arrives -----------------------------------------------------


def test_a_stream_budget_exhausted_mid_session_closes_4429_after_the_finals(relay, speech_wav):
    key = issue()
    TenantBudget.objects.create(tenant=key.tenant, period="total", limit_audio_seconds=3, hard_action="block")
    audio = pcm_seconds(speech_wav, 6.0)

    async def scenario():
        async with stream_opened(key.secret, media_type="audio/pcm", sample_rate=16000, chunk_seconds=1.0) as client:
            await client.send_audio(audio, frame_size=3200)  # 0.1 s a frame
            frames = await client.frames_until_close()
        async with Client(f"{PATH}?token={key.secret}") as late:
            await late.send({"type": "open"})
            return frames, await late.frames_until_close()

    (frames, code), (late_frames, late_code) = run(scenario())
    error = assert_error_close(frames, code, 4429, "BUDGET_EXCEEDED")
    assert "3.00 s" in error["message"]
    finals = [f for f in frames if f["type"] == "delta"]
    # What was heard, up to the budget, was transcribed before the error: 3 chunks of 1 s.
    assert [(f["start"], f["end"]) for f in finals] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    assert len(relay.requests) == 3
    # Billed: exactly the 3 s the budget allowed, not the 6 s sent.
    assert stream_usage_ms(key) == 3000
    assert_error_close(late_frames, late_code, 4429, "BUDGET_EXCEEDED")


def test_live_sessions_of_a_tenant_share_its_budget_before_they_are_billed(relay, speech_wav, settings):
    settings.SCAIECHO_STREAM_RECHECK_SECONDS = 0
    key = issue()
    TenantBudget.objects.create(tenant=key.tenant, period="total", limit_audio_seconds=4, hard_action="block")

    async def scenario():
        first, _ = await open_stream(key.secret, chunk_seconds=1.0)
        try:
            await first.send_audio(pcm_seconds(speech_wav, 3.0), frame_size=3200)
            await first.send({"type": "finalize"})
            for _ in range(3):  # its 3 s are transcribed (and recorded in its slot) while it stays open
                assert (await first.next_frame())["type"] == "delta"
            second, second_ready = await open_stream(key.secret, chunk_seconds=1.0)
            assert second_ready["type"] == "ready", second_ready
            await second.send_audio(pcm_seconds(speech_wav, 3.0), frame_size=3200)
            second_frames = await second.frames_until_close()
            await second.__aexit__()
            await first.send({"type": "close"})
            first_frames, first_code = await first.frames_until_close()
            return second_frames, first_code
        finally:
            await close_all([first])

    (frames, code), first_code = run(scenario())
    assert_error_close(frames, code, 4429, "BUDGET_EXCEEDED")
    assert [(f["start"], f["end"]) for f in frames if f["type"] == "delta"] == [(0.0, 1.0)]
    assert first_code == 1000
    assert stream_usage_ms(key) == 4000


# --- pace and declared rate -----------------------------------------------------------------------


def test_audio_faster_than_twice_real_time_is_refused_after_the_burst(relay, speech_wav, settings):
    settings.SCAIECHO_STREAM_BURST_SECONDS = 1.0
    key = issue()

    async def scenario():
        async with stream_opened(key.secret, media_type="audio/pcm", sample_rate=16000, chunk_seconds=0.5) as client:
            await client.send_audio(pcm_seconds(speech_wav, 20.0), frame_size=8000)  # 20 s at once
            return await client.frames_until_close()

    frames, code = run(scenario())
    error = assert_error_close(frames, code, 4429, "RATE_LIMITED")
    assert "faster than 2x real time" in error["message"]
    # Only about the burst was taken: the rest was neither transcribed nor billed.
    assert stream_usage_ms(key) <= 2000
    assert len(relay.requests) <= 4


def test_audio_at_one_and_a_half_times_real_time_streams_to_the_end(relay, speech_wav, settings):
    settings.SCAIECHO_STREAM_BURST_SECONDS = 0.5
    key = issue()
    audio = pcm_seconds(speech_wav, 3.0)

    async def scenario():
        async with stream_opened(key.secret, media_type="audio/pcm", sample_rate=16000, chunk_seconds=1.0) as client:
            started = time.monotonic()
            for index, offset in enumerate(range(0, len(audio), 8000)):  # 0.25 s frames every 1/6 s
                await client.ws.send_to(bytes_data=audio[offset : offset + 8000])
                await asyncio.sleep(max(0.0, started + (index + 1) * 0.25 / 1.5 - time.monotonic()))
            await client.send({"type": "close"})
            return await client.frames_until_close()

    frames, code = run(scenario())
    assert code == 1000, frames[-1]
    assert frames[-1]["audio_duration_ms"] == 3000


@pytest.mark.parametrize(
    ("open_fields", "field"),
    [
        ({"media_type": "audio/pcm", "sample_rate": 4000}, "sample_rate"),
        ({"media_type": "audio/pcm", "sample_rate": 1}, "sample_rate"),
        ({"media_type": "audio/L16;rate=1000"}, "media_type"),
        ({"media_type": "audio/L16; rate=400000"}, "media_type"),
    ],
)
def test_a_declared_rate_outside_8_to_192_khz_is_refused_4400(relay, open_fields, field):
    key = issue()

    frames, code = open_until_close(key.secret, **open_fields)
    error = assert_error_close(frames, code, 4400, "VALIDATION_ERROR")
    assert error["field"] == field
    assert stream_usage_ms(key) == 0
    assert not relay.requests


def test_pcm_at_a_low_allowed_rate_is_metered_by_its_real_duration(relay, speech_wav):
    key = issue()
    eight_khz = float_to_pcm(np.resize(decode_audio(speech_wav).samples, 8000 * 2))  # 2 s at 8 kHz

    frames, code = stream_until_close(
        key.secret, eight_khz, frame_size=1600, media_type="audio/L16;rate=8000", chunk_seconds=1.0
    )
    assert code == 1000, frames[-1]
    assert abs(frames[-1]["audio_duration_ms"] - 2000) <= 5
    assert abs(stream_usage_ms(key) - 2000) <= 5


# --- bounded queues -------------------------------------------------------------------------------


def test_frames_piling_up_behind_a_slow_backend_close_the_stream_4429(relay, speech_wav, settings, monkeypatch):
    # Given a relay that takes 2 s a chunk: the session's 4-chunk queue fills and the stream waits
    monkeypatch.setattr(relay, "hang_s", 2.0)
    relay.mode = "hang"
    settings.SCAIECHO_STREAM_MAX_PENDING_FRAMES = 8
    settings.SCAIECHO_STREAM_BURST_SECONDS = 600
    key = issue()
    audio = pcm_seconds(speech_wav, 40.0)

    async def scenario():
        async with stream_opened(key.secret, media_type="audio/pcm", sample_rate=16000, chunk_seconds=0.5) as client:
            await client.send_audio(audio, frame_size=16000)  # 80 frames of 0.5 s, at once
            return await client.frames_until_close(wait=10)

    frames, code = run(scenario())
    error = assert_error_close(frames, code, 4429, "RATE_LIMITED")
    assert "wait unread" in error["message"]
    # Taken: the chunks in flight and queued, and the frames buffered — nowhere near the 40 s sent.
    assert stream_usage_ms(key) <= 8000
    time.sleep(2.5)
    assert len(relay.requests) <= 2  # the queued chunks were dropped, not relayed for nobody


# --- the stream worker ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper() -> Iterator[Any]:
    from scaiecho_site.engines import build_engine

    engine = build_engine()
    engine.load()
    return engine


@pytest.fixture
def in_process_worker(whisper, settings, monkeypatch) -> Iterator[dict[str, Any]]:
    """A real stream worker (one lane, the real model) that runs in the test's event loop, as the
    embedded worker of the in-memory channel layer does; ``start`` it inside the scenario."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    holder: dict[str, Any] = {}

    async def start() -> StreamWorker:
        worker = StreamWorker(engine=whisper, lanes=1)
        await worker.start()
        monkeypatch.setattr(worker_module, "_embedded", worker)
        holder["worker"] = worker
        holder["task"] = asyncio.create_task(worker.run())
        return worker

    holder["start"] = start
    return holder


async def stop_worker(holder: dict[str, Any]) -> None:
    holder["worker"].stopping.set()
    await holder["task"]


@pytest.mark.slow
def test_a_closed_sessions_queued_audio_is_dropped_by_the_worker(in_process_worker, speech_wav, settings):
    settings.SCAIECHO_STREAM_BURST_SECONDS = 600
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    audio = pcm_seconds(speech_wav, 30.0)

    async def scenario():
        worker = await in_process_worker["start"]()
        try:
            client, ready = await open_stream(key.secret, language_hint="en")
            assert ready["type"] == "ready", ready
            await client.send_audio(audio, frame_size=16000)  # 30 s in 0.5 s frames, at once
            deadline = time.monotonic() + 20
            while worker.decoded_audio_s < 0.5:  # the worker is busy with the session
                assert time.monotonic() < deadline, "the worker never decoded the session's audio"
                await asyncio.sleep(0.05)
            await client.__aexit__()  # the client leaves
            await asyncio.sleep(0.5)
            live_after_leaving = len(worker.sessions)
            decoded_at_leaving = worker.decoded_audio_s
            await asyncio.sleep(3)
            return live_after_leaving, decoded_at_leaving, worker.decoded_audio_s, worker.dropped_audio_s
        finally:
            await stop_worker(in_process_worker)

    live, decoded_at_leaving, decoded_later, dropped = run(scenario())
    # Then the worker forgot the session and decodes none of its queued audio
    assert live == 0
    assert decoded_later == decoded_at_leaving
    assert decoded_later < 15
    # What had reached the worker's queue by then was dropped, not decoded (how much had reached it
    # depends on how fast this machine forwarded the burst).
    assert dropped > 0
    # And only the audio it received is billed (metered whatever the worker made of it)
    assert 0 < stream_usage_ms(key) <= 30_000


@pytest.mark.slow
def test_the_worker_is_never_sent_more_than_the_in_flight_bound(in_process_worker, speech_wav, settings):
    settings.SCAIECHO_STREAM_BURST_SECONDS = 600
    settings.SCAIECHO_STREAM_MAX_INFLIGHT_SECONDS = 2.0
    settings.SCAIECHO_STREAM_MAX_PENDING_FRAMES = 6
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    audio = pcm_seconds(speech_wav, 60.0)

    async def scenario():
        worker = await in_process_worker["start"]()
        try:
            async with stream_opened(key.secret, media_type="audio/pcm", sample_rate=16000, language_hint="en") as client:
                await client.send_audio(audio, frame_size=16000)  # 60 s in 0.5 s frames, at once
                frames, code = await client.frames_until_close(wait=30)
            await asyncio.sleep(1)
            return frames, code, worker.decoded_audio_s + worker.dropped_audio_s
        finally:
            await stop_worker(in_process_worker)

    frames, code, received_by_worker = run(scenario())
    error = assert_error_close(frames, code, 4429, "RATE_LIMITED")
    assert "wait unread" in error["message"]
    # The web process held back: the worker got the in-flight bound and a frame, not 60 s.
    assert received_by_worker <= 2.0 + 0.5 + 0.5
    assert stream_usage_ms(key) <= 3000


@pytest.mark.slow
def test_the_workers_inbox_per_session_is_bounded(in_process_worker, speech_wav, settings):
    settings.SCAIECHO_STREAM_WORKER_INBOX_SECONDS = 5.0
    second = pcm_seconds(speech_wav, 1.0)

    async def scenario():
        worker = await in_process_worker["start"]()
        try:
            reply = await worker.layer.new_channel()
            await worker.layer.send(
                worker.channel,
                {"type": "session.open", "session_id": "str_flood", "reply_to": reply, "language": "en", "chunk_seconds": 5.0},
            )
            for _ in range(20):  # a sender that ignores backpressure: 20 s at once
                await worker.layer.send(worker.channel, {"type": "session.audio", "session_id": "str_flood", "pcm": second})
            while True:
                message = await asyncio.wait_for(worker.layer.receive(reply), timeout=30)
                if message["type"] == "stream.error":
                    break
            await asyncio.sleep(2)
            return message, worker.decoded_audio_s, worker.dropped_audio_s, len(worker.sessions)
        finally:
            await stop_worker(in_process_worker)

    message, decoded, dropped, live = run(scenario())
    assert message["code"] == "RATE_LIMITED"
    assert live == 0
    # At most the bound was queued (plus the one being decoded); the rest was never taken in.
    assert dropped <= 5.0 + 1e-6
    assert decoded + dropped <= 8.0
