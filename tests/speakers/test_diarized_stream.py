"""Diarized live streams: a real stream worker process attributes each final delta to an enrolled
speaker (or a stable SPEAKER_n), and stops matching a speaker erased while the stream is open."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
from django.db import connection

from speech.audio import decode_audio, float_to_pcm
from tenants.models import Role, TenantPolicy
from tests.factories import KeyFactory
from tests.speakers.test_enrollment import CONVERSATION, Turn, conversation
from tests.speakers.voices import ALICE, BORIS, CARL, SPEAKERS_URL, enroll_ready, say
from tests.streaming.test_consumer import PATH, Client, assert_error_close, run
from tests.streaming.test_stream_worker import StreamWorkerProcess, wait_until_announced
from tests.workers import RELAY_KEY, SYNTHETIC_VOICE_THRESHOLDS

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def diarizing_stream_worker(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StreamWorkerProcess]:
    worker = StreamWorkerProcess(tmp_path_factory.mktemp("stream") / "stream_worker.log", **SYNTHETIC_VOICE_THRESHOLDS)
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def enroller():
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    return key


async def send_real_time(client: Client, samples: np.ndarray, finals: list[dict], *, chunk_ms: int = 100) -> None:
    """Send 16 kHz samples as PCM at real-time pace, collecting final deltas meanwhile."""
    step = 16000 * chunk_ms // 1000
    started = time.monotonic()
    for index, offset in enumerate(range(0, samples.size, step)):
        await client.ws.send_to(bytes_data=float_to_pcm(samples[offset : offset + step]))
        while True:
            try:
                frame = await asyncio.wait_for(client.ws.receive_json_from(), timeout=0.001)
            except TimeoutError:
                break
            if frame["type"] == "delta" and frame["is_final"]:
                finals.append(frame)
            assert frame["type"] == "delta", frame
        await asyncio.sleep(max(0.0, started + (index + 1) * chunk_ms / 1000 - time.monotonic()))


def labels_by_turn(finals: list[dict], turns: list[Turn]) -> list[list[str]]:
    """The labels of the finals in each turn (finals of a second or more: shorter ones carry
    too little voice to say whose it is)."""
    found: list[list[str]] = []
    for turn in turns:
        inside = [
            f for f in finals if turn.start - 0.3 <= (f["start"] + f["end"]) / 2 <= turn.end + 0.3 and f["end"] - f["start"] >= 1.0
        ]
        assert inside, f"no final for {turn.text!r}: {finals}"
        found.append([f["speaker_label"] for f in inside])
    return found


def test_diarized_stream_labels_finals_and_forgets_an_erased_speaker(api, speech_worker, diarizing_stream_worker, enroller):
    ids = {voice.name: enroll_ready(api, enroller, voice) for voice in (ALICE, BORIS, CARL)}
    wait_until_announced()
    first_part = CONVERSATION  # the batch test's conversation: Alice, Boris, Carl, a stranger, ...
    second_part = [Turn(BORIS, "Let me add one more thing about the travel budget."), CONVERSATION[5]]
    wav_one, turns_one = conversation(first_part)
    wav_two, turns_two = conversation(second_part)
    one = decode_audio(wav_one).samples
    two = decode_audio(wav_two).samples
    offset = one.size / 16000
    turns_two = [Turn(t.voice, t.text, t.start + offset, t.end + offset) for t in turns_two]

    def erase(speaker_id: str):
        try:
            return api.delete(f"{SPEAKERS_URL}/{speaker_id}", headers=enroller.headers)
        finally:
            connection.close()  # this thread's own connection, or it outlives the test database

    async def scenario():
        finals: list[dict] = []
        async with Client(f"{PATH}?token={enroller.secret}") as client:
            await client.send({"type": "open", "media_type": "audio/pcm", "sample_rate": 16000, "language_hint": "en", "diarize": True})
            ready = await client.next_frame()
            assert (ready["type"], ready["backend_used"]) == ("ready", "A"), ready
            await send_real_time(client, one, finals)
            await client.send({"type": "finalize"})
            await asyncio.sleep(1.5)
            while True:
                try:
                    frame = await asyncio.wait_for(client.ws.receive_json_from(), timeout=0.5)
                except TimeoutError:
                    break
                if frame["is_final"]:
                    finals.append(frame)
            before = len(finals)
            # Boris is erased while the stream is open.
            erased = await asyncio.to_thread(erase, ids["Boris"])
            assert erased.status_code == 200
            await send_real_time(client, two, finals)
            await client.send({"type": "close"})
            rest, code = await client.frames_until_close(wait=60)
            finals += [f for f in rest if f["type"] == "delta" and f["is_final"]]
            return finals, before, rest, code

    finals, before, rest, code = run(scenario())
    assert code == 1000, rest[-2:]
    assert all({"speaker_id", "speaker_label"} <= set(f) for f in finals)
    first = [set(labels) for labels in labels_by_turn(finals[:before], turns_one)]
    # A short final at a comma ("Sorry I am late,") must still be read as its speaker's voice.
    assert all(len(labels) == 1 for labels in first), [(f["text"], f["speaker_label"]) for f in finals[:before]]
    [stranger] = first[3]
    assert stranger.startswith("SPEAKER_")
    assert first == [{"Alice"}, {"Boris"}, {"Carl"}, {stranger}, {"Alice"}, {stranger}], first
    by_label = {f["speaker_label"]: f["speaker_id"] for f in finals}
    assert by_label["Alice"] == ids["Alice"]
    assert by_label["Boris"] == ids["Boris"]
    assert by_label[stranger] is None
    second = labels_by_turn(finals[before:], turns_two)
    assert "Boris" not in second[0], second  # erased mid-stream: never matched again
    assert all(label.startswith("SPEAKER_") and label != stranger for label in second[0]), second
    assert set(second[1]) == {stranger}, second  # the same unknown voice keeps its label


def test_a_diarized_stream_needs_the_diarize_permission_and_known_speakers():
    viewer = KeyFactory.issue(role=Role.TENANT_VIEWER)

    async def open_with(key, **fields):
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.send({"type": "open", "diarize": True, **fields})
            return await client.frames_until_close()

    assert_error_close(*run(open_with(viewer)), 4403, "AUTHZ_PERMISSION_DENIED")
    admin = KeyFactory.issue(role=Role.TENANT_ADMIN)
    frames, code = run(open_with(admin, speaker_ids=["7a1d0c1e-0000-4000-8000-000000000000"]))
    assert_error_close(frames, code, 4400, "VALIDATION_ERROR")
    assert "speaker_ids" in frames[-1]["message"]


def fitted(voice, text: str, seconds: float) -> np.ndarray:
    """The voice saying ``text``, padded with silence to exactly ``seconds`` (one relay chunk)."""
    samples = decode_audio(say(voice, text)).samples[: int(seconds * 16000)]
    return np.concatenate([samples, np.zeros(int(seconds * 16000) - samples.size, dtype=np.float32)])


def test_a_diarized_relay_stream_gets_its_speakers_from_a_stream_worker(
    api, speech_worker, diarizing_stream_worker, relay, settings
):
    """Backend B transcribes each chunk; the stream worker (never the web process) says who spoke."""
    settings.SCAIECHO_RELAY_BASE_URL = relay.base_url
    settings.SCAIECHO_RELAY_API_KEY = RELAY_KEY
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="B", default_backend="B")
    ids = {voice.name: enroll_ready(api, key, voice) for voice in (ALICE, BORIS)}
    wait_until_announced()
    audio = np.concatenate(
        [
            fitted(ALICE, "Good morning everyone, shall we begin?", 4.0),
            fitted(BORIS, "Yes, the numbers are finally ready.", 4.0),
            fitted(ALICE, "Then let us start with travel.", 4.0),
        ]
    )

    async def scenario():
        async with Client(f"{PATH}?token={key.secret}") as client:
            await client.send({"type": "open", "media_type": "audio/pcm", "chunk_seconds": 4.0, "diarize": True})
            ready = await client.next_frame()
            await client.send_audio(float_to_pcm(audio), frame_size=6400)
            await client.send({"type": "close"})
            frames, code = await client.frames_until_close(wait=60)
            return ready, frames, code

    ready, frames, code = run(scenario())
    assert ready["backend_used"] == "B"
    assert code == 1000, frames
    finals = [f for f in frames if f["type"] == "delta"]
    assert [f["speaker_label"] for f in finals] == ["Alice", "Boris", "Alice"]
    assert [f["speaker_id"] for f in finals] == [ids["Alice"], ids["Boris"], ids["Alice"]]
    assert [(f["start"], f["end"]) for f in finals] == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]
    assert len(relay.requests) == 3
