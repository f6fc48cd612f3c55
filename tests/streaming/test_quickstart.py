"""The quickstart's clients, unchanged, against a live daphne server and a real stream worker:
the Python ``websockets`` flow and the websocat flow (open frame, raw WAV bytes, close frame)."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tenants.models import Role
from tests.streaming.test_consumer import issue
from tests.streaming.test_stream_worker import stream_worker, wait_until_announced  # noqa: F401 (fixture)
from tests.voices import synth_speech, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SPOKEN = "Good morning everyone. Please send the report to the finance team before Friday."


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("quickstart") / "speech.wav"
    path.write_bytes(synth_speech(SPOKEN))
    return path


async def websockets_snippet(url: str, path: str) -> list[str]:
    """What the quickstart's snippet does: open, stream the file in 32 KB frames, close, print."""
    printed: list[str] = []
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "open", "language_hint": "en", "media_type": "audio/wav"}))
        printed.append(await ws.recv())
        with open(path, "rb") as audio:  # noqa: ASYNC230 - the snippet's own style
            while chunk := audio.read(32000):
                await ws.send(chunk)
                await asyncio.sleep(0.5)  # about real time for 16-bit 22.05 kHz... roughly
        await ws.send(json.dumps({"type": "close"}))
        async for message in ws:
            printed.append(message)
    return printed


async def websocat_flow(url: str, path: str) -> list[str]:
    """websocat: the open frame as text, the whole WAV file as one binary message, close."""
    printed: list[str] = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send('{"type":"open","media_type":"audio/wav"}')
        printed.append(await ws.recv())
        with open(path, "rb") as audio:  # noqa: ASYNC230
            await ws.send(audio.read())
        await ws.send('{"type":"close"}')
        async for message in ws:
            printed.append(message)
    return printed


@pytest.mark.parametrize("client", [websockets_snippet, websocat_flow])
def test_quickstart_clients_against_a_live_server(live_daphne, stream_worker, speech_file, client):  # noqa: F811
    wait_until_announced()
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    url = live_daphne.url.replace("http://", "ws://") + f"/v1/modules/scaiecho/stream/transcribe?token={key.secret}"
    printed = [json.loads(message) for message in asyncio.run(client(url, str(speech_file)))]
    assert printed[0]["type"] == "ready"
    assert printed[-1]["type"] == "closed"
    assert printed[-1]["audio_bytes"] == speech_file.stat().st_size
    finals = [m["text"] for m in printed if m["type"] == "delta" and m["is_final"]]
    assert word_error_rate(SPOKEN, " ".join(finals)) <= 0.2, finals
