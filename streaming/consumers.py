"""``WS /v1/modules/scaiecho/stream/transcribe``: the live transcription protocol (contract §4).

Transport only: frames in, frames out, close codes, and the idle and maximum-length timers.
Authentication, authorization, budget and policy are services called through
``database_sync_to_async``; the transcription itself is a :class:`~streaming.sessions.LiveSession`
(worker- or relay-backed) that reports deltas, errors and its end back to the consumer. Audio
decoding runs in a thread; nothing blocks the event loop. Every non-1000 close is preceded by an
``error`` frame with the matching code.

Bounds (issue 11; README "Stream limits"). ``receive`` only queues a frame: a task of the
consumer's own handles the queue in order, so the server's own (unbounded) queue of incoming
frames is always drained, and this one is bounded. When more than ``SCAIECHO_STREAM_MAX_PENDING_FRAMES``
frames or ``SCAIECHO_STREAM_MAX_PENDING_BYTES`` bytes wait unhandled (the backend is behind and
the session waits for it: backpressure), the stream is closed 4429 rather than read on: waiting
for the client would only move the backlog into the server's queue. Decoded audio faster than
``SCAIECHO_STREAM_MAX_SPEED`` x real time after a burst of ``SCAIECHO_STREAM_BURST_SECONDS`` is
refused (4429). The budget is metered as audio arrives: the session stops at the audio the
tenant's budgets leave (counting its other live streams), makes finals of what it heard, and
closes 4429 with ``BUDGET_EXCEEDED``; only that audio is billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import numpy as np
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from scaiecho_site import errors
from scaiecho_site.envelope import new_request_id
from speech.audio import SAMPLE_RATE
from speech.decoders import make_decoder
from streaming.limits import AudioPace
from streaming.services import (
    StreamGrant,
    stream_authenticate,
    stream_finish,
    stream_keep_alive,
    stream_open,
    stream_still_allowed,
)
from streaming.sessions import (
    LiveDelta,
    LiveSession,
    SessionOptions,
    session_backend_available,
    session_for,
    sessions_prepare,
)
from tenants.context import ActorContext
from tenants.services import BACKEND_PREFERENCES

logger = logging.getLogger("scaiecho.streaming")


CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 4400
CLOSE_AUTH = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TIMEOUT = 4408
CLOSE_TOO_LARGE = 4413
CLOSE_LIMIT = 4429
CLOSE_BACKEND = 4502

_CLOSE_CODES: dict[str, int] = {
    errors.AuthTokenMissing.code: CLOSE_AUTH,
    errors.AuthTokenInvalid.code: CLOSE_AUTH,
    errors.PermissionDenied.code: CLOSE_FORBIDDEN,
    errors.ModuleNotEnabled.code: CLOSE_FORBIDDEN,
    errors.ValidationError.code: CLOSE_PROTOCOL,
    errors.UnsupportedMedia.code: CLOSE_PROTOCOL,
    errors.PayloadTooLarge.code: CLOSE_TOO_LARGE,
    errors.BudgetExceeded.code: CLOSE_LIMIT,
    errors.RateLimited.code: CLOSE_LIMIT,
}


class StreamTimeout(errors.ApplicationError):
    code = "STREAM_TIMEOUT"
    http_status = 408
    default_message = "The stream was idle for too long."


def close_code_for(error: errors.ApplicationError) -> int:
    if isinstance(error, StreamTimeout):
        return CLOSE_TIMEOUT
    return _CLOSE_CODES.get(error.code, CLOSE_BACKEND)


def protocol_error(message: str, field: str = "frame") -> errors.ValidationError:
    return errors.ValidationError(message, details=[{"field": field, "message": message}])


def parse_open(frame: dict[str, Any]) -> dict[str, Any]:
    """Validate the ``open`` frame; the error names the first bad field."""
    options = {
        "language_hint": frame.get("language_hint"),
        "media_type": frame.get("media_type", "audio/wav"),
        "backend_preference": frame.get("backend_preference", "any"),
        "chunk_seconds": frame.get("chunk_seconds", 5.0),
        "sample_rate": frame.get("sample_rate", SAMPLE_RATE),
        "diarize": frame.get("diarize", False),
        "speaker_ids": frame.get("speaker_ids", []),
    }
    language = options["language_hint"]
    if language is not None and not (isinstance(language, str) and len(language) == 2 and language.isalpha() and language.islower()):
        raise protocol_error("language_hint must be a two-letter ISO 639-1 code such as 'en'.", "language_hint")
    if not isinstance(options["media_type"], str):
        raise protocol_error("media_type must be a string such as 'audio/wav'.", "media_type")
    _check_declared_rate(options["media_type"])
    if options["backend_preference"] not in BACKEND_PREFERENCES:
        raise protocol_error(f"backend_preference must be one of {', '.join(BACKEND_PREFERENCES)}.", "backend_preference")
    chunk = options["chunk_seconds"]
    if isinstance(chunk, bool) or not isinstance(chunk, (int, float)) or not 0.5 <= chunk <= 30:
        raise protocol_error("chunk_seconds must be a number from 0.5 to 30.", "chunk_seconds")
    rate = options["sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 192_000:
        raise protocol_error("sample_rate must be an integer from 8000 to 192000.", "sample_rate")
    if not isinstance(options["diarize"], bool):
        raise protocol_error("diarize must be true or false.", "diarize")
    ids = options["speaker_ids"]
    if not isinstance(ids, list) or not all(isinstance(value, str) for value in ids) or len(ids) > 100:
        raise protocol_error("speaker_ids must be a list of up to 100 speaker id strings.", "speaker_ids")
    if ids and not options["diarize"]:
        raise protocol_error("speaker_ids only applies with diarize: true.", "speaker_ids")
    unknown = set(frame) - {"type", *options}
    if unknown:
        raise protocol_error(f"Unknown field {sorted(unknown)[0]!r} in the open frame.", sorted(unknown)[0])
    return options


def _check_declared_rate(media_type: str) -> None:
    """A ``rate=`` parameter (``audio/L16;rate=8000``) obeys the bounds of ``sample_rate``: a low
    declared rate would stretch every byte into more audio than was sent."""
    for parameter in media_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "rate":
            value = value.strip()
            # ASCII digits only: ``str.isdigit`` also accepts "²", which ``int`` then refuses.
            if not (value.isascii() and value.isdigit()) or not 8000 <= int(value) <= 192_000:
                raise protocol_error("media_type's rate must be an integer from 8000 to 192000.", "media_type")


def _text_bytes(text: str | None) -> int:
    """A text frame's size in bytes, as it came over the wire (UTF-8), not in characters."""
    return len((text or "").encode("utf-8", "surrogatepass"))


def delta_frame(delta: LiveDelta) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "delta",
        "text": delta.text,
        "is_final": delta.is_final,
        "start": delta.start,
        "end": delta.end,
        "confidence": delta.confidence,
    }
    if delta.diarized:
        frame["speaker_id"] = delta.speaker_id
        frame["speaker_label"] = delta.speaker_label
    return frame


class TranscribeStreamConsumer(AsyncWebsocketConsumer):
    """One live transcription session per connection."""

    async def connect(self) -> None:
        # Accept first, so that a refused client sees an error frame and 4401, not a failed handshake.
        await self.accept(self.subprotocol())
        self.closing = False
        self.client_closed = False  # the client sent ``close``
        self.settled = False
        self.grant: StreamGrant | None = None
        self.session: LiveSession | None = None
        self.request_id = new_request_id()
        self.audio_bytes = 0
        self.samples_in = 0  # decoded samples received: what the stream is metered for
        self.started = time.monotonic()
        self.last_activity = time.monotonic()
        self.last_recheck = time.monotonic()
        self.timers: asyncio.Task[None] | None = None
        # Frames received and not handled yet (see the module docstring), and their bytes.
        # Each with its arrival time: the pace is measured as frames arrive, not as they are handled.
        self.pending: asyncio.Queue[tuple[str | None, bytes | None, float]] = asyncio.Queue()
        self.pending_bytes = 0
        self.handler: asyncio.Task[None] | None = None
        self.pace: AudioPace | None = None
        # The most samples the budget allows this session (``None``: no limit), and the error the
        # session ends with once its last finals are out (the budget ran out).
        self.allowance: int | None = None
        self.ending: errors.ApplicationError | None = None
        try:
            self.key = await database_sync_to_async(stream_authenticate)(token=self.scope.get("scaiecho_token"))
        except errors.ApplicationError as exc:
            await self.fail(exc)
            return
        self.timers = asyncio.create_task(self.watch_timeouts())
        self.handler = asyncio.create_task(self.handle_frames())

    def subprotocol(self) -> str | None:
        """The WebSocket subprotocol to accept (the native protocol names none)."""
        return None

    def actor(self) -> ActorContext:
        client = self.scope.get("client") or (None, None)
        headers = dict(self.scope.get("headers") or [])
        return ActorContext(
            user=self.key.membership.user,
            tenant=self.key.membership.tenant,
            api_key=self.key,
            ip=client[0],
            user_agent=headers.get(b"user-agent", b"").decode(errors="replace")[:512],
            request_id=self.request_id,
        )

    # --- frames from the client ----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Queue the frame for :meth:`handle_frames`; refuse it at once when it or the queue is too big."""
        if self.closing or self.ending is not None or self.client_closed:
            return
        arrived = self.last_activity = time.monotonic()
        size = len(bytes_data) if bytes_data is not None else _text_bytes(text_data)
        limit = settings.SCAIECHO_STREAM_MAX_FRAME_BYTES
        if size > limit:
            kind = "Audio" if bytes_data is not None else "Control"
            await self.fail(errors.PayloadTooLarge(f"{kind} frames may be at most {limit} bytes."))
            return
        if (
            self.pending.qsize() >= settings.SCAIECHO_STREAM_MAX_PENDING_FRAMES
            or self.pending_bytes + size > settings.SCAIECHO_STREAM_MAX_PENDING_BYTES
        ):
            await self.fail(
                errors.RateLimited(
                    f"The stream sends faster than it is transcribed: {self.pending.qsize()} frames"
                    f" ({self.pending_bytes} bytes) wait unread. Send audio at real-time pace.",
                    retry_after=1,
                )
            )
            return
        self.pending_bytes += size
        self.pending.put_nowait((text_data, bytes_data, arrived))

    async def handle_frames(self) -> None:
        """Handle the queued frames in order, until the stream ends."""
        while not self.closing:
            text_data, bytes_data, arrived = await self.pending.get()
            self.pending_bytes -= len(bytes_data) if bytes_data is not None else _text_bytes(text_data)
            if self.closing or self.ending is not None or self.client_closed:
                continue  # frames after the end, or after the client's own close, are not read
            try:
                if bytes_data is not None:
                    await self.on_audio(bytes_data, arrived=arrived)
                else:
                    await self.on_control(text_data or "", arrived=arrived)
            except errors.ApplicationError as exc:
                await self.fail(exc)
            except Exception:  # a bug ends the session visibly, never silently
                logger.exception("stream %s failed", self.grant.session_id if self.grant else "-")
                await self.fail(errors.BackendError("The stream failed."))

    async def on_control(self, text: str, *, arrived: float) -> None:
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError) as exc:
            # Besides malformed JSON (``JSONDecodeError``, a ``ValueError``): an integer of more
            # than 4300 digits is a ``ValueError`` and nesting deeper than the interpreter's
            # recursion limit a ``RecursionError``; all three are the client's frame.
            raise protocol_error("Control frames must be JSON objects.") from exc
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise protocol_error("Control frames must be JSON objects with a 'type'.", "type")
        kind = frame["type"]
        if kind == "open":
            await self.on_open(frame)
        elif self.session is None:
            raise protocol_error("The first frame must be 'open'.", "type")
        elif kind == "keepalive":
            return
        elif kind == "finalize":
            await self.session.finalize()
        elif kind == "close":
            # The stream's audio has ended: what the client sends while its last deltas are made
            # is not read (the decoder is flushed and cannot take more).
            self.client_closed = True
            tail = await sync_to_async(self.decoder.flush, thread_sensitive=False)()
            tail = self.within_allowance(tail)
            self.samples_in += tail.size
            await self.session.close(tail)
        else:
            raise protocol_error(f"Unknown frame type {kind!r}.", "type")

    async def on_open(self, frame: dict[str, Any]) -> None:
        if self.grant is not None:
            raise protocol_error("'open' may be sent only once.", "type")
        options = parse_open(frame)
        self.decoder = make_decoder(media_type=options["media_type"], sample_rate=options["sample_rate"])
        await self.open_grant(
            backend_preference=options["backend_preference"], diarize=options["diarize"], speaker_ids=options["speaker_ids"]
        )
        opened = await self.open_session(
            SessionOptions(
                language=options["language_hint"],
                chunk_seconds=float(options["chunk_seconds"]),
                diarize=options["diarize"],
                speaker_ids=options["speaker_ids"],
            )
        )
        if not opened:
            return
        await self.send_json(
            {
                "type": "ready",
                "backend_used": self.grant.backend,
                "session_id": self.grant.session_id,
                "expires_at": self.grant.expires_at.isoformat().replace("+00:00", "Z"),
            }
        )

    async def open_grant(self, *, backend_preference: str, diarize: bool, speaker_ids: list[str]) -> None:
        """Authorize the stream, take its slots and resolve its backend (``stream_open``); set
        its budget allowance and pace."""
        await sessions_prepare()
        self.grant = await database_sync_to_async(stream_open)(
            key=self.key,
            ctx=self.actor(),
            backend_preference=backend_preference,
            diarize=diarize,
            speaker_ids=speaker_ids,
            is_available=session_backend_available,
        )
        self.allowance = self.samples_allowed(self.grant.allowance_ms)
        self.pace = AudioPace(speed=settings.SCAIECHO_STREAM_MAX_SPEED, burst=settings.SCAIECHO_STREAM_BURST_SECONDS)

    async def open_session(self, options: SessionOptions) -> bool:
        """Open the granted stream's backend session; ``False`` when the stream ended meanwhile."""
        self.session = session_for(grant=self.grant, options=options, listener=self, layer=self.channel_layer)
        await self.session.open()
        if self.closing:
            # The stream ended while it opened (an oversize frame, the idle timer): its error frame
            # is out, so nothing follows it, and the backend's session is freed at once.
            await self.session.abort()
            await self.settle("aborted")
            return False
        return True

    async def on_audio(self, data: bytes, *, arrived: float) -> None:
        if self.session is None:
            raise protocol_error("Audio arrived before the 'open' frame.", "type")
        if not data:
            raise protocol_error("Empty audio frames are not allowed.", "audio")
        self.audio_bytes += len(data)
        samples = await sync_to_async(self.decoder.feed, thread_sensitive=False)(data)
        await self.take_samples(samples, arrived=arrived)

    async def take_samples(self, samples: np.ndarray, *, arrived: float) -> None:
        """Decoded audio in: paced, metered against the budget, and handed to the session."""
        speed = settings.SCAIECHO_STREAM_MAX_SPEED
        if self.pace is not None and not self.pace.take(samples.size / SAMPLE_RATE, now=arrived):
            raise errors.RateLimited(
                f"Audio arrives faster than {speed:g}x real time"
                f" (after a burst of {settings.SCAIECHO_STREAM_BURST_SECONDS:g} s). Send it at real-time pace.",
                retry_after=1,
            )
        fed = self.within_allowance(samples)
        if await self.session.audio(fed):  # audio the session never passed on is not billed
            self.samples_in += fed.size
        if time.monotonic() - self.last_recheck >= settings.SCAIECHO_STREAM_RECHECK_SECONDS:
            self.last_recheck = time.monotonic()
            try:
                allowed_ms = await database_sync_to_async(stream_still_allowed)(
                    grant=self.grant, audio_ms=round(self.samples_in / SAMPLE_RATE * 1000)
                )
            except errors.BudgetExceeded as exc:
                await self.end_with(exc)
                return
            self.allowance = self.samples_allowed(allowed_ms)
        if fed.size < samples.size or (self.allowance is not None and self.samples_in >= self.allowance):
            heard = self.samples_in / SAMPLE_RATE
            await self.end_with(
                errors.BudgetExceeded(f"The tenant's budget is used up; this stream was transcribed up to {heard:.2f} s.")
            )

    @staticmethod
    def samples_allowed(allowance_ms: int | None) -> int | None:
        return None if allowance_ms is None else allowance_ms * SAMPLE_RATE // 1000

    def within_allowance(self, samples: np.ndarray) -> np.ndarray:
        """The part of ``samples`` the budget still allows this session (metered and transcribed)."""
        if self.allowance is None:
            return samples
        return samples[: max(0, self.allowance - self.samples_in)]

    async def end_with(self, error: errors.ApplicationError) -> None:
        """Stop reading, make finals of the audio heard so far, then send ``error`` and close
        (from :meth:`on_closed`, once the session has delivered its last delta)."""
        if self.ending is not None or self.closing:
            return
        self.ending = error
        await self.session.close(np.zeros(0, dtype=np.float32))

    # --- what the session reports (streaming.sessions.SessionListener) ------------------------

    async def on_delta(self, delta: LiveDelta) -> None:
        if not self.closing:
            await self.send_json(delta_frame(delta))

    async def on_error(self, error: errors.ApplicationError) -> None:
        await self.fail(error)

    async def on_flushed(self) -> None:
        """Every final of a ``finalize`` is out (the native protocol says nothing of it)."""

    async def on_closed(self) -> None:
        if self.closing:
            return
        if self.ending is not None:  # the finals of what was heard are out: now the error
            await self.fail(self.ending)
            return
        self.closing = True
        # Meter and audit first: once a client reads ``closed``, its usage is on record.
        await self.settle("closed")
        duration_ms = round(self.samples_in / SAMPLE_RATE * 1000)
        await self.send_json({"type": "closed", "audio_bytes": self.audio_bytes, "audio_duration_ms": duration_ms})
        await self.close(code=CLOSE_NORMAL)

    # --- timers and endings -----------------------------------------------------------------

    async def watch_timeouts(self) -> None:
        idle = settings.SCAIECHO_STREAM_IDLE_TIMEOUT_SECONDS
        kept_alive = time.monotonic()
        while not self.closing:
            await asyncio.sleep(min(0.25, idle / 4))
            if self.grant is not None and time.monotonic() - kept_alive >= settings.SCAIECHO_STREAM_SLOT_TTL_SECONDS / 3:
                kept_alive = time.monotonic()
                try:  # the session's concurrent-stream slots outlive it by at most one TTL
                    await sync_to_async(stream_keep_alive, thread_sensitive=False)(
                        grant=self.grant, audio_ms=round(self.samples_in / SAMPLE_RATE * 1000)
                    )
                except Exception:  # a cache hiccup must not end the stream
                    logger.exception("stream %s could not refresh its slots", self.grant.session_id)
            if time.monotonic() - self.last_activity > idle:
                await self.fail(StreamTimeout(f"No audio or keepalive for {idle:g} s."))
                return
            if self.grant is not None and time.monotonic() - self.started > settings.SCAIECHO_STREAM_MAX_SESSION_SECONDS:
                await self.fail(StreamTimeout("The session reached its maximum length."))
                return

    async def fail(self, error: errors.ApplicationError) -> None:
        if self.closing:
            return
        self.closing = True
        if self.session is not None:  # no more backend work, and no delta after the error frame
            await self.session.abort()
        await self.send_json(self.error_frame(error))
        await self.settle(error.code)
        await self.close(code=close_code_for(error))

    def error_frame(self, error: errors.ApplicationError) -> dict[str, Any]:
        """The frame that tells the client why the stream ends."""
        frame: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message}
        if error.retry_after is not None:
            frame["retry_after"] = error.retry_after
        field = (error.details or [{}])[0].get("field")
        if field:  # a 4400 names the offending field
            frame["field"] = field
            if field not in error.message:
                frame["message"] = f"{field}: {error.message}"
        return frame

    async def settle(self, outcome: str) -> None:
        if self.grant is not None and not self.settled:
            self.settled = True
            await database_sync_to_async(stream_finish)(
                grant=self.grant,
                ctx=self.actor(),
                audio_duration_ms=round(self.samples_in / SAMPLE_RATE * 1000),
                latency_ms=round((time.monotonic() - self.started) * 1000),
                outcome=outcome,
            )

    async def disconnect(self, code: int) -> None:
        await self.stop("disconnected")

    async def stop(self, outcome: str) -> None:
        self.closing = True
        if self.session is not None:
            await self.session.abort()
        for task in (self.timers, self.handler):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        await self.settle(outcome)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A client that leaves while a handler waits for the backend (a full relay queue) gets
            # this consumer cancelled by the server before ``disconnect`` runs: its session must
            # still stop working, and the audio it sent must still be metered.
            if hasattr(self, "closing"):
                with contextlib.suppress(Exception):
                    await self.stop("disconnected")

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload))
