"""Finals on real conversation (issue 10, point 3): real people taking short turns, streamed at
real-time pace through the real consumer to the embedded stream worker, as ``scripts/run`` runs it.

What a user would notice: a final for each turn soon after the turn ends (measured per reference
turn: the arrival of the first final that reaches the turn's end, minus the turn's end), no turn's
words missing from the finals (the last word of every turn is looked for), no final spanning more
than ~30 s, the first stream after start-up answered without a model-load wait, and the web
process reading frames on time while the worker decodes in the same process.

Bounds are looser than the issue's targets (p50 <= 1.5 s, p95 <= 3.0 s for one session) so that a
2-core machine shared with other work does not make them flake; ``bench.stream --set
conversations`` measures the targets.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
import statistics
import time
from dataclasses import dataclass

import numpy as np
import pytest

from speech.audio import SAMPLE_RATE, float_to_pcm
from streaming import worker as worker_module
from tenants.models import Role
from tests.streaming.test_consumer import PATH, Client, issue, run
from tests.streaming.test_stream_worker import stream_worker, wait_until_announced  # noqa: F401 - a fixture

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LEAD_S = 0.5
TRAIL_S = 1.5
FRAME_S = 0.1
MAX_FINAL_SPAN_S = 30.5
P50_BOUND_S = 2.5


@dataclass
class Talk:
    name: str
    samples: np.ndarray
    turns: list[tuple[float, float, str]]  # (start, end, text), stream seconds
    # What the model itself hears at the end of each turn, decoded alone (see ``last_words_heard``).
    heard_last: list[str] | None = None


def talks() -> list[Talk]:
    """The transcribed real-speech conversations, with silence before and after."""
    from tests.conversations import conversations

    out = []
    for conv in conversations(band="wideband"):
        samples = np.concatenate(
            [np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32), conv.samples, np.zeros(int(TRAIL_S * SAMPLE_RATE), np.float32)]
        )
        turns = [(t.start + LEAD_S, t.end + LEAD_S, t.text or "") for t in conv.turns if t.end <= conv.duration_s]
        out.append(Talk(conv.name, samples, turns))
    return out


def last_words_heard(talk: Talk) -> list[str]:
    """The last word the default engine hears in each turn's audio decoded on its own.

    Whisper base mishears some real speech whatever the pipeline does (the LibriVox reader's "for
    them" is "for"/"forth" in any window): a turn's last word counts as reaching a final when the
    final has the reference word or this one. A final that lost the turn's tail has neither.
    """
    from scaiecho_site.engines import whisper_engine
    from speech.engines.base import TranscribeOptions

    decoder = whisper_engine().stream_decoder()
    heard = []
    for start, end, _ in talk.turns:
        audio = talk.samples[int(max(0.0, start - 0.2) * SAMPLE_RATE) : int((end + 0.3) * SAMPLE_RATE)]
        result = decoder.transcribe(audio, options=TranscribeOptions(language="en", temperature=0.0))
        words = words_of(result.text)
        heard.append(words[-1] if words else "")
    return heard


@pytest.fixture(scope="module")
def conversation_set() -> dict[str, Talk]:
    return {talk.name: talk for talk in talks()}


def prepared(talk: Talk) -> Talk:
    if talk.heard_last is None:
        talk.heard_last = last_words_heard(talk)
    return talk


def _normalizer():
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def words_of(text: str) -> list[str]:
    return _normalizer()(text).split()


def heard(word: str, final_words: list[str]) -> bool:
    """``word`` (normalized) is among ``final_words``, allowing Whisper's spelling and digits."""
    for candidate in final_words:
        if candidate == word or difflib.SequenceMatcher(None, word, candidate).ratio() >= 0.75:
            return True
        if word.isdigit() and word in candidate:  # "two nine three four zero" -> "29340"
            return True
    return False


@dataclass
class Outcome:
    ready_s: float  # open -> ready
    first_delta_s: float | None  # first speech onset -> first delta
    finals: list[tuple[float, dict]]  # (arrival, stream seconds from the first frame; frame)
    loop_stall_max: float  # the event loop's worst lateness while streaming
    frames: list[dict]


async def stream_talk(key, talk: Talk, *, start_at: float) -> Outcome:
    """Send ``talk`` at real-time pace in 100 ms PCM frames; collect every frame with its arrival."""
    pcm = float_to_pcm(talk.samples)
    received: list[tuple[float, dict]] = []
    async with Client(f"{PATH}?token={key.secret}") as client:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        opened = time.perf_counter()
        await client.send({"type": "open", "media_type": "audio/pcm", "sample_rate": SAMPLE_RATE, "language_hint": "en"})
        ready = await client.next_frame(wait=120)
        assert ready["type"] == "ready", ready
        ready_s = time.perf_counter() - opened
        t0 = time.perf_counter()

        async def collect() -> None:
            while True:
                frame = await client.next_frame(wait=120)
                received.append((time.perf_counter() - t0, frame))

        stalls: list[float] = []

        async def probe() -> None:
            # How late the event loop runs a 10 ms timer: the same loop reads the client's frames.
            while True:
                asked = time.perf_counter()
                await asyncio.sleep(0.01)
                stalls.append(time.perf_counter() - asked - 0.01)

        collector = asyncio.create_task(collect())
        prober = asyncio.create_task(probe())
        step = int(FRAME_S * SAMPLE_RATE) * 2
        for index, offset in enumerate(range(0, len(pcm), step)):
            await client.ws.send_to(bytes_data=pcm[offset : offset + step])
            await asyncio.sleep(max(0.0, t0 + (index + 1) * FRAME_S - time.perf_counter()))
        await client.send({"type": "close"})
        while not any(frame["type"] in ("closed", "error") for _, frame in received):
            await asyncio.sleep(0.05)
            assert time.perf_counter() - t0 < talk.samples.size / SAMPLE_RATE + 60, "no closed frame"
        collector.cancel()
        prober.cancel()
    frames = [frame for _, frame in received]
    assert frames[-1]["type"] == "closed", frames[-3:]
    deltas = [(t, f) for t, f in received if f["type"] == "delta"]
    first_onset = talk.turns[0][0]
    return Outcome(
        ready_s=ready_s,
        first_delta_s=(deltas[0][0] - first_onset) if deltas else None,
        finals=[(t, f) for t, f in deltas if f["is_final"]],
        loop_stall_max=max(stalls, default=0.0),
        frames=frames,
    )


def final_latencies(talk: Talk, outcome: Outcome) -> list[float | None]:
    """Per reference turn: arrival of the first final whose end reaches the turn's end − that end."""
    latencies: list[float | None] = []
    for _, end, _ in talk.turns:
        arrivals = [t for t, f in outcome.finals if f["text"].strip() and f["end"] >= end - 0.3]
        latencies.append(arrivals[0] - end if arrivals else None)
    return latencies


def substituted(reference: list[str], hypothesis: list[str]) -> set[int]:
    """Indexes of ``reference`` words that the alignment with ``hypothesis`` (as for WER) matches
    to a word, the same or another one: a misheard word is there, a lost word is not."""
    present: set[int] = set()
    matcher = difflib.SequenceMatcher(None, reference, hypothesis, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("equal", "replace"):
            present.update(range(i1, i1 + min(i2 - i1, j2 - j1)))
    return present


def missing_last_words(talk: Talk, outcome: Outcome) -> list[str]:
    """The turns whose last word no final holds: not near the turn as said nor as the model hears
    it alone, and not even misheard in its place (the alignment of all finals with the reference)."""
    reference: list[str] = []
    last_index = []
    for _, _, text in talk.turns:
        reference += words_of(text)
        last_index.append(len(reference) - 1)
    present = substituted(reference, words_of(" ".join(f["text"] for _, f in outcome.finals)))
    missing = []
    for (start, end, text), alone, index in zip(talk.turns, prepared(talk).heard_last or [], last_index, strict=True):
        words = words_of(text)
        if not words:
            continue
        near = [f for _, f in outcome.finals if f["end"] >= start - 0.5 and f["start"] <= end + 1.0]
        final_words = words_of(" ".join(f["text"] for f in near))
        if heard(words[-1], final_words) or (alone and heard(alone, final_words)) or index in present:
            continue
        missing.append(f"{text!r} ({start:.1f}-{end:.1f} s, alone: {alone!r}) not in {[f['text'] for f in near]}")
    return missing


def long_finals(outcome: Outcome) -> list[dict]:
    return [f for _, f in outcome.finals if f["end"] - f["start"] > MAX_FINAL_SPAN_S]


@pytest.fixture
def embedded(settings, monkeypatch):
    """The embedded default: in-memory channel layer, the stream worker inside this process, its
    model loaded at start-up (``asgi.py`` calls ``preload_embedded_worker``) as a server would."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.SCAIECHO_STREAM_INFERENCE_THREADS = 1
    monkeypatch.setattr(worker_module, "_embedded", None)
    thread = worker_module.preload_embedded_worker()
    assert thread is not None
    thread.join(timeout=180)
    assert worker_module._lane_engines, "the model was not preloaded"
    yield
    if worker_module._embedded is not None:
        worker_module._embedded.stopping.set()


def stop_embedded() -> None:
    if worker_module._embedded is not None:
        worker_module._embedded.stopping.set()


def test_one_conversation_gets_every_turn_finalized_soon_and_the_loop_reads_on_time(embedded, conversation_set, caplog):
    talk = prepared(conversation_set["ast-lib"])
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    caplog.set_level(logging.INFO, logger="scaiecho.stream_worker")
    loads_before = sum("model loaded" in r.getMessage() for r in caplog.records)

    async def scenario() -> Outcome:
        try:
            return await stream_talk(key, talk, start_at=time.perf_counter())
        finally:
            stop_embedded()
            await asyncio.sleep(0.2)

    outcome = run(scenario())
    # The first stream after start-up: the model was loaded before it, not while it waited.
    assert sum("model loaded" in r.getMessage() for r in caplog.records) == loads_before
    assert outcome.ready_s < 2.0, outcome.ready_s
    assert outcome.first_delta_s is not None
    assert outcome.first_delta_s < 3.0, outcome.first_delta_s
    # Decoding in this process's threads does not hold up its event loop, which reads the frames.
    assert outcome.loop_stall_max < 0.3, outcome.loop_stall_max
    lates = [float(m.group(1)) for r in caplog.records if (m := re.search(r"arrived at most (-?[\d.]+) s behind", r.getMessage()))]
    assert lates
    assert lates[-1] < 0.5, lates
    # No text lost, no final too long.
    assert not missing_last_words(talk, outcome), missing_last_words(talk, outcome)
    assert not long_finals(outcome)
    latencies = final_latencies(talk, outcome)
    assert None not in latencies, latencies
    p50 = statistics.median(latencies)
    print(f"one session: final latency p50 {p50:.2f} s, max {max(latencies):.2f} s, per turn {[round(x, 2) for x in latencies]};"
          f" ready {outcome.ready_s:.2f} s, first delta {outcome.first_delta_s:.2f} s, loop stall max {outcome.loop_stall_max:.3f} s")
    assert p50 <= P50_BOUND_S, latencies


@pytest.mark.xfail(
    strict=False,
    reason="issue 10, open: one of three concurrent sessions lost a short turn in 3 of 9 runs before stop 30 "
    "('You are now muted.', half of it overlapped by 'seven of clubs', in ast-dhd-cards; earlier 'ten of clubs' "
    "in lib-cards-dhd), 1 of 10 after it (in a full-suite run), 1 of 2 full-suite runs in stop 31; a seeded busy lane "
    "over ast-dhd-cards loses 'You are now muted.' in 6 of 12 seeds (4 of 12 before hyphenated words became one word); "
    "bench.stream_quality --busy still loses turns that another voice overlaps ('This conference is locked!' under "
    "'front center'); it runs and reports on every suite run",
)
def test_three_concurrent_conversations_lose_no_words(embedded, conversation_set):
    """Three people's calls at once into the embedded default: every turn's last word still
    reaches a final in each, no final spans more than ~30 s, and every turn gets its final.
    (Before the separate stream worker's test: that worker, once started, is announced to this
    module's database until its end, and the embedded mode would send it sessions it cannot hear.)"""
    chosen = [prepared(conversation_set[name]) for name in ("ast-dhd-cards", "lib-cards-dhd", "cards-ast-alsa")]
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))

    async def scenario() -> list[Outcome]:
        try:
            start = time.perf_counter() + 0.2
            return await asyncio.gather(*(stream_talk(key, talk, start_at=start + 0.3 * i) for i, talk in enumerate(chosen)))
        finally:
            stop_embedded()
            await asyncio.sleep(0.2)

    outcomes = run(scenario())
    every: list[float] = []
    for talk, outcome in zip(chosen, outcomes, strict=True):
        assert not missing_last_words(talk, outcome), (talk.name, missing_last_words(talk, outcome))
        assert not long_finals(outcome), talk.name
        latencies = final_latencies(talk, outcome)
        assert None not in latencies, (talk.name, latencies)
        every += latencies
    p50 = statistics.median(every)
    print(f"three sessions: final latency p50 {p50:.2f} s, max {max(every):.2f} s over {len(every)} turns")
    assert p50 <= 2 * P50_BOUND_S, every


@pytest.mark.usefixtures("stream_worker")
def test_with_redis_and_a_separate_stream_worker_every_turn_is_finalized_soon(conversation_set):
    # The Redis channel layer of the test settings, and ``manage.py stream_worker`` in its own process.
    talk = prepared(conversation_set["lib-alsa-ast"])
    wait_until_announced()
    key = issue(Role.TENANT_VIEWER, policy=("A", "A"))
    outcome = run(stream_talk(key, talk, start_at=time.perf_counter()))
    assert not missing_last_words(talk, outcome), missing_last_words(talk, outcome)
    assert not long_finals(outcome)
    latencies = final_latencies(talk, outcome)
    assert None not in latencies, latencies
    p50 = statistics.median(latencies)
    print(f"separate worker: final latency p50 {p50:.2f} s, max {max(latencies):.2f} s, ready {outcome.ready_s:.2f} s")
    assert p50 <= P50_BOUND_S, latencies

