"""Backend A streaming: a real stream worker process with the default Whisper model, reached over
the Redis channel layer, transcribing espeak-ng speech sent at real-time pace."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from speech.audio import decode_audio, float_to_pcm, wav_bytes
from streaming import worker as worker_module
from streaming.worker import StreamWorker
from tenants.models import Role, UsageRecord
from tests.processes import ManagedProcess
from tests.streaming.test_consumer import PATH, Client, assert_error_close, issue, run
from tests.voices import synth_speech, word_error_rate
from tests.workers import database_url_for_workers
from transcription.models import SpeechWorker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
UTTERANCES = [
    "Good morning everyone.",
    "Today we will review the quarterly budget.",
    "Please send the report to the finance team before Friday.",
]


class StreamWorkerProcess(ManagedProcess):
    """``manage.py stream_worker`` on the test database; ready once it has loaded its model."""

    def __init__(self, log_path: Path, **extra_env: str) -> None:
        env = {**os.environ, "DATABASE_URL": database_url_for_workers(), "SCAIECHO_WHISPER_CPU_THREADS": "1", **extra_env}
        super().__init__(command=[sys.executable, "manage.py", "stream_worker"], env=env, log_path=log_path)
        self.wait_for_log(b" ready", timeout=120, what="stream worker")


@pytest.fixture(scope="module")
def stream_worker(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StreamWorkerProcess]:
    worker = StreamWorkerProcess(tmp_path_factory.mktemp("stream") / "stream_worker.log")
    try:
        yield worker
    finally:
        worker.stop()


def wait_until_announced() -> None:
    """The test database is emptied between tests; the worker's next heartbeat (1 s) re-announces it."""
    deadline = time.monotonic() + 10
    while not SpeechWorker.objects.filter(kind="stream", expires_at__gt=timezone.now()).exists():
        assert time.monotonic() < deadline, "the stream worker is not announced"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def conversation_wav() -> bytes:
    """The utterances with 1.2 s pauses, 16 kHz s16 WAV, and 1 s of trailing silence."""
    pieces = []
    silence = np.zeros(int(1.2 * 16000), dtype=np.float32)
    for text in UTTERANCES:
        pieces += [decode_audio(synth_speech(text)).samples, silence]
    return wav_bytes(np.concatenate(pieces))


async def stream_real_time(client: Client, wav: bytes, *, chunk_ms: int = 100) -> list[tuple[float, dict]]:
    """Send the WAV at real-time pace, collecting (arrival time, frame) meanwhile."""
    received: list[tuple[float, dict]] = []
    started = time.monotonic()

    async def collect() -> None:
        while True:
            frame = await client.next_frame(wait=60)
            received.append((time.monotonic() - started, frame))

    collector = asyncio.create_task(collect())
    step = 16000 * 2 * chunk_ms // 1000
    await client.ws.send_to(bytes_data=wav[:44])
    for index, offset in enumerate(range(44, len(wav), step)):
        await client.ws.send_to(bytes_data=wav[offset : offset + step])
        await asyncio.sleep(max(0.0, started + (index + 1) * chunk_ms / 1000 - time.monotonic()))
    await asyncio.sleep(0.5)
    collector.cancel()
    return received


@contextlib.asynccontextmanager
async def embedded_worker(engine: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """A stream worker on ``engine`` running in this process, as the embedded worker of the
    in-memory channel layer does (the test sets that layer); yielded once it has announced itself."""
    worker = StreamWorker(engine=engine)
    await worker.start()
    monkeypatch.setattr(worker_module, "_embedded", worker)
    serving = asyncio.create_task(worker.run())
    try:
        await sync_to_async(wait_until_announced)()
        yield worker
    finally:
        worker.stopping.set()
        await serving


def spoken_then_silent(text: str) -> bytes:
    """espeak-ng speech of ``text`` and a second of silence, so that its last words become final."""
    return wav_bytes(np.concatenate([decode_audio(synth_speech(text)).samples, np.zeros(16000, np.float32)]))


async def stream_and_close(key: Any, wav: bytes) -> list[dict]:
    """Open a stream with ``key``, send ``wav`` at real-time pace, close it; every frame received."""
    async with Client(f"{PATH}?token={key.secret}") as client:
        await client.send({"type": "open", "media_type": "audio/wav", "language_hint": "en"})
        await client.next_frame()
        received = await stream_real_time(client, wav)
        await client.send({"type": "close"})
        rest, code = await client.frames_until_close(wait=60)
        assert code == 1000, rest[-2:]
        return [frame for _, frame in received] + rest


def test_partials_then_finals_with_the_spoken_text(stream_worker, conversation_wav):
    wait_until_announced()
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.send({"type": "open", "media_type": "audio/wav", "language_hint": "en"})
            ready = await client.next_frame()
            received = await stream_real_time(client, conversation_wav)
            await client.send({"type": "close"})
            rest, code = await client.frames_until_close(wait=60)
            return ready, received, rest, code

    ready, received, rest, code = run(scenario())
    assert ready["backend_used"] == "A"
    frames = [frame for _, frame in received] + rest
    assert code == 1000, frames[-3:]
    assert frames[-1]["type"] == "closed"
    deltas = [f for f in frames if f["type"] == "delta"]
    finals = [d for d in deltas if d["is_final"]]
    assert finals, deltas
    first_final = deltas.index(finals[0])
    assert any(not d["is_final"] for d in deltas[:first_final]), "no partial before the first final"
    assert word_error_rate(" ".join(UTTERANCES), " ".join(f["text"] for f in finals)) <= 0.2
    ends = [f["end"] for f in finals]
    assert ends == sorted(ends)
    assert all(later["start"] >= earlier["end"] - 0.05 for earlier, later in zip(finals, finals[1:], strict=False))
    assert all(0 <= f["start"] < f["end"] <= conversation_wav.__len__() / 32000 + 0.1 for f in finals)


def test_silence_alone_gives_no_text(stream_worker):
    wait_until_announced()
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    silence = bytes(16000 * 2 * 3)

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.send({"type": "open", "media_type": "audio/pcm", "sample_rate": 16000})
            await client.next_frame()
            for offset in range(0, len(silence), 3200):
                await client.ws.send_to(bytes_data=silence[offset : offset + 3200])
            await client.send({"type": "close"})
            return await client.frames_until_close(wait=60)

    frames, code = run(scenario())
    assert code == 1000
    assert [f["type"] for f in frames] == ["closed"]


def test_sessions_spread_over_two_workers_and_survive_the_other_ones_death(stream_worker, tmp_path, conversation_wav):
    """Two stream workers on Redis: sessions land on both; killing one ends only its sessions."""
    second = StreamWorkerProcess(tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 10
        while SpeechWorker.objects.filter(kind="stream", expires_at__gt=timezone.now()).count() < 2:
            assert time.monotonic() < deadline, "both stream workers should be announced"
            time.sleep(0.1)
        # A key (and tenant) per session: which worker takes a session is the service's choice, and
        # eight sessions of one key on the first worker would meet SCAIECHO_STREAM_MAX_PER_KEY.
        keys = [issue(Role.TENANT_VIEWER, policy=("A", "A")) for _ in range(12)]

        def worker_of(session_id: str) -> str:
            if session_id in second.log_path.read_text():
                return "second"
            assert session_id in stream_worker.log_path.read_text()
            return "first"

        async def scenario():
            clients: list[tuple[Client, str]] = []
            try:
                while len({owner for _, owner in clients}) < 2:
                    assert len(clients) < len(keys), "sessions never reached both workers"
                    client = Client(f"{PATH}?token={keys[len(clients)].secret}")
                    await client.__aenter__()
                    await client.send({"type": "open", "media_type": "audio/wav", "language_hint": "en"})
                    ready = await client.next_frame()
                    assert ready.get("type") == "ready", ready
                    await asyncio.sleep(0.3)  # the worker logs the session as it opens it
                    clients.append((client, await asyncio.to_thread(worker_of, ready["session_id"])))
                half = len(conversation_wav) // 3
                for client, _ in clients:
                    await client.ws.send_to(bytes_data=conversation_wav[:half])
                await asyncio.to_thread(second.kill)
                killed_at = time.monotonic()
                outcomes = []
                for client, owner in clients:
                    if owner == "second":
                        frames, code = await client.frames_until_close(wait=30)
                        outcomes.append((owner, frames, code, time.monotonic() - killed_at))
                for client, owner in clients:
                    if owner == "first":
                        await client.send_audio(conversation_wav[half:], frame_size=16000)
                        await client.send({"type": "close"})
                        frames, code = await client.frames_until_close(wait=90)
                        outcomes.append((owner, frames, code, 0.0))
                return outcomes
            finally:
                for client, _ in clients:
                    await client.__aexit__()

        outcomes = run(scenario())
        for owner, frames, code, waited in outcomes:
            if owner == "second":
                assert_error_close(frames, code, 4502, "BACKEND_ERROR")
                assert waited < 6
            else:
                assert code == 1000, frames[-2:]
                assert frames[-1]["type"] == "closed"
                finals = [f["text"] for f in frames if f["type"] == "delta" and f["is_final"]]
                assert word_error_rate(" ".join(UTTERANCES), " ".join(finals)) <= 0.3
    finally:
        second.stop()


def test_worker_and_relay_sessions_speak_the_same_protocol(stream_worker, relay, conversation_wav):
    """The client cannot tell the backends apart by the frames: ready, deltas, closed, 1000, and
    the same metering, whichever session kind ran the stream."""
    wait_until_announced()
    keys = {"A": issue(Role.TENANT_VIEWER, policy=("A", "A")), "B": issue(Role.TENANT_VIEWER, policy=("B", "B"))}
    duration = (len(conversation_wav) - 44) / 32000

    async def stream(backend: str):
        async with Client(f"{PATH}?token={keys[backend].secret}") as client:
            await client.send({"type": "open", "media_type": "audio/wav", "language_hint": "en", "chunk_seconds": 2.0})
            ready = await client.next_frame()
            await client.send_audio(conversation_wav, frame_size=16000)
            await client.send({"type": "close"})
            frames, code = await client.frames_until_close(wait=90)
            return [ready, *frames], code

    for backend in ("A", "B"):
        frames, code = run(stream(backend))
        assert code == 1000, frames[-2:]
        assert frames[0]["type"] == "ready"
        assert frames[0]["backend_used"] == backend
        assert frames[-1] == {"type": "closed", "audio_bytes": len(conversation_wav), "audio_duration_ms": round(duration * 1000)}
        deltas = frames[1:-1]
        assert deltas, backend
        assert all(set(d) == {"type", "text", "is_final", "start", "end", "confidence"} for d in deltas), deltas
        finals = [d for d in deltas if d["is_final"]]
        assert finals, deltas
        assert all(f["text"] for f in finals), finals
        assert all(0 <= f["start"] < f["end"] <= duration + 0.05 for f in finals), finals
        assert all(later["start"] >= earlier["end"] - 0.05 for earlier, later in zip(finals, finals[1:], strict=False))
        usage = UsageRecord.objects.get(tenant=keys[backend].tenant, kind="stream")
        assert (usage.backend, usage.audio_duration_ms) == (backend, round(duration * 1000))


@pytest.mark.parametrize("room", [2, 3])
def test_realtime_commits_awaiting_the_worker_are_bounded_by_the_setting(stream_worker, settings, room):
    """``SCAIECHO_REALTIME_MAX_PENDING_COMMITS``: on ``/oai/v1/realtime`` a commit whose transcript
    the stream worker has not delivered yet waits in the session; with that many waiting, one more
    closes the stream (4429), and with room for it every commit gets its transcript."""
    wait_until_announced()
    settings.SCAIECHO_REALTIME_MAX_PENDING_COMMITS = room
    settings.SCAIECHO_STREAM_BURST_SECONDS = 600
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    speech = decode_audio(synth_speech("Good morning everyone.")).samples
    positions = np.arange(round(speech.size * 24000 / 16000)) * 16000 / 24000
    pcm = float_to_pcm(np.interp(positions, np.arange(speech.size), speech).astype(np.float32))
    append = {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    manual = {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {"input": {"turn_detection": None, "transcription": {"model": "whisper-1", "language": "en"}}},
        },
    }

    async def scenario():
        async with Client(f"/oai/v1/realtime?token={key.secret}") as client:
            await client.next_frame()
            await client.send(manual)
            await client.next_frame()
            for _ in range(3):  # three commits at once: the worker has decoded none of them yet
                await client.send(append)
                await client.send({"type": "input_audio_buffer.commit"})
            frames = []
            while len([f for f in frames if f["type"].endswith("transcription.completed")]) < 3:
                output = await client.ws.receive_output(timeout=60)
                if output["type"] == "websocket.close":
                    return frames, output.get("code", 1000)
                frames.append(json.loads(output["text"]))
            return frames, None

    frames, code = run(scenario())
    kinds = [frame["type"] for frame in frames]
    if room == 2:
        assert code == 4429, kinds
        assert kinds.count("input_audio_buffer.committed") == 2
        assert frames[-1]["type"] == "error"
        assert frames[-1]["error"]["code"] == "RATE_LIMITED"
        assert "2 commits and clears wait" in frames[-1]["error"]["message"]
    else:
        assert code is None, kinds
        done = [frame for frame in frames if frame["type"].endswith("transcription.completed")]
        assert [word_error_rate("good morning everyone", frame["transcript"]) <= 0.34 for frame in done] == [True] * 3
