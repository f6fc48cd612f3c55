"""A stream's agreed words become final once the span reaches the operator's
``SCAIECHO_STREAM_COMMIT_SECONDS`` (or the client's ``chunk_seconds``, if shorter), not only at a
clause end or a pause (issue 10: on the real conversations 2 s instead of the client's default 5 s
took the one-session p95 final latency from about 4.5 s to under 3 s, for more and shorter finals
and more word errors in the phone band; see bench/README.md).

What a user notices: while one long sentence is still being spoken, its first words already
arrive as a final, and none is lost. The stream worker runs in this process on the real engine,
as the embedded worker does.
"""

from __future__ import annotations

import pytest

from scaiecho_site import engines
from tenants.models import Role
from tests.streaming.test_consumer import PATH, Client, issue, run
from tests.streaming.test_stream_worker import embedded_worker, spoken_then_silent, stream_real_time
from tests.voices import word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# One sentence without a clause mark, about 6 s of espeak speech.
SENTENCE = "please send the quarterly report to the finance team and the two regional managers before the meeting on friday afternoon"


async def _stream(key, wav: bytes) -> list[tuple[float, dict]]:
    async with Client(f"{PATH}?token={key.secret}") as client:
        await client.send({"type": "open", "media_type": "audio/wav", "language_hint": "en", "chunk_seconds": 30})
        await client.next_frame()
        received = await stream_real_time(client, wav)
        await client.send({"type": "close"})
        rest, code = await client.frames_until_close(wait=60)
        assert code == 1000, rest[-2:]
        return received + [(float("inf"), frame) for frame in rest]


@pytest.mark.parametrize(("commit_seconds", "final_while_speaking"), [(2.0, True), (30.0, False)])
def test_agreed_words_are_final_once_the_span_reaches_the_commit_length(settings, monkeypatch, commit_seconds, final_while_speaking):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.SCAIECHO_WHISPER_ENGINE = "ctranslate2"
    settings.SCAIECHO_WHISPER_DEVICE = "cpu"
    settings.SCAIECHO_STREAM_COMMIT_SECONDS = commit_seconds
    monkeypatch.setattr(engines, "_engine", None)
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    wav = spoken_then_silent(SENTENCE)
    speech_end_s = (len(wav) - 44) / 32000 - 1.0

    async def scenario() -> list[tuple[float, dict]]:
        async with embedded_worker(engines.build_engine(), monkeypatch):
            return await _stream(key, wav)

    received = run(scenario())

    finals = [(at, frame) for at, frame in received if frame["type"] == "delta" and frame["is_final"]]
    assert word_error_rate(SENTENCE, " ".join(frame["text"] for _, frame in finals)) <= 0.25, finals
    early = [frame for _, frame in finals if frame["end"] < speech_end_s - 1.0]
    assert bool(early) == final_while_speaking, finals
