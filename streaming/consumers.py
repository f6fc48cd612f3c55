"""``WS /v1/modules/scaiecho/stream/transcribe``: the live transcription protocol (contract §4).

Transport only. Authentication, authorization, budget and policy are services called through
``database_sync_to_async``; decoding and relay calls run in threads; nothing blocks the event
loop. Every non-1000 close is preceded by an ``error`` frame with the matching code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from scaiecho_site import errors
from scaiecho_site.envelope import new_request_id
from speech.audio import SAMPLE_RATE, float_to_pcm
from speech.decoders import make_decoder
from speech.engines.base import TranscribeOptions
from streaming.services import (
    StreamGrant,
    stream_authenticate,
    stream_finish,
    stream_open,
    stream_still_allowed,
    stream_worker_alive,
    stream_worker_pick,
)
from streaming.worker import ensure_embedded_worker
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


class TranscribeStreamConsumer(AsyncWebsocketConsumer):
    """One live transcription session per connection."""

    async def connect(self) -> None:
        # Accept first, so that a refused client sees an error frame and 4401, not a failed handshake.
        await self.accept()
        self.closing = False
        self.grant: StreamGrant | None = None
        self.request_id = new_request_id()
        self.audio_bytes = 0
        self.samples_in = 0
        self.pending = np.zeros(0, dtype=np.float32)
        self.pending_start = 0  # stream sample index of ``pending[0]``
        self.last_activity = time.monotonic()
        self.last_recheck = time.monotonic()
        self.chunks: asyncio.Queue[tuple[np.ndarray, int] | None] = asyncio.Queue(maxsize=4)
        self.tasks: list[asyncio.Task[None]] = []
        self.started = time.monotonic()
        self.worker_channel: str | None = None
        # A diarized Backend B stream asks a stream worker who spoke each relayed chunk.
        self.speaker_channel: str | None = None
        self.speaker_reply_channel: str | None = None
        self.last_worker_check = time.monotonic()
        self.worker_closed = asyncio.Event()
        try:
            self.key = await database_sync_to_async(stream_authenticate)(token=self.scope.get("scaiecho_token"))
        except errors.ApplicationError as exc:
            await self.fail(exc)
            return
        self.tasks.append(asyncio.create_task(self.watch_timeouts()))

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
        if self.closing:
            return
        self.last_activity = time.monotonic()
        try:
            if bytes_data is not None:
                await self.on_audio(bytes_data)
            else:
                await self.on_control(text_data or "")
        except errors.ApplicationError as exc:
            await self.fail(exc)
        except Exception:  # a bug ends the session visibly, never silently
            logger.exception("stream %s failed", self.grant.session_id if self.grant else "-")
            await self.fail(errors.BackendError("The stream failed."))

    async def on_control(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except json.JSONDecodeError as exc:
            raise protocol_error("Control frames must be JSON objects.") from exc
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise protocol_error("Control frames must be JSON objects with a 'type'.", "type")
        kind = frame["type"]
        if kind == "open":
            await self.on_open(frame)
        elif self.grant is None:
            raise protocol_error("The first frame must be 'open'.", "type")
        elif kind == "keepalive":
            return
        elif kind == "finalize":
            await self.flush(final=False)
        elif kind == "close":
            await self.finish()
        else:
            raise protocol_error(f"Unknown frame type {kind!r}.", "type")

    async def on_open(self, frame: dict[str, Any]) -> None:
        if self.grant is not None:
            raise protocol_error("'open' may be sent only once.", "type")
        options = parse_open(frame)
        self.decoder = make_decoder(media_type=options["media_type"], sample_rate=options["sample_rate"])
        self.options = options
        await ensure_embedded_worker()
        self.grant = await database_sync_to_async(stream_open)(
            key=self.key,
            ctx=self.actor(),
            backend_preference=options["backend_preference"],
            diarize=options["diarize"],
            speaker_ids=options["speaker_ids"],
        )
        if self.grant.backend == "A":
            self.worker_channel = await database_sync_to_async(stream_worker_pick)()
            await self.to_worker(
                "session.open",
                reply_to=self.channel_name,
                language=options["language_hint"],
                chunk_seconds=options["chunk_seconds"],
                diarize=options["diarize"],
                tenant_id=str(self.grant.tenant_id),
                speaker_ids=options["speaker_ids"],
            )
        else:
            if options["diarize"]:
                self.speaker_channel = await database_sync_to_async(stream_worker_pick)()
            self.tasks.append(asyncio.create_task(self.relay_chunks()))
        await self.send_json(
            {
                "type": "ready",
                "backend_used": self.grant.backend,
                "session_id": self.grant.session_id,
                "expires_at": self.grant.expires_at.isoformat().replace("+00:00", "Z"),
            }
        )

    async def on_audio(self, data: bytes) -> None:
        if self.grant is None:
            raise protocol_error("Audio arrived before the 'open' frame.", "type")
        if not data:
            raise protocol_error("Empty audio frames are not allowed.", "audio")
        if len(data) > settings.SCAIECHO_STREAM_MAX_FRAME_BYTES:
            raise errors.PayloadTooLarge(f"Audio frames may be at most {settings.SCAIECHO_STREAM_MAX_FRAME_BYTES} bytes.")
        self.audio_bytes += len(data)
        samples = await sync_to_async(self.decoder.feed, thread_sensitive=False)(data)
        if self.worker_channel is not None:
            await self.to_worker_audio(samples)
        else:
            self.append(samples)
        if time.monotonic() - self.last_recheck >= settings.SCAIECHO_STREAM_RECHECK_SECONDS:
            self.last_recheck = time.monotonic()
            await database_sync_to_async(stream_still_allowed)(grant=self.grant)
        chunk = round(self.options["chunk_seconds"] * SAMPLE_RATE)
        while len(self.pending) >= chunk:
            await self.chunks.put((self.pending[:chunk], self.pending_start))
            self.pending = self.pending[chunk:]
            self.pending_start += chunk

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
            self.samples_in += samples.size

    async def to_worker(self, kind: str, **fields: Any) -> None:
        await self.channel_layer.send(self.worker_channel, {"type": kind, "session_id": self.grant.session_id, **fields})

    async def to_worker_audio(self, samples: np.ndarray) -> None:
        if samples.size:
            self.samples_in += samples.size
            await self.to_worker("session.audio", pcm=float_to_pcm(samples))

    async def expect_close_from_worker(self) -> None:
        """The worker answers ``session.close`` with its last deltas and ``stream.closed``.

        Waited for in a task of its own: the consumer handles one message at a time, so waiting
        inside the handler of the client's ``close`` would keep the worker's answer from arriving.
        """
        try:
            await asyncio.wait_for(self.worker_closed.wait(), timeout=settings.SCAIECHO_STREAM_FLUSH_TIMEOUT_SECONDS)
        except TimeoutError:
            await self.fail(errors.BackendTimeout("The stream worker did not finish in time."))

    async def flush(self, *, final: bool) -> None:
        """Send all audio so far for transcription; its deltas follow as they are ready."""
        if self.worker_channel is not None:
            if final:
                await self.to_worker_audio(await sync_to_async(self.decoder.flush, thread_sensitive=False)())
                await self.to_worker("session.close")
                self.tasks.append(asyncio.create_task(self.expect_close_from_worker()))
            else:
                await self.to_worker("session.finalize")
            return
        if final:
            self.append(await sync_to_async(self.decoder.flush, thread_sensitive=False)())
        if self.pending.size:
            await self.chunks.put((self.pending, self.pending_start))
            self.pending_start += self.pending.size
            self.pending = np.zeros(0, dtype=np.float32)
        await self.chunks.join()

    async def finish(self) -> None:
        await self.flush(final=True)
        if self.worker_channel is None:  # Backend A completes when the worker's stream.closed arrives
            await self.complete()

    async def complete(self) -> None:
        if self.closing:
            return
        self.closing = True
        # Meter and audit first: once a client reads ``closed``, its usage is on record.
        await self.settle("closed")
        duration_ms = round(self.samples_in / SAMPLE_RATE * 1000)
        await self.send_json({"type": "closed", "audio_bytes": self.audio_bytes, "audio_duration_ms": duration_ms})
        await self.close(code=CLOSE_NORMAL)

    # --- Backend B: one relay request per chunk -----------------------------------------------

    async def relay_chunks(self) -> None:
        from scaiecho_site.engines import relay_client

        client = relay_client()
        while True:
            item = await self.chunks.get()
            try:
                if item is None or self.closing:
                    continue
                samples, start = item
                result = await sync_to_async(client.transcribe, thread_sensitive=False)(
                    samples, options=TranscribeOptions(language=self.options["language_hint"])
                )
                text = result.text.strip()
                if text and not self.closing:
                    delta = {
                        "type": "delta",
                        "text": text,
                        "is_final": True,
                        "start": round(start / SAMPLE_RATE, 3),
                        "end": round((start + samples.size) / SAMPLE_RATE, 3),
                        "confidence": None,
                    }
                    if self.speaker_channel is not None:
                        delta.update(await self.attribute_chunk(samples))
                    if not self.closing:
                        await self.send_json(delta)
            except errors.ApplicationError as exc:
                await self.fail(exc)
            except Exception:
                logger.exception("relay chunk failed in stream %s", self.grant.session_id if self.grant else "-")
                await self.fail(errors.BackendError("The relay failed."))
            finally:
                self.chunks.task_done()

    async def attribute_chunk(self, samples: np.ndarray) -> dict[str, Any]:
        """Ask the stream worker whose voice a relayed chunk is (no model runs in this process).

        The answer comes on a channel of its own, read here: the consumer's own channel would
        deliver it through the handler loop, which may be busy waiting for this very chunk (a
        ``close`` flushes the chunks before it returns).
        """
        if self.speaker_reply_channel is None:
            # The default prefix: channels_redis reads every process-specific channel through one
            # real channel per prefix, so another prefix would have no reader while ours is busy.
            self.speaker_reply_channel = await self.channel_layer.new_channel()
        request_id = uuid.uuid4().hex
        await self.channel_layer.send(
            self.speaker_channel,
            {
                "type": "speaker.attribute",
                "session_id": self.grant.session_id,
                "reply_to": self.speaker_reply_channel,
                "request_id": request_id,
                "tenant_id": str(self.grant.tenant_id),
                "speaker_ids": self.options["speaker_ids"],
                "pcm": float_to_pcm(samples),
            },
        )
        deadline = time.monotonic() + settings.SCAIECHO_STREAM_FLUSH_TIMEOUT_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.BackendTimeout("The stream worker did not say who spoke in time.")
            try:
                answer = await asyncio.wait_for(self.channel_layer.receive(self.speaker_reply_channel), timeout=remaining)
            except TimeoutError as exc:
                raise errors.BackendTimeout("The stream worker did not say who spoke in time.") from exc
            if answer.get("request_id") == request_id:
                break
        if answer.get("error"):
            raise errors.BackendError(answer["error"])
        return {"speaker_id": answer.get("speaker_id"), "speaker_label": answer.get("speaker_label")}

    # --- Backend A: messages from the stream worker -------------------------------------------

    async def stream_delta(self, message: dict[str, Any]) -> None:
        if self.closing:
            return
        delta = {key: message[key] for key in ("text", "is_final", "start", "end", "confidence")}
        if self.options["diarize"]:
            delta["speaker_id"] = message.get("speaker_id")
            delta["speaker_label"] = message.get("speaker_label")
        await self.send_json({"type": "delta", **delta})

    async def stream_flushed(self, message: dict[str, Any]) -> None:
        """The worker has sent every delta of a ``finalize``; nothing more to do."""

    async def stream_closed(self, message: dict[str, Any]) -> None:
        self.worker_closed.set()
        await self.complete()

    async def stream_error(self, message: dict[str, Any]) -> None:
        await self.fail(errors.BackendError(message.get("message") or "The stream worker failed."))

    # --- timers and endings -----------------------------------------------------------------

    async def watch_timeouts(self) -> None:
        idle = settings.SCAIECHO_STREAM_IDLE_TIMEOUT_SECONDS
        while not self.closing:
            await asyncio.sleep(min(0.25, idle / 4))
            if time.monotonic() - self.last_activity > idle:
                await self.fail(StreamTimeout(f"No audio or keepalive for {idle:g} s."))
                return
            if self.grant is not None and time.monotonic() - self.started > settings.SCAIECHO_STREAM_MAX_SESSION_SECONDS:
                await self.fail(StreamTimeout("The session reached its maximum length."))
                return
            if self.worker_channel is not None and time.monotonic() - self.last_worker_check >= 0.5:
                self.last_worker_check = time.monotonic()
                if not await database_sync_to_async(stream_worker_alive)(worker_id=self.worker_channel):
                    await self.fail(errors.BackendError("The stream worker stopped; reconnect to continue."))
                    return

    async def fail(self, error: errors.ApplicationError) -> None:
        if self.closing:
            return
        frame = {"type": "error", "code": error.code, "message": error.message}
        field = (error.details or [{}])[0].get("field")
        if field:  # a 4400 names the offending field
            frame["field"] = field
            if field not in error.message:
                frame["message"] = f"{field}: {error.message}"
        await self.send_json(frame)
        await self.end(close_code_for(error), outcome=error.code)

    async def end(self, code: int, *, outcome: str) -> None:
        self.closing = True
        await self.settle(outcome)
        await self.close(code=code)

    async def settle(self, outcome: str) -> None:
        if self.grant is not None and not getattr(self, "settled", False):
            self.settled = True
            await database_sync_to_async(stream_finish)(
                grant=self.grant,
                ctx=self.actor(),
                audio_duration_ms=round(self.samples_in / SAMPLE_RATE * 1000),
                latency_ms=round((time.monotonic() - self.started) * 1000),
                outcome=outcome,
            )

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.worker_channel is not None and not self.worker_closed.is_set():
            with contextlib.suppress(Exception):  # free the worker's session; it may be gone already
                await self.to_worker("session.close")
        if self.speaker_channel is not None:
            with contextlib.suppress(Exception):  # the worker forgets this stream's voices
                await self.channel_layer.send(self.speaker_channel, {"type": "speaker.close", "session_id": self.grant.session_id})
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await self.settle("disconnected")

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload))
