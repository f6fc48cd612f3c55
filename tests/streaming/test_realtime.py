"""OpenAI's Realtime API in transcription mode at ``WS /oai/v1/realtime`` (contract §9).

The protocol, errors and limits through Channels' ``WebsocketCommunicator`` with Backend B (a real
local relay server); the official ``openai`` SDK against a live daphne server and a real stream
worker in ``test_realtime_sdk.py``.
"""

from __future__ import annotations

import base64
import json
import warnings
from typing import Any

import numpy as np
import pytest

from speech.audio import decode_audio, float_to_pcm
from tenants.models import Role, TenantBudget, UsageRecord
from tests.relay_server import DEFAULT_VERBOSE_JSON
from tests.streaming.test_consumer import Client, issue, run

with warnings.catch_warnings():  # Python 3.11's own G.711 encoder: the reference our decoder must match
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "/oai/v1/realtime"
RELAY_TEXT = DEFAULT_VERBOSE_JSON["text"]


def pcm_at(speech_wav: bytes, rate: int) -> bytes:
    """The speech as s16le mono at ``rate``."""
    samples = decode_audio(speech_wav).samples
    positions = np.arange(round(samples.size * rate / 16000)) * 16000 / rate
    return float_to_pcm(np.interp(positions, np.arange(samples.size), samples).astype(np.float32))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_events(data: bytes, *, chunk: int = 9600) -> list[dict[str, Any]]:
    return [{"type": "input_audio_buffer.append", "audio": b64(data[i : i + chunk])} for i in range(0, len(data), chunk)]


def manual_update(**transcription: Any) -> dict[str, Any]:
    return {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {"input": {"turn_detection": None, "transcription": {"model": "whisper-1", **transcription}}},
        },
    }


async def events_until(client: Client, kind: str, wait: float = 30) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await client.next_frame(wait=wait)
        events.append(event)
        if event["type"] == kind:
            return events


def auth_header(key) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key.secret}".encode())]


def assert_openai_error(event: dict[str, Any], code: str) -> dict[str, Any]:
    assert event["type"] == "error", event
    assert event["event_id"].startswith("event_")
    assert event["error"]["code"] == code, event
    assert event["error"]["type"] in ("invalid_request_error", "server_error")
    assert event["error"]["message"]
    assert {"param", "event_id"} <= set(event["error"])
    return event["error"]


def test_manual_commit_transcribes_the_buffer_with_the_sessions_language_and_prompt(relay, speech_wav):
    key = issue()

    async def scenario():
        async with Client(PATH + "?model=gpt-4o-transcribe", headers=auth_header(key)) as client:
            created = await client.next_frame()
            await client.send(manual_update(language="en", prompt="Kenobi, Skywalker"))
            updated = await client.next_frame()
            for event in audio_events(pcm_at(speech_wav, 24000)):
                await client.send(event)
            await client.send({"type": "input_audio_buffer.commit", "event_id": "evt_commit"})
            return created, updated, await events_until(client, "conversation.item.input_audio_transcription.completed")

    created, updated, events = run(scenario())
    assert created["type"] == "session.created"
    assert created["session"]["type"] == "transcription"
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"
    committed, *_, delta, completed = events
    assert committed["type"] == "input_audio_buffer.committed"
    assert committed["previous_item_id"] is None
    assert delta["type"] == "conversation.item.input_audio_transcription.delta"
    assert delta["item_id"] == completed["item_id"] == committed["item_id"]
    assert completed["transcript"] == RELAY_TEXT
    clip_s = decode_audio(speech_wav).samples.size / 16000
    assert completed["usage"]["type"] == "duration"
    assert completed["usage"]["seconds"] == pytest.approx(clip_s, abs=0.1)
    # The relay heard the session's language and prompt; the stream is metered like a native one.
    assert relay.requests[-1].fields["language"] == ["en"]
    assert relay.requests[-1].fields["prompt"] == ["Kenobi, Skywalker"]
    usage = UsageRecord.objects.get(tenant=key.tenant, kind="stream")
    assert usage.audio_duration_ms == pytest.approx(clip_s * 1000, abs=100)


@pytest.mark.parametrize(("fmt", "encode"), [("audio/pcmu", audioop.lin2ulaw), ("audio/pcma", audioop.lin2alaw)])
def test_g711_audio_is_decoded_at_8_khz(relay, speech_wav, fmt, encode):
    key = issue()
    coded = encode(pcm_at(speech_wav, 8000), 2)
    update = manual_update()
    update["session"]["audio"]["input"]["format"] = {"type": fmt}

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.next_frame()
            await client.send(update)
            updated = await client.next_frame()
            for event in audio_events(coded, chunk=3200):
                await client.send(event)
            await client.send({"type": "input_audio_buffer.commit"})
            return updated, await events_until(client, "conversation.item.input_audio_transcription.completed")

    updated, events = run(scenario())
    assert updated["session"]["audio"]["input"]["format"] == {"type": fmt}
    assert events[-1]["transcript"] == RELAY_TEXT
    assert events[-1]["usage"]["seconds"] == pytest.approx(len(coded) / 8000, abs=0.1)


def test_bad_events_get_openai_error_events_and_the_session_goes_on(relay, speech_wav):
    key = issue()
    bad = [
        ("{not json", "invalid_json", None),
        (json.dumps({"type": "response.create", "event_id": "evt_1"}), "invalid_value", "type"),
        (json.dumps({"type": "session.update", "session": {"type": "realtime"}}), "invalid_value", "session.type"),
        (
            json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/flac"}}}}}),
            "invalid_value",
            "session.audio.input.format.type",
        ),
        (
            json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}),
            "invalid_value",
            "session.audio.input.turn_detection.type",
        ),
        (json.dumps({"type": "session.update", "session": {"type": "transcription", "voice": "alloy"}}), "unknown_parameter", "session.voice"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "***", "event_id": "evt_2"}), "invalid_value", "audio"),
        (json.dumps({"type": "input_audio_buffer.commit", "event_id": "evt_3"}), "input_audio_buffer_commit_empty", None),
    ]

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.next_frame()
            answers = []
            for text, _, _ in bad:
                await client.ws.send_to(text_data=text)
                answers.append(await client.next_frame())
            # Still open: a clear is answered, and a cleared buffer cannot be committed.
            await client.send(manual_update())
            await client.next_frame()
            for event in audio_events(pcm_at(speech_wav, 24000)[:48000]):
                await client.send(event)
            await client.send({"type": "input_audio_buffer.clear"})
            cleared = await client.next_frame()
            await client.send({"type": "input_audio_buffer.commit"})
            return answers, cleared, await client.next_frame()

    answers, cleared, after_clear = run(scenario())
    for (_, code, param), answer in zip(bad, answers, strict=True):
        error = assert_openai_error(answer, code)
        assert error["param"] == param
    assert answers[1]["error"]["event_id"] == "evt_1"
    assert answers[6]["error"]["event_id"] == "evt_2"
    assert answers[7]["error"]["event_id"] == "evt_3"
    assert cleared["type"] == "input_audio_buffer.cleared"
    assert_openai_error(after_clear, "input_audio_buffer_commit_empty")


def test_auth_failures_close_4401_and_the_subprotocol_key_works(relay):
    key = issue()

    async def scenario():
        async with Client(PATH) as client:
            missing = await client.frames_until_close()
        async with Client(PATH + "?token=sgk_" + "x" * 43) as client:
            invalid = await client.frames_until_close()
        client = Client(PATH)
        client.ws.scope["subprotocols"] = ["realtime", f"openai-insecure-api-key.{key.secret}"]
        connected, subprotocol = await client.ws.connect()
        created = await client.next_frame()
        await client.ws.disconnect()
        return missing, invalid, subprotocol, created

    missing, invalid, subprotocol, created = run(scenario())
    for (events, code), expected in ((missing, "AUTH_TOKEN_MISSING"), (invalid, "AUTH_TOKEN_INVALID")):
        assert code == 4401
        assert_openai_error(events[-1], expected)
    assert subprotocol == "realtime"
    assert created["type"] == "session.created"


def test_permissions_hold_transcribe_at_connect_and_diarize_at_update(relay):
    nobody = issue(Role.TENANT_USER)
    viewer = issue(Role.TENANT_VIEWER)
    admin = issue(Role.TENANT_ADMIN)
    diarize = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe-diarize"}}}}}

    async def scenario():
        async with Client(f"{PATH}?token={nobody.secret}") as client:
            refused = await client.frames_until_close()
        async with Client(f"{PATH}?token={viewer.secret}") as client:
            await client.next_frame()
            await client.send(diarize)
            no_diarize = await client.frames_until_close()
        async with Client(f"{PATH}?token={admin.secret}") as client:
            await client.next_frame()
            await client.send(diarize)
            diarized = await client.next_frame()
        return refused, no_diarize, diarized

    (refused, code), (no_diarize, diarize_code), diarized = run(scenario())
    assert diarized["type"] == "session.updated"
    assert diarized["session"]["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe-diarize"
    assert code == 4403
    assert_openai_error(refused[-1], "AUTHZ_PERMISSION_DENIED")
    assert diarize_code == 4403
    assert "scaiecho:diarize" in assert_openai_error(no_diarize[-1], "AUTHZ_PERMISSION_DENIED")["message"]


def test_stream_caps_and_budgets_hold(relay, settings):
    settings.SCAIECHO_STREAM_MAX_PER_KEY = 1
    key = issue()
    broke = issue()
    TenantBudget.objects.create(tenant=broke.tenant, period="total", limit_audio_seconds=1, hard_action="block")
    UsageRecord.objects.create(tenant=broke.tenant, backend="B", kind="batch", audio_duration_ms=5000, latency_ms=1, cost=0, reference="x")

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as first:
            assert (await first.next_frame())["type"] == "session.created"
            async with Client(f"{PATH}?token={key.secret}") as second:
                capped = await second.frames_until_close()
        async with Client(f"{PATH}?token={broke.secret}") as client:
            over_budget = await client.frames_until_close()
        return capped, over_budget

    (capped, capped_code), (over, over_code) = run(scenario())
    assert capped_code == 4429
    assert assert_openai_error(capped[-1], "RATE_LIMITED")["retry_after"] >= 1
    assert over_code == 4429
    assert_openai_error(over[-1], "BUDGET_EXCEEDED")


def test_a_commit_in_server_vad_mode_ends_the_turn_and_silence_commits_an_empty_item(relay, speech_wav):
    key = issue()
    silence = b"\x00\x00" * 24000  # 1 s

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.next_frame()
            for event in audio_events(pcm_at(speech_wav, 24000)):
                await client.send(event)
            await client.send({"type": "input_audio_buffer.commit"})
            turn = await events_until(client, "conversation.item.input_audio_transcription.completed")
            relay.static_body = {**DEFAULT_VERBOSE_JSON, "text": "", "segments": []}
            for event in audio_events(silence):
                await client.send(event)
            await client.send({"type": "input_audio_buffer.commit"})
            return turn, await events_until(client, "conversation.item.input_audio_transcription.completed")

    turn, empty = run(scenario())
    assert [event["type"] for event in turn] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert len({event["item_id"] for event in turn}) == 1
    assert turn[0]["audio_start_ms"] == 0
    assert turn[-1]["transcript"] == RELAY_TEXT
    assert [event["type"] for event in empty] == [
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert empty[0]["previous_item_id"] == turn[2]["item_id"]
    assert empty[-1]["transcript"] == ""
    assert empty[-1]["usage"]["seconds"] == pytest.approx(1.0, abs=0.05)


def test_oversize_events_and_audio_faster_than_the_pace_close_the_stream_as_native_ones(relay, speech_wav, settings):
    settings.SCAIECHO_STREAM_MAX_FRAME_BYTES = 64 * 1024
    settings.SCAIECHO_STREAM_BURST_SECONDS = 1.0
    key = issue()
    pcm = pcm_at(speech_wav, 24000)

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.next_frame()
            await client.send({"type": "input_audio_buffer.append", "audio": b64(pcm[:60000])})
            too_large = await client.frames_until_close()
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.next_frame()
            for event in audio_events(pcm):  # 3 s of audio at once
                await client.send(event)
            too_fast = await client.frames_until_close()
        return too_large, too_fast

    (too_large, large_code), (too_fast, fast_code) = run(scenario())
    assert large_code == 4413
    assert_openai_error(too_large[-1], "PAYLOAD_TOO_LARGE")
    assert fast_code == 4429
    assert "real time" in assert_openai_error(too_fast[-1], "RATE_LIMITED")["message"]
