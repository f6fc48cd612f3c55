"""Stream sessions as a client sees them: an ended session makes no more backend calls.

Backend B here is a real local relay server that takes ``hang_s`` per request, so that chunks
queue up behind it while the client goes on sending.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from speech.audio import decode_audio, float_to_pcm
from tenants.models import UsageRecord
from tests.relay_server import RelayServer
from tests.streaming.test_consumer import PATH, Client, assert_error_close, issue, run

pytestmark = pytest.mark.django_db(transaction=True)


def relay_calls_after(relay: RelayServer, seconds: float) -> int:
    before = len(relay.requests)
    time.sleep(seconds)
    return len(relay.requests) - before


@pytest.mark.parametrize("ending", ["client leaves", "session times out"])
def test_an_ended_relay_session_makes_no_more_relay_calls(relay, speech_wav, settings, monkeypatch, ending):
    # Given a slow relay (0.8 s a chunk) and a client sending 0.5 s chunks much faster than that
    monkeypatch.setattr(relay, "hang_s", 0.8)
    relay.mode = "hang"
    if ending == "session times out":
        settings.SCAIECHO_STREAM_MAX_SESSION_SECONDS = 1
    samples = decode_audio(speech_wav).samples
    pcm = float_to_pcm(np.concatenate([samples, samples]))
    key = issue()

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.send({"type": "open", "media_type": "audio/pcm", "sample_rate": 16000, "chunk_seconds": 0.5})
            await client.next_frame()
            await client.send_audio(pcm, frame_size=16000)  # 0.5 s a frame
            if ending == "client leaves":
                await asyncio.sleep(1.2)
                return [], None
            return await client.frames_until_close(wait=10)

    # When the session ends while chunks still wait for the relay
    frames, code = run(scenario())
    if ending == "session times out":
        assert_error_close(frames, code, 4408, "STREAM_TIMEOUT")
    made = len(relay.requests)

    # Then the waiting chunks are dropped, not sent to the relay for nobody
    assert made < samples.size * 2 / 16000 / 0.5 / 2
    assert relay_calls_after(relay, 2.0) == 0
    # And the audio received is metered all the same
    assert UsageRecord.objects.get(tenant=key.tenant, kind="stream").audio_duration_ms > 0

