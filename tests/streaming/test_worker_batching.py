"""A stream worker on a batching engine (as on CUDA) decodes its sessions' spans together.

There is no GPU here: the engine is the real CPU engine behind the real
:class:`~speech.batching.BatchingEngine`, reporting a CUDA device so that the worker lays its lanes
out as it does on a GPU. What is checked is the worker's side: concurrent sessions' decodes meet
in one batch, and every session still gets its own words.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from asgiref.sync import sync_to_async

from speech.audio import decode_audio, wav_bytes
from speech.batching import BatchingEngine
from streaming import worker as worker_module
from streaming.worker import StreamWorker
from tenants.models import Role
from tests.streaming.test_consumer import PATH, Client, issue, run
from tests.streaming.test_stream_worker import stream_real_time, wait_until_announced
from tests.voices import synth_speech, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SENTENCES = [
    "Please send the report to the finance team before Friday.",
    "The weather will be sunny tomorrow afternoon.",
    "Our next meeting is on Monday at ten.",
]


@pytest.fixture
def batching_engine(settings) -> Iterator[BatchingEngine]:
    from scaiecho_site.engines import build_engine

    settings.SCAIECHO_GPU_MAX_BATCH = 3
    engine = BatchingEngine(build_engine(), max_batch=3, max_wait_s=0.2)
    engine.device = "cuda"  # what the worker looks at; the decode itself runs on this CPU
    yield engine
    engine.close()


def test_concurrent_sessions_share_batches_and_keep_their_words(batching_engine, settings, monkeypatch):
    # The worker runs in this process, as the embedded worker of the in-memory channel layer does.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    keys = [issue(Role.TENANT_VIEWER, policy=("A", "A")) for _ in SENTENCES]
    # Each sentence with a second of silence after it, so that its last words become final.
    wavs = [wav_bytes(np.concatenate([decode_audio(synth_speech(text)).samples, np.zeros(16000, np.float32)])) for text in SENTENCES]

    async def scenario():
        worker = StreamWorker(engine=batching_engine)
        await worker.start()
        monkeypatch.setattr(worker_module, "_embedded", worker)
        serving = asyncio.create_task(worker.run())
        try:
            await sync_to_async(wait_until_announced)()

            async def one(key, wav: bytes) -> list[dict]:
                async with Client(f"{PATH}?token={key.secret}") as client:
                    await client.send({"type": "open", "media_type": "audio/wav", "language_hint": "en"})
                    await client.next_frame()
                    received = await stream_real_time(client, wav)
                    await client.send({"type": "close"})
                    rest, code = await client.frames_until_close(wait=60)
                    assert code == 1000, rest[-2:]
                    return [frame for _, frame in received] + rest

            return worker, await asyncio.gather(*(one(key, wav) for key, wav in zip(keys, wavs, strict=True)))
        finally:
            worker.stopping.set()
            await serving

    worker, outcomes = run(scenario())
    # The worker runs one lane per batch slot, all on the one model and one stream decoder.
    assert len(worker.lanes) == 3
    assert len({id(lane.engine) for lane in worker.lanes}) == 1
    assert len({id(lane.decoder) for lane in worker.lanes}) == 1
    decoder = worker.lanes[0].decoder
    assert max(decoder.stats.sizes) > 1, decoder.stats.sizes
    for text, frames in zip(SENTENCES, outcomes, strict=True):
        finals = " ".join(f["text"] for f in frames if f["type"] == "delta" and f["is_final"])
        assert word_error_rate(text, finals) <= 0.25, (text, finals)
