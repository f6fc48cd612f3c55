"""``WS /oai/v1/realtime``: OpenAI's Realtime API in transcription mode (contract §9), for the
official SDK's ``client.realtime.connect()`` pointed at ``base_url=<host>/oai/v1``.

A thin protocol adapter over the native stream (:class:`~streaming.consumers.TranscribeStreamConsumer`):
the same authentication, permission, stream slots, open rate, budget metering, pace, frame and
queue bounds, idle and maximum-length timers, and the same :class:`~streaming.sessions.LiveSession`
(stream worker or relay). What differs is only the wire:

- The stream opens at connect (``stream_open``: permission, slots, budget), answered with
  ``session.created``; the backend session opens at the first ``input_audio_buffer.append``, with
  the language, prompt and diarization the ``session.update`` events set before it.
- Audio comes as base64 in ``input_audio_buffer.append`` (``audio/pcm`` s16le at 24 kHz, or
  16 kHz as an extension; ``audio/pcmu`` / ``audio/pcma`` G.711 at 8 kHz), decoded by the native
  stream's decoders.
- ``turn_detection: server_vad`` (the default): the stream's own VAD endpointing makes the
  turns. A turn starts with the first partial of a span (``speech_started``, ``audio_start_ms`` the
  span's start) and ends with its final: ``speech_stopped``, ``committed``, the transcription
  ``delta`` and ``completed``. ``turn_detection: null``: finals collect until
  ``input_audio_buffer.commit`` (``committed`` at once), which makes finals of the rest of the
  buffer (``LiveSession.finalize``); once they are out, one ``delta`` and ``completed`` for the item.
  ``input_audio_buffer.clear`` drops the uncommitted audio's finals (``cleared``).
- Diarization (our extension): ``audio.input.transcription.model = "gpt-4o-transcribe-diarize"``
  (needs ``scaiecho:diarize``) adds OpenAI's ``conversation.item.input_audio_transcription.segment``
  events, one per final, with ``speaker`` (the display name or ``SPEAKER_n``) and ``speaker_id``.
- A bad client event gets an ``error`` event in OpenAI's shape and the session goes on; what ends a
  native stream (auth, permission, limits, budget, timeouts, backend failure) sends an ``error``
  event with our stable code and closes with the native close code.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings

from scaiecho_site import errors
from speech.audio import SAMPLE_RATE
from speech.decoders import StreamDecoder, make_decoder
from streaming.consumers import TranscribeStreamConsumer
from streaming.services import stream_authorize
from streaming.sessions import LiveDelta, SessionOptions

SUBPROTOCOL = "realtime"
# OpenAI's model that labels speakers; asking for it turns on our diarization.
DIARIZE_MODEL = "gpt-4o-transcribe-diarize"
DEFAULT_MODEL = "whisper-1"
# Finals of one span are cut at clause ends, or at the latest after this many seconds of speech
# (the stream worker takes SCAIECHO_STREAM_COMMIT_SECONDS where that is shorter).
CHUNK_SECONDS = 5.0
# OpenAI refuses to commit less audio than this.
MIN_COMMIT_MS = 100
MAX_PROMPT_CHARS = 1000
PCM_RATES = (24000, 16000)
FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")
SERVER_VAD_DEFAULTS: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": False,
    "interrupt_response": False,
}
CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear")


class RealtimeEventError(Exception):
    """A client event the session refuses; an ``error`` event answers it and the session goes on."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(16).replace('-', 'A').replace('_', 'B')[:22]}"


@dataclass(frozen=True)
class TranscriptionConfig:
    """The session's effective configuration, as ``session.created`` / ``.updated`` show it."""

    format_type: str = "audio/pcm"
    rate: int = 24000
    model: str = DEFAULT_MODEL
    language: str | None = None
    prompt: str = ""
    turn_detection: dict[str, Any] | None = field(default_factory=lambda: dict(SERVER_VAD_DEFAULTS))
    noise_reduction: dict[str, Any] | None = None
    include: tuple[str, ...] = ()

    @property
    def diarize(self) -> bool:
        return self.model == DIARIZE_MODEL

    @property
    def server_vad(self) -> bool:
        return self.turn_detection is not None

    def decoder(self) -> StreamDecoder:
        if self.format_type == "audio/pcm":
            return make_decoder(media_type="audio/pcm", sample_rate=self.rate)
        return make_decoder(media_type=self.format_type)

    def session_options(self) -> SessionOptions:
        return SessionOptions(
            language=self.language,
            chunk_seconds=CHUNK_SECONDS,
            diarize=self.diarize,
            speaker_ids=[],
            prompt=self.prompt or None,
        )

    def shapes_transcription(self, other: TranscriptionConfig) -> bool:
        """Whether ``other`` differs in what the backend session was opened with."""
        return (self.language, self.prompt, self.diarize) != (other.language, other.prompt, other.diarize)

    def payload(self, *, session_id: str, expires_at: int) -> dict[str, Any]:
        audio_format: dict[str, Any] = {"type": self.format_type}
        if self.format_type == "audio/pcm":
            audio_format["rate"] = self.rate
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": session_id,
            "expires_at": expires_at,
            "audio": {
                "input": {
                    "format": audio_format,
                    "transcription": {"model": self.model, "language": self.language, "prompt": self.prompt},
                    "turn_detection": self.turn_detection,
                    "noise_reduction": self.noise_reduction,
                }
            },
            "include": list(self.include),
        }


def _expect_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RealtimeEventError(f"Invalid type for '{param}': expected an object.", code="invalid_type", param=param)
    return value


def _refuse_unknown(value: dict[str, Any], known: tuple[str, ...], param: str) -> None:
    for name in value:
        if name not in known:
            raise RealtimeEventError(f"Unknown parameter: '{param}.{name}'.", code="unknown_parameter", param=f"{param}.{name}")


def parse_session_update(session: Any, current: TranscriptionConfig) -> TranscriptionConfig:
    """``current`` with what ``session`` (a ``session.update``'s ``session``) sets; fields it leaves
    out keep their values. Raises :class:`RealtimeEventError` naming the first bad parameter."""
    session = _expect_object(session, "session")
    if "type" not in session:
        raise RealtimeEventError("Missing required parameter: 'session.type'.", code="missing_required_parameter", param="session.type")
    if session["type"] != "transcription":
        raise RealtimeEventError(
            f"Invalid value: {session['type']!r}. This endpoint serves transcription sessions only: 'transcription'.",
            param="session.type",
        )
    _refuse_unknown(session, ("type", "audio", "include"), "session")
    config = current
    if "include" in session:
        include = session["include"]
        if not isinstance(include, list) or any(item != "item.input_audio_transcription.logprobs" for item in include):
            raise RealtimeEventError(
                "session.include may only list 'item.input_audio_transcription.logprobs'.", param="session.include"
            )
        config = replace(config, include=tuple(include))
    audio = _expect_object(session.get("audio", {}), "session.audio")
    _refuse_unknown(audio, ("input",), "session.audio")
    audio_input = _expect_object(audio.get("input", {}), "session.audio.input")
    _refuse_unknown(audio_input, ("format", "transcription", "turn_detection", "noise_reduction"), "session.audio.input")
    if "format" in audio_input:
        config = _parse_format(audio_input["format"], config)
    if "transcription" in audio_input:
        config = _parse_transcription(audio_input["transcription"], config)
    if "turn_detection" in audio_input:
        config = replace(config, turn_detection=_parse_turn_detection(audio_input["turn_detection"]))
    if "noise_reduction" in audio_input:
        noise = audio_input["noise_reduction"]
        if noise is not None:
            noise = _expect_object(noise, "session.audio.input.noise_reduction")
            if noise.get("type") not in (None, "near_field", "far_field"):
                raise RealtimeEventError(
                    "noise_reduction.type must be 'near_field' or 'far_field'.", param="session.audio.input.noise_reduction.type"
                )
        config = replace(config, noise_reduction=noise)
    return config


def _parse_format(value: Any, config: TranscriptionConfig) -> TranscriptionConfig:
    param = "session.audio.input.format"
    value = _expect_object(value, param)
    _refuse_unknown(value, ("type", "rate"), param)
    kind = value.get("type", "audio/pcm")
    if kind not in FORMATS:
        raise RealtimeEventError(f"Invalid value: {kind!r}. Supported values are: {', '.join(FORMATS)}.", param=f"{param}.type")
    rate = value.get("rate", 24000)
    if kind == "audio/pcm" and (isinstance(rate, bool) or rate not in PCM_RATES):
        raise RealtimeEventError("audio/pcm's rate must be 24000 (or 16000).", param=f"{param}.rate")
    return replace(config, format_type=kind, rate=rate if kind == "audio/pcm" else 8000)


def _parse_transcription(value: Any, config: TranscriptionConfig) -> TranscriptionConfig:
    param = "session.audio.input.transcription"
    if value is None:  # "off" makes no sense for a transcription session: back to the defaults
        return replace(config, model=DEFAULT_MODEL, language=None, prompt="")
    value = _expect_object(value, param)
    _refuse_unknown(value, ("model", "language", "prompt", "delay", "keywords", "languages"), param)
    model = value.get("model", config.model)
    if not isinstance(model, str) or not model or len(model) > 100:
        raise RealtimeEventError("model must be a model name such as 'whisper-1'.", param=f"{param}.model")
    language = value.get("language", config.language)
    if language is not None and not (isinstance(language, str) and len(language) == 2 and language.isalpha() and language.islower()):
        raise RealtimeEventError("language must be an ISO-639-1 code such as 'en'.", param=f"{param}.language")
    prompt = value.get("prompt", config.prompt)
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise RealtimeEventError(f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters.", param=f"{param}.prompt")
    return replace(config, model=model, language=language, prompt=prompt)


def _parse_turn_detection(value: Any) -> dict[str, Any] | None:
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    value = _expect_object(value, param)
    if value.get("type") != "server_vad":
        raise RealtimeEventError(
            f"Invalid value: {value.get('type')!r}. Supported values are: 'server_vad' (or turn_detection null).",
            param=f"{param}.type",
        )
    _refuse_unknown(value, tuple(SERVER_VAD_DEFAULTS), param)
    numbers = {"threshold": (0.0, 1.0), "prefix_padding_ms": (0, 10_000), "silence_duration_ms": (0, 10_000)}
    for name, (low, high) in numbers.items():
        number = value.get(name, SERVER_VAD_DEFAULTS[name])
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not low <= number <= high:
            raise RealtimeEventError(f"{name} must be a number from {low} to {high}.", param=f"{param}.{name}")
    return {**SERVER_VAD_DEFAULTS, **value}


@dataclass
class _Flush:
    """A ``finalize`` sent to the session, waiting for its finals (``on_flushed``): a manual
    commit's item, a server-VAD commit (its finals end turns as usual), or a clear (dropped)."""

    kind: str  # "commit" | "turn" | "clear"
    item_id: str | None = None
    finals: list[LiveDelta] = field(default_factory=list)
    audio_s: float = 0.0
    turns: int = 0  # "turn": the turns its finals ended


class RealtimeTranscriptionConsumer(TranscribeStreamConsumer):
    """One OpenAI Realtime transcription session per connection (see the module docstring)."""

    def subprotocol(self) -> str | None:
        # A browser client offers ``realtime`` beside the key's subprotocol; it must be chosen.
        return SUBPROTOCOL if SUBPROTOCOL in (self.scope.get("subprotocols") or []) else None

    async def connect(self) -> None:
        self.config = TranscriptionConfig()
        self.decoder = self.config.decoder()
        self.buffer_samples = 0  # decoded samples appended since the last commit or clear
        self.buffer_finals: list[LiveDelta] = []  # manual mode: finals of the uncommitted buffer
        self.flushes: deque[_Flush] = deque()
        self.turn_item: str | None = None  # server VAD: the item of the turn being spoken
        self.last_item: str | None = None
        self.segments = 0
        await super().connect()
        if self.closing:
            return
        try:
            await self.open_grant(backend_preference="any", diarize=False, speaker_ids=[])
        except errors.ApplicationError as exc:
            await self.fail(exc)
            return
        await self.send_event("session.created", session=self.session_payload())

    def session_payload(self) -> dict[str, Any]:
        return self.config.payload(session_id=self.grant.session_id, expires_at=int(self.grant.expires_at.timestamp()))

    # --- client events --------------------------------------------------------------------------

    async def on_control(self, text: str, *, arrived: float) -> None:
        event_id = None
        try:
            try:
                event = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise RealtimeEventError("The event is not valid JSON.", code="invalid_json") from exc
            if not isinstance(event, dict):
                raise RealtimeEventError("An event must be a JSON object.", code="invalid_type")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = event.get("type")
            if kind == "session.update":
                await self.on_session_update(event)
            elif kind == "input_audio_buffer.append":
                await self.on_append(event, arrived=arrived)
            elif kind == "input_audio_buffer.commit":
                await self.on_commit()
            elif kind == "input_audio_buffer.clear":
                await self.on_clear()
            elif not isinstance(kind, str):
                raise RealtimeEventError("Missing required parameter: 'type'.", code="missing_required_parameter", param="type")
            else:
                raise RealtimeEventError(
                    f"Invalid value: {kind[:100]!r}. A transcription session takes: {', '.join(CLIENT_EVENTS)}.", param="type"
                )
        except RealtimeEventError as exc:
            error = {"type": "invalid_request_error", "code": exc.code, "message": exc.message, "param": exc.param, "event_id": event_id}
            await self.send_event("error", error=error)

    async def on_audio(self, data: bytes, *, arrived: float) -> None:
        await self.send_event(
            "error",
            error={
                "type": "invalid_request_error",
                "code": "invalid_value",
                "message": "Binary frames are not part of the Realtime API: send input_audio_buffer.append events.",
                "param": None,
                "event_id": None,
            },
        )

    async def on_session_update(self, event: dict[str, Any]) -> None:
        config = parse_session_update(event.get("session"), self.config)
        if self.session is not None and config.shapes_transcription(self.config):
            raise RealtimeEventError(
                "The transcription's model, language and prompt are fixed once audio has arrived; open a new session.",
                param="session.audio.input.transcription",
            )
        if config.diarize and not self.config.diarize:
            # As a native stream that asks to diarize without the permission: refused, closed 4403.
            await database_sync_to_async(stream_authorize)(key=self.key, ctx=self.actor(), diarize=True)
        format_changed = (config.format_type, config.rate) != (self.config.format_type, self.config.rate)
        self.config = config
        if format_changed:  # the old format's last samples go out, the new format's decoder takes over
            await self.restart_decoder(keep_tail=True)
        await self.send_event("session.updated", session=self.session_payload())

    async def on_append(self, event: dict[str, Any], *, arrived: float) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise RealtimeEventError("Missing required parameter: 'audio' (base64 audio).", code="missing_required_parameter", param="audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RealtimeEventError("audio must be base64-encoded audio bytes.", param="audio") from exc
        if not data:
            return
        if self.session is None and not await self.open_session(self.config.session_options()):
            return
        self.audio_bytes += len(data)
        samples = await sync_to_async(self.decoder.feed, thread_sensitive=False)(data)
        self.buffer_samples += samples.size
        await self.take_samples(samples, arrived=arrived)

    async def restart_decoder(self, *, keep_tail: bool) -> None:
        """End the decoder's stream (its resampler's last samples) and start one in the current format."""
        tail = await sync_to_async(self.decoder.flush, thread_sensitive=False)()
        self.decoder = self.config.decoder()
        if keep_tail and tail.size and self.session is not None:
            self.buffer_samples += tail.size
            await self.take_samples(tail, arrived=self.last_activity)

    async def on_commit(self) -> None:
        buffered_ms = self.buffer_samples * 1000 / SAMPLE_RATE
        if self.session is None or buffered_ms < MIN_COMMIT_MS:
            raise RealtimeEventError(
                f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio,"
                f" but buffer only has {buffered_ms:.2f}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        self.check_pending_flushes()
        await self.restart_decoder(keep_tail=True)
        if self.config.server_vad:
            flush = _Flush(kind="turn", audio_s=self.buffer_samples / SAMPLE_RATE)
        else:
            flush = _Flush(
                kind="commit", item_id=new_id("item"), finals=self.buffer_finals, audio_s=self.buffer_samples / SAMPLE_RATE
            )
            self.buffer_finals = []
        self.buffer_samples = 0
        self.flushes.append(flush)
        if flush.item_id is not None:
            await self.send_committed(flush.item_id)
        await self.session.finalize()

    async def on_clear(self) -> None:
        await self.restart_decoder(keep_tail=False)
        if self.session is not None and (self.buffer_samples or self.turn_item is not None):
            self.check_pending_flushes()
            self.flushes.append(_Flush(kind="clear"))
            await self.session.finalize()
        self.buffer_samples = 0
        self.buffer_finals = []
        self.turn_item = None  # a turn in the cleared audio is never committed
        await self.send_event("input_audio_buffer.cleared")

    def check_pending_flushes(self) -> None:
        # Commits and clears whose finals the backend has not delivered yet; more close the stream
        # (4429), as frames piling up behind a slow backend do.
        if len(self.flushes) >= settings.SCAIECHO_REALTIME_MAX_PENDING_COMMITS:
            raise errors.RateLimited(
                f"{len(self.flushes)} commits and clears wait for the backend; wait for their events.", retry_after=1
            )

    # --- what the session reports -----------------------------------------------------------------

    async def on_delta(self, delta: LiveDelta) -> None:
        if self.closing:
            return
        head = self.flushes[0] if self.flushes else None
        if head is not None and head.kind == "clear":
            return  # cleared audio
        if head is not None and head.kind == "commit":
            if delta.is_final:
                head.finals.append(delta)
            return
        if not self.config.server_vad:
            if delta.is_final:
                self.buffer_finals.append(delta)
            return
        if self.turn_item is None and delta.text.strip():
            await self.start_turn(delta.start)
        if delta.is_final:
            await self.end_turn(delta)

    async def on_flushed(self) -> None:
        if not self.flushes or self.closing:
            return
        flush = self.flushes.popleft()
        if flush.kind == "commit":
            await self.send_transcript(flush.item_id, flush.finals, audio_s=flush.audio_s)
        elif flush.kind == "turn" and self.turn_item is not None:
            # The span ended with no words (filtered as noise): the turn still ends.
            end = self.samples_in / SAMPLE_RATE
            await self.end_turn(LiveDelta(text="", is_final=True, start=end - flush.audio_s, end=end))
        elif flush.kind == "turn" and not flush.turns:
            # A commit of audio that made no turn (silence): its item is still committed, with an
            # empty transcript, as OpenAI answers a commit.
            item_id = new_id("item")
            await self.send_committed(item_id)
            await self.send_transcript(item_id, [], audio_s=flush.audio_s)

    async def start_turn(self, start: float) -> None:
        self.turn_item = new_id("item")
        await self.send_event("input_audio_buffer.speech_started", audio_start_ms=round(start * 1000), item_id=self.turn_item)

    async def end_turn(self, final: LiveDelta) -> None:
        if self.turn_item is None:
            await self.start_turn(final.start)
        item_id = self.turn_item
        self.turn_item = None
        if self.flushes and self.flushes[0].kind == "turn":
            self.flushes[0].turns += 1
        await self.send_event("input_audio_buffer.speech_stopped", audio_end_ms=round(final.end * 1000), item_id=item_id)
        await self.send_committed(item_id)
        # The server committed the buffer up to the end of the turn.
        self.buffer_samples = max(0, self.samples_in - round(final.end * SAMPLE_RATE))
        finals = [final] if final.text.strip() else []
        await self.send_transcript(item_id, finals, audio_s=max(0.0, final.end - final.start))

    async def send_committed(self, item_id: str) -> None:
        await self.send_event("input_audio_buffer.committed", previous_item_id=self.last_item, item_id=item_id)
        self.last_item = item_id

    async def send_transcript(self, item_id: str, finals: list[LiveDelta], *, audio_s: float) -> None:
        pieces = [final for final in finals if final.text.strip()]
        transcript = " ".join(final.text.strip() for final in pieces)
        if self.config.diarize:
            for final in pieces:
                self.segments += 1
                await self.send_event(
                    "conversation.item.input_audio_transcription.segment",
                    item_id=item_id,
                    content_index=0,
                    id=f"seg_{self.segments:04d}",
                    start=final.start,
                    end=final.end,
                    text=final.text.strip(),
                    speaker=final.speaker_label or "unknown",
                    speaker_id=final.speaker_id,
                )
        if transcript:
            await self.send_event(
                "conversation.item.input_audio_transcription.delta", item_id=item_id, content_index=0, delta=transcript
            )
        await self.send_event(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=transcript,
            usage={"type": "duration", "seconds": round(audio_s, 3)},
        )

    # --- endings ----------------------------------------------------------------------------------

    def error_frame(self, error: errors.ApplicationError) -> dict[str, Any]:
        """OpenAI's ``error`` event, with our stable code (the stream closes after it)."""
        details: dict[str, Any] = {
            "type": "server_error" if error.http_status >= 500 else "invalid_request_error",
            "code": error.code,
            "message": error.message,
            "param": (error.details or [{}])[0].get("field"),
            "event_id": None,
        }
        if error.retry_after is not None:
            details["retry_after"] = error.retry_after
        return {"type": "error", "event_id": new_id("event"), "error": details}

    async def send_event(self, kind: str, **fields: Any) -> None:
        if not self.closing:
            await self.send_json({"type": kind, "event_id": new_id("event"), **fields})


__all__ = ["RealtimeTranscriptionConsumer", "parse_session_update"]
