"""A stream worker on a batching engine (as on CUDA) decodes its sessions' spans together.

There is no GPU here: the engine is the real CPU engine behind the real
:class:`~speech.batching.BatchingEngine`, reporting a CUDA device so that the worker lays its lanes
out as it does on a GPU. What is checked is the worker's side: concurrent sessions' decodes meet
in one batch, and every session still gets its own words.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from speech.batching import BatchingEngine
from tenants.models import Role
from tests.streaming.test_consumer import issue, run
from tests.streaming.test_stream_worker import embedded_worker, spoken_then_silent, stream_and_close
from tests.voices import word_error_rate

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
    wavs = [spoken_then_silent(text) for text in SENTENCES]

    async def scenario():
        async with embedded_worker(batching_engine, monkeypatch) as worker:
            return worker, await asyncio.gather(*(stream_and_close(key, wav) for key, wav in zip(keys, wavs, strict=True)))

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
