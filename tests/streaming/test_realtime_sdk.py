"""The official ``openai`` SDK's ``client.realtime.connect()`` against ``/oai/v1/realtime`` on a live
daphne server, with a real stream worker (Backend A) transcribing espeak-ng speech sent in real time:
server VAD turns first, then a manual commit with turn detection off."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

import numpy as np
import pytest
from openai import AsyncOpenAI
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeServerEvent,
    SessionUpdatedEvent,
)

from speech.audio import decode_audio, float_to_pcm
from tenants.models import Role, UsageRecord
from tests.streaming.test_consumer import issue
from tests.streaming.test_stream_worker import stream_worker, wait_until_announced  # noqa: F401 (fixture)
from tests.voices import synth_speech, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TURNS = ["Good morning everyone.", "Please send the report to the finance team before Friday."]
COMMITTED = "Today we will review the quarterly budget."
RATE = 24000
CHUNK_S = 0.1


def pcm24k(*texts: str, pause_s: float = 1.2) -> bytes:
    """The utterances, each followed by ``pause_s`` of silence, as 24 kHz s16le."""
    pieces = []
    for text in texts:
        samples = decode_audio(synth_speech(text)).samples
        pieces += [samples, np.zeros(int(pause_s * 16000), dtype=np.float32)]
    audio = np.concatenate(pieces)
    positions = np.arange(round(audio.size * RATE / 16000)) * 16000 / RATE
    return float_to_pcm(np.interp(positions, np.arange(audio.size), audio).astype(np.float32))


async def append_in_real_time(connection, pcm: bytes) -> None:
    step = int(RATE * CHUNK_S) * 2
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), step)):
        await connection.input_audio_buffer.append(audio=base64.b64encode(pcm[offset : offset + step]).decode())
        await asyncio.sleep(max(0.0, started + (index + 1) * CHUNK_S - time.monotonic()))


async def until(events: list[RealtimeServerEvent], done: Callable[[], bool], wait: float = 60) -> None:
    deadline = time.monotonic() + wait
    while not done():
        assert time.monotonic() < deadline, [event.type for event in events]
        await asyncio.sleep(0.05)


def completed(events: list[RealtimeServerEvent]) -> list[ConversationItemInputAudioTranscriptionCompletedEvent]:
    return [event for event in events if isinstance(event, ConversationItemInputAudioTranscriptionCompletedEvent)]


async def sdk_session(base_url: str, api_key: str) -> tuple[list[RealtimeServerEvent], int]:
    client = AsyncOpenAI(base_url=base_url, api_key=api_key)
    events: list[RealtimeServerEvent] = []
    async with client.realtime.connect() as connection:

        async def read() -> None:
            async for event in connection:
                events.append(event)

        reader = asyncio.create_task(read())
        await connection.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": RATE},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                    }
                },
            }
        )
        await append_in_real_time(connection, pcm24k(*TURNS))
        await until(events, lambda: len(completed(events)) >= len(TURNS))
        vad_events = len(events)

        await connection.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        await append_in_real_time(connection, pcm24k(COMMITTED, pause_s=0.3))
        await connection.input_audio_buffer.commit()
        await until(events, lambda: len(completed(events[vad_events:])) >= 1)
        reader.cancel()
    return events, vad_events


def test_the_official_sdk_gets_vad_turns_and_a_manual_commit_transcribed(live_daphne, stream_worker):  # noqa: F811
    wait_until_announced()
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))

    events, vad_events = asyncio.run(sdk_session(f"{live_daphne.url}/oai/v1", key.secret))

    assert events[0].type == "session.created"
    updates = [event for event in events if isinstance(event, SessionUpdatedEvent)]
    assert updates[0].session.audio.input.turn_detection.type == "server_vad"
    assert updates[1].session.audio.input.turn_detection is None
    # Server VAD: every turn starts, stops, is committed (chained by previous_item_id) and transcribed.
    vad, manual = events[:vad_events], events[vad_events:]
    started = [event.item_id for event in vad if isinstance(event, InputAudioBufferSpeechStartedEvent)]
    stopped = [event.item_id for event in vad if isinstance(event, InputAudioBufferSpeechStoppedEvent)]
    committed = [event for event in events if isinstance(event, InputAudioBufferCommittedEvent)]
    turns = completed(vad)
    assert len(turns) >= len(TURNS)
    assert started == stopped == [event.item_id for event in committed[: len(turns)]] == [turn.item_id for turn in turns]
    assert [event.previous_item_id for event in committed] == [None, *[event.item_id for event in committed[:-1]]]
    assert word_error_rate(" ".join(TURNS), " ".join(turn.transcript for turn in turns)) <= 0.2, [t.transcript for t in turns]
    # The manual commit: one item with the whole buffer's words.
    [item] = completed(manual)
    assert item.item_id == committed[-1].item_id
    assert not any(isinstance(event, InputAudioBufferSpeechStartedEvent) for event in manual)
    assert word_error_rate(COMMITTED, item.transcript) <= 0.2, item.transcript
    assert item.usage.seconds > 2
    # Metered as a stream of the key's tenant.
    deadline = time.monotonic() + 10
    while not UsageRecord.objects.filter(tenant=key.tenant, kind="stream").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
