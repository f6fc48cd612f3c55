"""Live streams decode at the operator's beam width (``SCAIECHO_STREAM_BEAM_SIZE``, issue 10: on
the real conversations a beam of 5 took stream WER from 10.8 % to 8.2 % (phone band: 19.0 % to
12.3 %) at about the same compute, because a stream's short windows cost mostly the encoder).

The stream worker runs in this process, on the real CTranslate2 engine built from the settings, as
the embedded worker of the in-memory channel layer does. The stream decoder is watched, not
replaced: the test sees the width of every decode and the words that came of them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from asgiref.sync import sync_to_async

from scaiecho_site import engines
from speech.audio import decode_audio, wav_bytes
from speech.engines.base import TranscribeOptions
from speech.engines.ctranslate2 import ShortWindowCTranslate2
from streaming import worker as worker_module
from streaming.worker import StreamWorker
from tenants.models import Role
from tests.streaming.test_consumer import PATH, Client, issue, run
from tests.streaming.test_stream_worker import stream_real_time, wait_until_announced
from tests.voices import synth_speech, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SENTENCE = "Please send the report to the finance team before Friday."


@pytest.mark.parametrize("width", [5, 1])
def test_a_stream_is_decoded_at_the_configured_beam_width(settings, monkeypatch, width):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.SCAIECHO_WHISPER_ENGINE = "ctranslate2"
    settings.SCAIECHO_WHISPER_DEVICE = "cpu"
    settings.SCAIECHO_STREAM_BEAM_SIZE = width
    monkeypatch.setattr(engines, "_engine", None)
    seen: list[TranscribeOptions] = []
    real = ShortWindowCTranslate2.transcribe_batch

    def watched(self: ShortWindowCTranslate2, windows: Any, *, options: TranscribeOptions) -> Any:
        seen.append(options)
        return real(self, windows, options=options)

    monkeypatch.setattr(ShortWindowCTranslate2, "transcribe_batch", watched)
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    wav = wav_bytes(np.concatenate([decode_audio(synth_speech(SENTENCE)).samples, np.zeros(16000, np.float32)]))

    async def scenario() -> list[dict]:
        worker = StreamWorker(engine=engines.build_engine())
        await worker.start()
        monkeypatch.setattr(worker_module, "_embedded", worker)
        serving = asyncio.create_task(worker.run())
        try:
            await sync_to_async(wait_until_announced)()
            seen.clear()  # the lanes' warm-up decodes are not the stream's
            async with Client(f"{PATH}?token={key.secret}") as client:
                await client.send({"type": "open", "media_type": "audio/wav", "language_hint": "en"})
                await client.next_frame()
                received = await stream_real_time(client, wav)
                await client.send({"type": "close"})
                rest, code = await client.frames_until_close(wait=60)
                assert code == 1000, rest[-2:]
                return [frame for _, frame in received] + rest
        finally:
            worker.stopping.set()
            await serving

    frames = run(scenario())

    finals = " ".join(f["text"] for f in frames if f["type"] == "delta" and f["is_final"])
    assert word_error_rate(SENTENCE, finals) <= 0.25, finals
    widths = [options.beam_size or 1 for options in seen]
    assert widths
    assert set(widths) == {width}, widths
