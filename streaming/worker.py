"""The stream worker: owns one Whisper model and the live sessions pinned to it (Backend A).

Web processes (a :class:`~streaming.sessions.WorkerSession` per stream) send a session's audio to
the worker's channel on the channel layer; the worker runs each session's
:class:`~speech.transcriber.StreamSession` and sends the deltas back to the session's ``reply_to``
channel. With ``REDIS_URL`` set, web processes and stream workers are
separate processes (``python manage.py stream_worker``, which loads its models before it says
``ready``), any number of each; with the embedded in-memory channel layer, one worker runs inside
the web process: :func:`preload_embedded_worker` (called by ``asgi.py`` at start-up) loads and
warms its models in a thread while the server starts, and the first stream starts the worker on
the server's event loop without waiting for a model. Decodes run in the lanes' threads; the
engines release the GIL while they compute, so the event loop keeps reading frames on time
(``tests/streaming/test_conversation_stream.py`` measures it).

A session stays on the inference lane with the fewest sessions when it opens. On a lane each feed
is a short unit of work, queued in arrival order, so one busy session cannot starve the others.
How lanes map to models depends on the device:

- On a CPU each lane is one model and one thread (``SCAIECHO_STREAM_INFERENCE_THREADS`` lanes per
  worker): a batch costs a CPU about the sum of its windows, so lanes decode side by side instead.
- On CUDA (the engine's ``device`` starts with ``cuda``) the engine is a
  :class:`~speech.batching.BatchingEngine` that decodes concurrent callers' windows in one pass.
  The worker then runs ``SCAIECHO_GPU_MAX_BATCH`` lanes, threads that share the one model and one
  stream decoder (``engine.stream_decoder()``, taken once: a decoder per session would batch
  nothing), so the decodes of up to that many sessions that fall due together — one tick of the
  live streams — go to the GPU as one batched encoder/decoder pass. The batcher waits at most
  ``SCAIECHO_GPU_BATCH_WAIT_MS`` for a batch to fill; results are the same words as one by one.

Messages, web process (a stream session) → worker: ``session.open`` (session_id, reply_to, language, chunk_seconds,
diarize, tenant_id, speaker_ids, prompt), ``session.audio`` (session_id, pcm: s16le 16 kHz mono bytes),
``session.finalize``, ``session.close`` (decode what is queued, then ``stream.closed``),
``session.abort`` (the client is gone: drop the session and its queued audio undecoded); for a
diarized Backend B stream, whose chunks the relay transcribes, ``speaker.attribute`` (session_id,
reply_to, request_id, tenant_id, speaker_ids, pcm) and ``speaker.close``. Worker → session:
``stream.delta`` (the delta's fields, with speaker_id and speaker_label when diarized),
``stream.progress`` (audio_s: seconds decoded so far, which the session's backpressure waits
on), ``stream.flushed``, ``stream.closed``, ``stream.error`` (code, message),
``stream.speaker`` (request_id, speaker_id, speaker_label).

A session's inbox is bounded: more than ``SCAIECHO_STREAM_WORKER_INBOX_SECONDS`` of audio waiting
for its lane ends the session (``stream.error`` with code ``RATE_LIMITED``: the web process's own
backpressure keeps well below it, so only a misbehaving sender meets it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections

from scaiecho_site.metrics import observe_inference
from speech.audio import SAMPLE_RATE, pcm_to_float
from transcription.models import SpeechWorker

logger = logging.getLogger("scaiecho.stream_worker")

CHANNEL_PREFIX = "scaiecho.streamworker."


@dataclass
class _Lane:
    """One thread and the model it runs (its own on a CPU, shared on CUDA); a session stays on its lane."""

    executor: ThreadPoolExecutor
    engine: Any = None
    # The stream decoder every session on the lane uses; ``None``: each session takes its own
    # (``engine.stream_decoder()``), as on a CPU.
    decoder: Any = None
    sessions: int = 0
    queued: int = 0  # feeds waiting for or running on this lane's thread


def _new_lane(index: int) -> _Lane:
    return _Lane(executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"scaiecho-inference-{index}"))


def batches_on_device(engine: Any) -> bool:
    """Whether concurrent decodes on ``engine`` become one batched pass (CUDA, see the module doc)."""
    return str(getattr(engine, "device", "cpu")).startswith("cuda")


# A final shorter than this is embedded with the audio held after it, up to this length.
STREAM_EMBED_SECONDS = 2.0
# How much of a diarized session's recent audio the worker keeps, to embed each final's span.
SPEAKER_HISTORY_SECONDS = 90
# A session hears of the worker's progress at least every this many decoded audio seconds (and
# whenever its inbox runs empty).
PROGRESS_SECONDS = 1.0


@dataclass
class _Speakers:
    """A diarized session's speaker state: its tracker and its recent audio (memory only)."""

    tenant_id: str
    speaker_ids: list[str]
    tracker: Any
    chunks: deque[np.ndarray] = field(default_factory=deque)
    kept: int = 0  # samples in ``chunks``
    offset: int = 0  # stream sample index of the first kept sample

    def append(self, samples: np.ndarray) -> None:
        # Whole feeds are kept and dropped, so a feed costs no copy of the history.
        self.chunks.append(samples)
        self.kept += samples.size
        while self.chunks and self.kept - self.chunks[0].size >= SPEAKER_HISTORY_SECONDS * SAMPLE_RATE:
            dropped = self.chunks.popleft()
            self.kept -= dropped.size
            self.offset += dropped.size

    def window(self) -> tuple[list[np.ndarray], float]:
        """The kept feeds (a snapshot: later feeds do not change it) and their start in stream seconds."""
        return list(self.chunks), self.offset / SAMPLE_RATE


@dataclass
class _Session:
    reply_to: str
    transcriber: Any
    lane: _Lane
    started: float | None = None  # when the first audio arrived: the stream clock's zero
    # Audio as it reaches the worker (before it waits for its lane): when the first arrived, how
    # many seconds have arrived, and the most they ran behind real time. A web process that reads
    # its client's frames late shows here, whatever the decodes cost.
    first_arrival: float | None = None
    audio_s: float = 0.0
    late_max: float = 0.0

    def arrived(self, seconds: float) -> None:
        now = time.monotonic()
        if self.first_arrival is None:
            self.first_arrival = now
        self.late_max = max(self.late_max, now - self.first_arrival - self.audio_s)
        self.audio_s += seconds
    inbox: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    speakers: _Speakers | None = None
    queued_s: float = 0.0  # audio seconds in ``inbox`` (bounded by SCAIECHO_STREAM_WORKER_INBOX_SECONDS)
    decoded_s: float = 0.0  # audio seconds fed to the transcriber
    reported_s: float = 0.0  # ``decoded_s`` as last sent in ``stream.progress``


class StreamWorker:
    def __init__(self, *, engine: Any = None, lanes: int | None = None, preloaded: bool = False) -> None:
        self.layer = get_channel_layer()
        self.engine = engine
        # The embedded worker takes the engines :func:`preload_embedded_worker` loaded at start-up.
        self.preloaded = preloaded
        self.sessions: dict[str, _Session] = {}
        # An explicit lane count, or the settings' once the device is known (see ``start``).
        self.lane_count = lanes
        self.lanes: list[_Lane] = []
        self.channel = ""
        self.stopping = asyncio.Event()
        # Speaker embeddings for diarized sessions: one thread, so it never delays a lane's decode.
        self.speaker_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scaiecho-speakers")
        # Speaker state of Backend B streams that ask this worker who spoke each relayed chunk.
        self.relay_speakers: dict[str, _Speakers] = {}
        # Audio seconds this worker decoded, and dropped undecoded (aborted or overfull sessions).
        self.decoded_audio_s = 0.0
        self.dropped_audio_s = 0.0

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> str:
        """Take a channel, announce the worker, and load the model (in the inference thread)."""
        self.channel = await self.layer.new_channel(CHANNEL_PREFIX)
        await self.heartbeat()
        # Keep announcing while the model loads (longer than the heartbeat's TTL).
        self.beats = asyncio.create_task(self._beat_forever())
        loop = asyncio.get_running_loop()
        first = _new_lane(0)
        self.lanes.append(first)
        await loop.run_in_executor(first.executor, self._load_model, first, 0)
        if batches_on_device(first.engine):
            # One model; concurrent lanes make its batches (see the module docstring).
            first.decoder = first.engine.stream_decoder()
            for index in range(1, self.lane_count or settings.SCAIECHO_GPU_MAX_BATCH):
                lane = _new_lane(index)
                lane.engine, lane.decoder = first.engine, first.decoder
                self.lanes.append(lane)
        else:
            for index in range(1, self.lane_count or settings.SCAIECHO_STREAM_INFERENCE_THREADS):
                lane = _new_lane(index)
                self.lanes.append(lane)
                await loop.run_in_executor(lane.executor, self._load_model, lane, index)
        logger.info("stream worker %s: %d lanes on %s", self.channel, len(self.lanes), getattr(first.engine, "device", "cpu"))
        return self.channel

    def _load_model(self, lane: _Lane, index: int) -> None:
        from scaiecho_site.engines import build_engine, whisper_engine
        from speech.vad import load_vad

        if self.preloaded and self.engine is None:
            lane.engine = _lane_engine(index)
            return
        if index == 0:
            lane.engine = self.engine or whisper_engine()
        else:  # each further lane has a model of its own, so decodes run side by side
            lane.engine = build_engine()
        lane.engine.load()
        load_vad()
        lane.engine.warm_up()  # compiles Whisper's alignment code now, not in a live session

    async def heartbeat(self) -> None:
        from transcription.services import worker_heartbeat

        def beat() -> None:
            close_old_connections()
            try:
                worker_heartbeat(
                    worker_id=self.channel,
                    kind=SpeechWorker.Kind.STREAM,
                    hostname=socket.gethostname(),
                    model_name=settings.SCAIECHO_WHISPER_MODEL,
                    device=settings.SCAIECHO_WHISPER_DEVICE or "auto",
                    ttl_seconds=settings.SCAIECHO_STREAM_WORKER_TTL_SECONDS,
                )
            finally:
                # The beat runs on any pool thread: no connection stays open on one after it
                # (beyond DATABASE_CONN_MAX_AGE), also once the worker has stopped.
                close_old_connections()

        await sync_to_async(beat, thread_sensitive=False)()

    async def run(self) -> None:
        """Serve until ``stopping`` is set; then tell every session's client and retire."""
        beats = getattr(self, "beats", None) or asyncio.create_task(self._beat_forever())
        try:
            while not self.stopping.is_set():
                receive = asyncio.create_task(self.layer.receive(self.channel))
                stop = asyncio.create_task(self.stopping.wait())
                done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    continue
                stop.cancel()
                try:
                    message = receive.result()
                except Exception:  # a dropped Redis connection: log, breathe, listen again
                    logger.exception("stream worker could not read its channel")
                    await asyncio.sleep(0.5)
                    continue
                await self.dispatch(message)
        finally:
            beats.cancel()
            for session_id, session in list(self.sessions.items()):
                await self.send(session.reply_to, {"type": "stream.error", "code": "BACKEND_ERROR", "message": "The stream worker is shutting down."})
                self._drop(session_id)
            await sync_to_async(self._retire, thread_sensitive=False)()
            for lane in self.lanes:
                lane.executor.shutdown(wait=False, cancel_futures=True)
            self.speaker_executor.shutdown(wait=False, cancel_futures=True)

    def _retire(self) -> None:
        from transcription.services import worker_retire

        close_old_connections()
        try:
            worker_retire(worker_id=self.channel)
        finally:
            close_old_connections()

    async def _beat_forever(self) -> None:
        interval = max(0.5, settings.SCAIECHO_STREAM_WORKER_TTL_SECONDS / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except Exception:  # a database hiccup must not stop the worker
                logger.exception("stream worker heartbeat failed")

    # --- messages -----------------------------------------------------------------------------

    async def dispatch(self, message: dict[str, Any]) -> None:
        session_id = message.get("session_id", "")
        if message.get("type") == "session.open":
            await self.open(session_id, message)
            return
        if message.get("type") == "speaker.attribute":
            asyncio.create_task(self.attribute_chunk(session_id, message))
            return
        if message.get("type") == "speaker.close":
            self.relay_speakers.pop(session_id, None)
            return
        session = self.sessions.get(session_id)
        if session is None:  # ended or aborted: its late messages are dropped, never decoded
            reply_to = message.get("reply_to")
            if reply_to:
                await self.send(reply_to, {"type": "stream.error", "code": "BACKEND_ERROR", "message": "Unknown stream session."})
            return
        if message.get("type") == "session.abort":
            self._drop(session_id)
            logger.info("stream session %s aborted on %s", session_id, self.channel)
            return
        if message.get("type") == "session.audio":
            seconds = len(message["pcm"]) / 2 / SAMPLE_RATE
            limit = settings.SCAIECHO_STREAM_WORKER_INBOX_SECONDS
            if session.queued_s + seconds > limit:
                await self.send(
                    session.reply_to,
                    {
                        "type": "stream.error",
                        "code": "RATE_LIMITED",
                        "message": f"More than {limit:g} s of this stream's audio wait for the stream worker.",
                    },
                )
                self._drop(session_id)
                return
            session.queued_s += seconds
            session.arrived(seconds)
        session.inbox.put_nowait(message)

    async def open(self, session_id: str, message: dict[str, Any]) -> None:
        from speech.transcriber import StreamSession

        lane = min(self.lanes, key=lambda candidate: candidate.sessions)
        lane.sessions += 1
        transcriber = StreamSession(
            lane.engine,
            chunk_seconds=min(float(message.get("chunk_seconds", 5.0)), settings.SCAIECHO_STREAM_COMMIT_SECONDS),
            language=message.get("language") or None,
            decoder=lane.decoder,
            prompt=message.get("prompt") or None,
            beam_size=settings.SCAIECHO_STREAM_BEAM_SIZE,
            context_seconds=settings.SCAIECHO_STREAM_CONTEXT_SECONDS,
        )
        session = _Session(reply_to=message["reply_to"], transcriber=transcriber, lane=lane)
        if message.get("diarize"):
            from scaiecho_site.engines import speaker_encoder
            from speakers.diarization import SpeakerTracker

            session.speakers = _Speakers(
                tenant_id=message["tenant_id"], speaker_ids=list(message.get("speaker_ids") or []), tracker=SpeakerTracker()
            )
            # Load the speaker model now (once per worker), not when the first final is due.
            asyncio.get_running_loop().run_in_executor(self.speaker_executor, speaker_encoder)
        session.task = asyncio.create_task(self._serve(session_id, session))
        self.sessions[session_id] = session
        logger.info("stream session %s opened on %s (%d live)", session_id, self.channel, len(self.sessions))

    async def _serve(self, session_id: str, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                message = await session.inbox.get()
                kind = message["type"]
                if kind == "session.audio":
                    if session.started is None:
                        session.started = time.monotonic()
                    now = time.monotonic() - session.started
                    if session.lane.queued >= settings.SCAIECHO_STREAM_BUSY_QUEUE:
                        # The lane is shared and backed up: this feed makes finals only, so that
                        # finals of every session keep up instead of all falling behind.
                        now = float("inf")
                    samples = pcm_to_float(message["pcm"])
                    seconds = samples.size / SAMPLE_RATE
                    session.queued_s -= seconds
                    if session.speakers is not None:
                        session.speakers.append(samples)
                    session.lane.queued += 1
                    try:
                        deltas = await loop.run_in_executor(
                            session.lane.executor, session.transcriber.feed, samples, now
                        )
                    finally:
                        session.lane.queued -= 1
                    session.decoded_s += seconds
                    self.decoded_audio_s += seconds
                elif kind == "session.finalize":
                    deltas = await loop.run_in_executor(session.lane.executor, session.transcriber.finalize)
                elif kind == "session.close":
                    deltas = await loop.run_in_executor(session.lane.executor, session.transcriber.close)
                else:
                    continue
                for delta in deltas:
                    fields = asdict(delta)
                    if session.speakers is None:
                        await self.send(session.reply_to, {"type": "stream.delta", **fields})
                        continue
                    # A diarized final in which the voice changes goes out as one final per speaker.
                    for piece in await self._attribute(session.speakers, delta):
                        await self.send(session.reply_to, {"type": "stream.delta", **fields, **piece})
                if kind == "session.audio" and (
                    session.inbox.empty() or session.decoded_s - session.reported_s >= PROGRESS_SECONDS
                ):
                    session.reported_s = session.decoded_s
                    await self.send(session.reply_to, {"type": "stream.progress", "audio_s": session.decoded_s})
                if kind == "session.finalize":
                    await self.send(session.reply_to, {"type": "stream.flushed"})
                elif kind == "session.close":
                    await self.send(session.reply_to, {"type": "stream.closed"})
                    stats = session.transcriber.stats
                    observe_inference(kind="stream", backend="A", compute_s=stats.seconds, audio_s=session.audio_s)
                    logger.info(
                        "stream session %s closed: %.1f s of audio, arrived at most %.2f s behind real time,"
                        " %d decodes, %.1f s of compute",
                        session_id, session.audio_s, session.late_max, stats.count, stats.seconds,
                    )
                    self._drop(session_id)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("stream session %s failed", session_id)
            await self.send(session.reply_to, {"type": "stream.error", "code": "BACKEND_ERROR", "message": "Transcription failed."})
            self._drop(session_id)

    async def _attribute(self, speakers: _Speakers, delta: Any) -> list[dict[str, Any]]:
        """Who spoke a final delta, split where the speaker changes; partials carry no speaker yet."""
        if not delta.is_final:
            return [{"speaker_id": None, "speaker_label": None}]
        audio, offset = speakers.window()
        loop = asyncio.get_running_loop()
        # The transcriber's final carries word times when it has them (``words``); else the cut
        # falls between words spread evenly over the span.
        words = getattr(delta, "words", None)
        return await loop.run_in_executor(
            self.speaker_executor, _attribute_span, speakers, audio, offset, delta.start, delta.end, delta.text, words
        )

    async def attribute_chunk(self, session_id: str, message: dict[str, Any]) -> None:
        """Who spoke a relayed chunk of a Backend B stream (the relay transcribes, we compare voices)."""
        from speakers.diarization import SpeakerTracker

        speakers = self.relay_speakers.get(session_id)
        if speakers is None:
            speakers = self.relay_speakers[session_id] = _Speakers(
                tenant_id=message["tenant_id"], speaker_ids=list(message.get("speaker_ids") or []), tracker=SpeakerTracker()
            )
        samples = pcm_to_float(message["pcm"])
        loop = asyncio.get_running_loop()
        reply = {"type": "stream.speaker", "request_id": message["request_id"]}
        try:
            # A relayed chunk is attributed whole (no split): the relay's answer has no word times.
            pieces = await loop.run_in_executor(
                self.speaker_executor, _attribute_span, speakers, [samples], 0.0, 0.0, samples.size / SAMPLE_RATE, "", None, False
            )
            reply.update(pieces[0])
        except Exception:
            logger.exception("speaker attribution failed for stream %s", session_id)
            reply["error"] = "Speaker attribution failed."
        await self.send(message["reply_to"], reply)

    def _drop(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        session.lane.sessions -= 1
        self.dropped_audio_s += session.queued_s
        while not session.inbox.empty():  # queued audio is freed now, not decoded
            session.inbox.get_nowait()
        session.queued_s = 0.0
        if session.task is not None and session.task is not asyncio.current_task():
            session.task.cancel()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        try:
            await self.layer.send(channel, message)
        except Exception:  # the client is gone or its channel is full: its consumer gives up too
            logger.warning("could not reach stream client %s", channel)


def _attribute_span(
    speakers: _Speakers,
    feeds: list[np.ndarray],
    offset: float,
    start: float,
    end: float,
    text: str = "",
    words: list[Any] | None = None,
    split: bool = True,
) -> list[dict[str, Any]]:
    """Embed a final's span and attribute it (in the speaker thread): one dict of delta fields per
    speaker, in order (``start``, ``end``, ``text`` only where the final was split).

    The candidates are read from the database for every final, so a speaker erased while the
    session runs is not matched again.
    """
    from dataclasses import replace

    from scaiecho_site.engines import speaker_encoder
    from speakers.diarization import attribute_final
    from speakers.selectors import speaker_candidates

    # Joined here, in the speaker thread, not on the event loop.
    audio = np.concatenate(feeds) if feeds else np.zeros(0, dtype=np.float32)
    close_old_connections()
    candidates = speaker_candidates(tenant_id=speakers.tenant_id, speaker_ids=speakers.speaker_ids)
    # A short final (a clause cut at its comma, a lone "yes") holds too little voice for a steady
    # embedding: it is read together with the audio after it that the worker already holds, which
    # is the same speaker going on when the final was cut mid-turn, or the pause after the turn.
    held_until = offset + audio.size / SAMPLE_RATE
    embed_until = max(end, min(start + STREAM_EMBED_SECONDS, held_until))
    local = [replace(w, start=w.start - offset, end=w.end - offset) for w in words or []]
    pieces = attribute_final(
        audio,
        start=max(0.0, start - offset),
        end=max(0.0, end - offset),
        text=text,
        words=local or None,
        embed_until=max(0.0, embed_until - offset),
        encoder=speaker_encoder(),
        tracker=speakers.tracker,
        candidates=candidates,
        split=split,
    )
    if len(pieces) == 1:
        return [{"speaker_id": pieces[0].speaker_id, "speaker_label": pieces[0].speaker_label}]
    return [
        {
            "start": round(piece.start + offset, 3),
            "end": round(piece.end + offset, 3),
            "text": piece.text,
            "speaker_id": piece.speaker_id,
            "speaker_label": piece.speaker_label,
        }
        for piece in pieces
    ]


_embedded: StreamWorker | None = None
_embedded_lock = asyncio.Lock()
# The embedded worker's lane engines, loaded and warmed once per process (see ``_lane_engine``).
_lane_engines: dict[int, Any] = {}
_lane_engines_lock = threading.Lock()


def _embedded_layer() -> bool:
    return "InMemoryChannelLayer" in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def _lane_engine(index: int) -> Any:
    """Lane ``index``'s engine, loaded and warmed; a second caller waits for the first's load."""
    from scaiecho_site.engines import build_engine, whisper_engine
    from speech.vad import load_vad

    with _lane_engines_lock:
        if index not in _lane_engines:
            started = time.perf_counter()
            # Lane 0 shares the process's engine; each further lane has a model of its own.
            engine = whisper_engine() if index == 0 else build_engine()
            engine.load()
            load_vad()
            engine.warm_up()
            _lane_engines[index] = engine
            logger.info("stream lane %d model loaded and warm in %.1f s", index, time.perf_counter() - started)
        return _lane_engines[index]


def preload_embedded_worker() -> threading.Thread | None:
    """At web-process start with the in-memory channel layer: load and warm the embedded stream
    worker's models in a background thread, so that the first stream waits for no model.

    The worker itself (its channel on this process's event loop) starts with the first stream;
    by then this has usually finished, and if not, that stream waits only for the rest of it.
    A model that cannot load is logged here and reported to the stream that needs it.
    """
    if not _embedded_layer():
        return None
    lanes = settings.SCAIECHO_STREAM_INFERENCE_THREADS

    def preload() -> None:
        try:
            for index in range(max(1, lanes)):
                if batches_on_device(_lane_engine(index)):
                    break  # on CUDA the lanes share lane 0's model
        except Exception:
            logger.exception("could not preload the embedded stream worker's model")

    thread = threading.Thread(target=preload, name="scaiecho-stream-preload", daemon=True)
    thread.start()
    return thread


async def ensure_embedded_worker() -> None:
    """With the in-memory channel layer, run one stream worker inside this (web) process."""
    global _embedded
    if not _embedded_layer():
        return
    async with _embedded_lock:
        if _embedded is None:
            worker = StreamWorker(preloaded=True)
            await worker.start()
            asyncio.get_running_loop().create_task(worker.run())
            _embedded = worker
            logger.info("embedded stream worker %s started in process %d", worker.channel, os.getpid())
