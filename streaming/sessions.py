"""Live stream sessions: what runs a stream's transcription, behind one interface.

The consumer is transport only: it decodes the client's audio frames into 16 kHz samples and hands
them to a :class:`LiveSession`, which transcribes them and reports back through a
:class:`SessionListener` (``on_delta``, ``on_error``, ``on_closed``). Two implementations:

- :class:`WorkerSession` (Backend A): the stream is pinned to one stream worker, which owns the
  model (:mod:`streaming.worker`). Audio goes to the worker's channel on the channel layer; the
  worker's deltas come back on a channel of the session's own. The session watches the worker's
  heartbeat, so a dead worker ends the stream (4502) instead of leaving it silent.
- :class:`RelaySession` (Backend B): the audio is cut into ``chunk_seconds`` chunks, each sent to
  the OpenAI-compatible relay in a thread; with diarization a stream worker says who spoke each
  chunk (no model ever runs in the web process).

:func:`session_for` picks the implementation from the grant's backend; it and
:func:`session_backend_available` are the only places that know which backend is which.

Order and buffers: deltas reach the listener in the order the backend made them, and
``on_closed`` comes after the last one. Buffers are bounded: a relay session holds at most
``RELAY_QUEUE_CHUNKS`` chunks, and a worker session at most ``SCAIECHO_STREAM_MAX_INFLIGHT_SECONDS``
of audio the worker has not decoded yet (the worker reports its progress); beyond that the
consumer waits (backpressure), and its own bounded queue of frames closes the stream when the
wait runs long. Nothing here runs inference
on the event loop. After :meth:`LiveSession.abort` no event is delivered and no new backend work
starts (a relay call already in flight finishes in its thread; its answer is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import numpy as np
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer
from django.conf import settings

from scaiecho_site import errors
from speech.audio import SAMPLE_RATE, float_to_pcm
from speech.engines.base import TranscribeOptions
from streaming.services import StreamGrant, stream_worker_alive, stream_worker_pick
from streaming.worker import ensure_embedded_worker
from transcription.models import SpeechWorker
from transcription.selectors import relay_configured, whisper_workers_alive

logger = logging.getLogger("scaiecho.streaming")

# At most this many relay chunks wait for the relay; the consumer waits for room (backpressure).
RELAY_QUEUE_CHUNKS = 4
# How often a worker session checks that its stream worker's heartbeat is current.
WORKER_CHECK_SECONDS = 0.5


@dataclass(frozen=True)
class SessionOptions:
    """What the client asked for in its ``open`` frame, as far as transcription cares."""

    language: str | None
    chunk_seconds: float
    diarize: bool
    speaker_ids: list[str]
    # Text that conditions the decoder (names, spelling), as the first final's context.
    prompt: str | None = None


@dataclass(frozen=True)
class LiveDelta:
    """One transcript update, in stream seconds. ``diarized``: the speaker fields are part of it
    (``None`` then means "no speaker known", not "not asked")."""

    text: str
    is_final: bool
    start: float
    end: float
    confidence: float | None = None
    diarized: bool = False
    speaker_id: str | None = None
    speaker_label: str | None = None


class SessionListener(Protocol):
    """Where a session reports (the consumer). Each is called at most until the session ends."""

    async def on_delta(self, delta: LiveDelta) -> None: ...

    async def on_error(self, error: errors.ApplicationError) -> None: ...

    async def on_flushed(self) -> None:
        """Every final of the audio before a :meth:`LiveSession.finalize` is out."""

    async def on_closed(self) -> None: ...


class LiveSession(ABC):
    """One live stream's transcription, whatever runs it.

    Life cycle: :meth:`open`, then :meth:`audio` any number of times with :meth:`finalize` in
    between, then :meth:`close` (which ends with ``listener.on_closed()`` once every delta is out)
    or :meth:`abort` at any time (the client left or the stream failed: stop, report nothing more).
    """

    backend: ClassVar[str]

    def __init__(
        self, *, grant: StreamGrant, options: SessionOptions, listener: SessionListener, layer: BaseChannelLayer
    ) -> None:
        self.grant = grant
        self.options = options
        self.listener = listener
        self.layer = layer
        self.stopped = asyncio.Event()  # ended normally or aborted: no more events, no new work
        self._aborted = False
        self._tasks: list[asyncio.Task[None]] = []

    # --- the backend's side -----------------------------------------------------------------

    @classmethod  # noqa: B027 - most backends need no preparing
    async def prepare(cls) -> None:
        """Make the backend reachable before a stream's backend is resolved (default: nothing)."""

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether this backend can take a stream now (a database read: call it in a thread)."""

    # --- the consumer's side ----------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Reserve the backend; raises an :class:`~scaiecho_site.errors.ApplicationError` if it cannot."""

    @abstractmethod
    async def audio(self, samples: np.ndarray) -> bool:
        """Take decoded 16 kHz samples; may wait while the backend is behind. False when the
        session stopped first and the samples never reached the backend (they are not billed)."""

    @abstractmethod
    async def finalize(self) -> None:
        """Make finals of all audio so far, without closing; ``on_flushed`` follows the last."""

    @abstractmethod
    async def close(self, tail: np.ndarray) -> None:
        """Transcribe ``tail`` (the decoder's last samples) and the rest; ``on_closed`` follows."""

    async def abort(self) -> None:
        """Stop now and free the backend. Safe to call twice, and from the session's own tasks."""
        if self._aborted:
            return
        self._aborted = True
        self.stopped.set()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await self._release()

    async def _release(self) -> None:  # noqa: B027 - a backend that holds nothing frees nothing
        """Free what the backend holds for this session (best effort: it may be gone)."""

    # --- helpers for the implementations ----------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(work))

    async def _deliver(self, delta: LiveDelta) -> None:
        if not self.stopped.is_set():
            await self.listener.on_delta(delta)

    async def _fail(self, error: errors.ApplicationError) -> None:
        if not self.stopped.is_set():
            await self.listener.on_error(error)

    async def _flushed(self) -> None:
        if not self.stopped.is_set():
            await self.listener.on_flushed()

    async def _finished(self) -> None:
        """Every delta is out: report ``closed`` once and stop watching the backend."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await self.listener.on_closed()

    async def _unless_stopped(self, work: Awaitable[Any]) -> None:
        """Await ``work``, or give up on it when the session stops (so nothing waits forever)."""
        future = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopped.wait())
        try:
            await asyncio.wait({future, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not future.done():
                future.cancel()
        if future.done() and not future.cancelled():
            future.result()


class WorkerSession(LiveSession):
    """Backend A: a stream worker transcribes; this session relays audio and its answers."""

    backend = "A"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker: str | None = None
        self.reply_channel: str | None = None
        self.closing = False
        self.worker_closed = asyncio.Event()
        # Audio seconds sent to the worker, and decoded there (its ``stream.progress``).
        self.sent_s = 0.0
        self.decoded_s = 0.0
        self.progress = asyncio.Event()

    @classmethod  # noqa: B027 - most backends need no preparing
    async def prepare(cls) -> None:
        # With the in-memory channel layer the worker runs in this process, started by the first stream.
        await ensure_embedded_worker()

    @classmethod
    def available(cls) -> bool:
        return whisper_workers_alive(kind=SpeechWorker.Kind.STREAM)

    async def open(self) -> None:
        self.worker = await database_sync_to_async(stream_worker_pick)()
        # The worker answers on a channel of this session's own, read by its own task. The default
        # prefix: channels_redis reads every process-specific channel through one real channel
        # per prefix, shared with the consumer's.
        self.reply_channel = await self.layer.new_channel()
        await self._to_worker(
            "session.open",
            reply_to=self.reply_channel,
            language=self.options.language,
            chunk_seconds=self.options.chunk_seconds,
            diarize=self.options.diarize,
            tenant_id=str(self.grant.tenant_id),
            speaker_ids=self.options.speaker_ids,
            prompt=self.options.prompt,
        )
        self._spawn(self._read_replies())
        self._spawn(self._watch_worker())

    async def audio(self, samples: np.ndarray) -> bool:
        if self.closing or self.stopped.is_set():
            return False
        if samples.size:
            await self._unless_stopped(self._room_for_audio())
            if self.stopped.is_set():
                return False
            self.sent_s += samples.size / SAMPLE_RATE
            await self._to_worker("session.audio", pcm=float_to_pcm(samples))
        return True

    async def _room_for_audio(self) -> None:
        """Wait while the worker has more than ``SCAIECHO_STREAM_MAX_INFLIGHT_SECONDS`` undecoded."""
        while self.sent_s - self.decoded_s > settings.SCAIECHO_STREAM_MAX_INFLIGHT_SECONDS:
            self.progress.clear()
            await self.progress.wait()

    async def finalize(self) -> None:
        if not self.closing:
            await self._to_worker("session.finalize")

    async def close(self, tail: np.ndarray) -> None:
        await self.audio(tail)
        if self.closing or self.stopped.is_set():
            return
        self.closing = True
        await self._to_worker("session.close")
        # Waited for in a task: the consumer must go on reading frames meanwhile.
        self._spawn(self._expect_closed())

    async def _release(self) -> None:
        if self.worker is not None and not self.worker_closed.is_set():
            # ``session.abort``, not ``session.close``: the worker drops the audio still queued for
            # this session instead of decoding it for nobody.
            with contextlib.suppress(Exception):  # free the worker's session; it may be gone already
                await self._to_worker("session.abort")

    async def _to_worker(self, kind: str, **fields: Any) -> None:
        await self.layer.send(self.worker, {"type": kind, "session_id": self.grant.session_id, **fields})

    async def _read_replies(self) -> None:
        """The worker's messages, in order: ``stream.delta``, ``stream.progress`` (audio decoded so
        far), ``stream.flushed`` (every delta of a ``finalize`` is out),
        ``stream.closed``, ``stream.error``."""
        while True:
            try:
                message = await self.layer.receive(self.reply_channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # the channel layer is unreachable: the stream cannot go on
                logger.exception("stream %s lost its worker's channel", self.grant.session_id)
                await self._fail(errors.BackendError("The stream failed."))
                return
            kind = message.get("type")
            if kind == "stream.delta":
                await self._deliver(
                    LiveDelta(
                        text=message["text"],
                        is_final=message["is_final"],
                        start=message["start"],
                        end=message["end"],
                        confidence=message.get("confidence"),
                        diarized=self.options.diarize,
                        speaker_id=message.get("speaker_id"),
                        speaker_label=message.get("speaker_label"),
                    )
                )
            elif kind == "stream.progress":
                self.decoded_s = float(message.get("audio_s", self.decoded_s))
                self.progress.set()
            elif kind == "stream.flushed":
                await self._flushed()
            elif kind == "stream.closed":
                self.worker_closed.set()
                await self._finished()
                return
            elif kind == "stream.error":
                self.worker_closed.set()  # the worker has dropped the session already
                text = message.get("message") or "The stream worker failed."
                error = errors.RateLimited(text, retry_after=1) if message.get("code") == errors.RateLimited.code else errors.BackendError(text)
                await self._fail(error)
                return

    async def _watch_worker(self) -> None:
        while True:
            await asyncio.sleep(WORKER_CHECK_SECONDS)
            if not await database_sync_to_async(stream_worker_alive)(worker_id=self.worker):
                await self._fail(errors.BackendError("The stream worker stopped; reconnect to continue."))
                return

    async def _expect_closed(self) -> None:
        """The worker answers ``session.close`` with its last deltas and ``stream.closed``."""
        try:
            await asyncio.wait_for(self.worker_closed.wait(), timeout=settings.SCAIECHO_STREAM_FLUSH_TIMEOUT_SECONDS)
        except TimeoutError:
            await self._fail(errors.BackendTimeout("The stream worker did not finish in time."))


class RelaySession(LiveSession):
    """Backend B: one relay request per ``chunk_seconds`` of audio, each chunk one final delta."""

    backend = "B"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk = round(self.options.chunk_seconds * SAMPLE_RATE)
        self.pending = np.zeros(0, dtype=np.float32)  # less than one chunk, not yet queued
        self.pending_start = 0  # stream sample index of ``pending[0]``
        self.chunks: asyncio.Queue[tuple[np.ndarray, int]] = asyncio.Queue(maxsize=RELAY_QUEUE_CHUNKS)
        # A diarized stream asks a stream worker who spoke each chunk.
        self.speaker_worker: str | None = None
        self.speaker_reply_channel: str | None = None

    @classmethod
    def available(cls) -> bool:
        return relay_configured()

    async def open(self) -> None:
        if self.options.diarize:
            self.speaker_worker = await database_sync_to_async(stream_worker_pick)()
        self._spawn(self._relay_chunks())

    async def audio(self, samples: np.ndarray) -> bool:
        if self.stopped.is_set():
            return False
        self._append(samples)
        while self.pending.size >= self.chunk and not self.stopped.is_set():
            await self._queue(self.pending[: self.chunk], self.pending_start)
            self.pending = self.pending[self.chunk :]
            self.pending_start += self.chunk
        return True

    async def finalize(self) -> None:
        await self._flush()
        await self._flushed()

    async def close(self, tail: np.ndarray) -> None:
        # The tail joins the last chunk rather than making a tiny chunk of its own.
        self._append(tail)
        await self._flush()
        await self._finished()

    async def _release(self) -> None:
        # Queued chunks are dropped: an ended stream makes no more relay calls.
        while True:
            try:
                self.chunks.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.chunks.task_done()
        if self.speaker_worker is not None:
            with contextlib.suppress(Exception):  # the worker forgets this stream's voices
                await self.layer.send(self.speaker_worker, {"type": "speaker.close", "session_id": self.grant.session_id})

    def _append(self, samples: np.ndarray) -> None:
        if samples.size:
            self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])

    async def _queue(self, samples: np.ndarray, start: int) -> None:
        await self._unless_stopped(self.chunks.put((samples, start)))

    async def _flush(self) -> None:
        """Queue what is pending and wait until every queued chunk's delta is out."""
        if self.pending.size:
            await self._queue(self.pending, self.pending_start)
            self.pending_start += self.pending.size
            self.pending = np.zeros(0, dtype=np.float32)
        await self._unless_stopped(self.chunks.join())

    async def _relay_chunks(self) -> None:
        from scaiecho_site.engines import relay_client

        client = relay_client()
        while not self.stopped.is_set():
            samples, start = await self.chunks.get()
            try:
                if self.stopped.is_set():
                    continue
                result = await sync_to_async(client.transcribe, thread_sensitive=False)(
                    samples, options=TranscribeOptions(language=self.options.language, prompt=self.options.prompt)
                )
                text = result.text.strip()
                if not text:
                    continue
                delta = LiveDelta(
                    text=text,
                    is_final=True,
                    start=round(start / SAMPLE_RATE, 3),
                    end=round((start + samples.size) / SAMPLE_RATE, 3),
                    confidence=None,
                    diarized=self.options.diarize,
                )
                if self.speaker_worker is not None and not self.stopped.is_set():
                    delta = replace(delta, **await self._attribute(samples))
                await self._deliver(delta)
            except errors.ApplicationError as exc:
                await self._fail(exc)
            except Exception:
                logger.exception("relay chunk failed in stream %s", self.grant.session_id)
                await self._fail(errors.BackendError("The relay failed."))
            finally:
                self.chunks.task_done()

    async def _attribute(self, samples: np.ndarray) -> dict[str, Any]:
        """Ask the stream worker whose voice a relayed chunk is (no model runs in this process).

        The answer comes on a channel of its own, read here: a reply through the consumer would
        wait behind the very ``close`` that is waiting for this chunk.
        """
        if self.speaker_reply_channel is None:
            self.speaker_reply_channel = await self.layer.new_channel()
        request_id = uuid.uuid4().hex
        await self.layer.send(
            self.speaker_worker,
            {
                "type": "speaker.attribute",
                "session_id": self.grant.session_id,
                "reply_to": self.speaker_reply_channel,
                "request_id": request_id,
                "tenant_id": str(self.grant.tenant_id),
                "speaker_ids": self.options.speaker_ids,
                "pcm": float_to_pcm(samples),
            },
        )
        deadline = time.monotonic() + settings.SCAIECHO_STREAM_FLUSH_TIMEOUT_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.BackendTimeout("The stream worker did not say who spoke in time.")
            try:
                answer = await asyncio.wait_for(self.layer.receive(self.speaker_reply_channel), timeout=remaining)
            except TimeoutError as exc:
                raise errors.BackendTimeout("The stream worker did not say who spoke in time.") from exc
            if answer.get("request_id") == request_id:
                break
        if answer.get("error"):
            raise errors.BackendError(answer["error"])
        return {"speaker_id": answer.get("speaker_id"), "speaker_label": answer.get("speaker_label")}


_SESSIONS: dict[str, type[LiveSession]] = {kind.backend: kind for kind in (WorkerSession, RelaySession)}


async def sessions_prepare() -> None:
    """Make every backend reachable (before ``stream_open`` resolves which one a stream gets)."""
    for kind in _SESSIONS.values():
        await kind.prepare()


def session_backend_available(backend: str) -> bool:
    """Whether ``backend`` can take a stream now; ``stream_open`` resolves the policy with it."""
    kind = _SESSIONS.get(backend)
    return kind is not None and kind.available()


def session_for(
    *, grant: StreamGrant, options: SessionOptions, listener: SessionListener, layer: BaseChannelLayer
) -> LiveSession:
    """The session for the grant's backend (not opened yet)."""
    kind = _SESSIONS.get(grant.backend)
    if kind is None:
        raise errors.BackendUnavailable(f"Backend {grant.backend} cannot stream.")
    return kind(grant=grant, options=options, listener=listener, layer=layer)
