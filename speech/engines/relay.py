"""Backend B: a managed relay that speaks OpenAI's ``POST /audio/transcriptions``.

Any server with that shape works (OpenAI itself, a vendor's gateway, or another ScaiEcho's
``/oai/v1``); it is configured by base URL, key and model name. Every failure is mapped onto the one
error hierarchy so the Celery task can decide what to retry: timeouts, 429s, 5xx answers and
dropped connections are transient; a relay that rejects the request (4xx) or answers in a shape we
cannot read is not, because sending the same thing again would fail the same way.

The relay key is a credential of this service, not of the tenant: it never appears in an
exception message, a log record or a repr. Nothing here imports Django.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import numpy as np

from speech.audio import SAMPLE_RATE, wav_bytes
from speech.engines.base import Engine, Segment, TranscribeOptions, TranscriptionResult, Word, language_code
from speech.errors import BackendError, BackendRateLimited, BackendTimeout, UpstreamShapeMismatch

logger = logging.getLogger(__name__)

# Enough of an upstream error message to diagnose a rejection, not enough to flood a job row.
_UPSTREAM_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class _Answer:
    """The relay's answer, read in full."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    elapsed_s: float

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not."""
        return json.loads(self.content)


class RelayRejected(BackendError):
    """The relay refused the request itself (401, 400, 413, ...): retrying cannot help."""

    transient = False


class RelayClient(Engine):
    """One configured relay. Holds no connection between calls, so it is safe to share."""

    name = "relay"

    def __init__(
        self, *, base_url: str, api_key: str, model: str, timeout_s: float, max_response_bytes: int = 16 * 2**20
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"RelayClient(base_url={self.base_url!r}, model={self.model!r}, timeout_s={self.timeout_s!r}, api_key='***')"

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/audio/transcriptions"

    def transcribe(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        """Send the audio to the relay and read its ``verbose_json``.

        The upload as the client sent it (``options.original``) is forwarded when there is one;
        otherwise ``samples`` go as 16-bit WAV. The duration is our own measurement of ``samples``;
        it is what the result reports (metering must not depend on the upstream's arithmetic) and
        the span of the single segment made for a relay that answers with text only.
        """
        duration_s = np.asarray(samples).size / SAMPLE_RATE
        if options.original is not None:
            audio, filename = options.original.data, options.original.filename
        else:
            audio, filename = wav_bytes(samples), "audio.wav"
        language, temperature, prompt = options.language, options.temperature, options.prompt
        word_timestamps = options.word_timestamps
        # A relay has no beam setting of its own in OpenAI's protocol: beam_size is not sent.
        data: dict[str, Any] = {
            "model": self.model,
            "response_format": "verbose_json",
            "timestamp_granularities[]": ["segment", "word"] if word_timestamps else ["segment"],
        }
        requested_language = language_code(language) if language else None
        if language:
            # An unknown name is passed through as given: the relay decides whether it knows it.
            data["language"] = requested_language or language
        if temperature is not None:
            data["temperature"] = str(temperature)
        if prompt:
            data["prompt"] = prompt

        try:
            response = asyncio.run(
                self._post(
                    data=data,
                    files={"file": (filename, audio, "application/octet-stream")},
                    headers={"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"},
                )
            )
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise BackendTimeout(
                f"The relay did not answer within {self.timeout_s:g} s ({type(exc).__name__})."
            ) from None
        except httpx.TransportError as exc:
            # Refused, reset, DNS failure, protocol violation: the relay may be back in a moment.
            raise BackendError(f"Could not reach the relay: {type(exc).__name__}: {self._scrub(str(exc))}") from None

        return self._result(
            response,
            duration_s=duration_s,
            word_timestamps=word_timestamps,
            requested_language=requested_language,
        )

    async def _post(self, **request: Any) -> _Answer:
        """The POST and its whole answer, within ``timeout_s`` in all: httpx's timeout bounds each
        read, and an upstream that sends its answer a byte at a time would hold a worker for ever.
        At most ``max_response_bytes`` of the answer are read."""
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            async with asyncio.timeout(self.timeout_s):
                async with client.stream("POST", self.endpoint, **request) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_response_bytes:
                            raise UpstreamShapeMismatch(
                                f"The relay's answer is larger than {self.max_response_bytes} bytes."
                            )
        return _Answer(response.status_code, response.headers, bytes(body), time.monotonic() - started)

    def _result(
        self,
        response: _Answer,
        *,
        duration_s: float,
        word_timestamps: bool,
        requested_language: str | None,
    ) -> TranscriptionResult:
        status = response.status_code
        if status == 429:
            retry_after = _retry_after(response.headers)
            raise BackendRateLimited(
                f"The relay is rate limiting this service (HTTP 429): {self._upstream_message(response)}",
                retry_after=retry_after,
            )
        if status >= 500:
            raise BackendError(f"The relay failed (HTTP {status}): {self._upstream_message(response)}")
        if status >= 400:
            raise RelayRejected(f"The relay rejected the request (HTTP {status}): {self._upstream_message(response)}")
        if status >= 300:
            # httpx does not follow redirects by default; a redirect means a misconfigured URL.
            raise RelayRejected(f"The relay answered with a redirect (HTTP {status}); check its base URL.")

        try:
            body = response.json()
        except ValueError:
            raise UpstreamShapeMismatch(
                f"The relay's answer is not JSON (content type {response.headers.get('content-type', 'unknown')!r})."
            ) from None
        logger.debug("relay answered HTTP %s in %.3f s", status, response.elapsed_s)
        return parse_verbose_json(
            body, duration_s=duration_s, word_timestamps=word_timestamps, requested_language=requested_language
        )

    def _upstream_message(self, response: _Answer) -> str:
        """The upstream's own words, for operators; OpenAI echoes (part of) a bad key, so scrub."""
        message: str
        try:
            body = response.json()
        except ValueError:
            message = response.text
        else:
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                message = error["message"]
            elif isinstance(error, str):
                message = error
            else:
                message = response.text
        message = " ".join(message.split())[:_UPSTREAM_MESSAGE_LIMIT]
        return self._scrub(message) or "no message"

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def parse_verbose_json(
    body: Any,
    *,
    duration_s: float,
    word_timestamps: bool,
    requested_language: str | None = None,
) -> TranscriptionResult:
    """Read an OpenAI transcription answer (``verbose_json``, or plain ``json``) into our types.

    Words arrive as one flat list beside the segments; each is given to the segment its midpoint
    falls in (else the nearest one), which is how Whisper itself groups them. Times are clamped to
    the audio as backend A does. Raises ``UpstreamShapeMismatch`` for anything else.
    """
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise UpstreamShapeMismatch("The relay's answer has no transcript text.")
    text = body["text"].strip()

    def clamp(value: float) -> float:
        value = max(float(value), 0.0)
        if duration_s > 0:
            value = min(value, duration_s)
        return round(value, 3)

    raw_segments = body.get("segments")
    raw_words = body.get("words")
    if raw_segments is not None and not isinstance(raw_segments, list):
        raise UpstreamShapeMismatch("The relay's 'segments' is not a list.")
    if raw_words is not None and not isinstance(raw_words, list):
        raise UpstreamShapeMismatch("The relay's 'words' is not a list.")

    spans: list[tuple[float, float, str]] = []
    for index, item in enumerate(raw_segments or []):
        start, end, seg_text = _timed(item, "text", f"segments[{index}]")
        spans.append((clamp(start), clamp(end), seg_text.strip()))
    if not spans and text:
        # A plain ``json`` answer (or a relay that ignores granularities): the text spans the audio.
        spans.append((0.0, round(max(duration_s, 0.0), 3), text))

    words: list[Word] = []
    for index, item in enumerate(raw_words or []):
        start, end, word = _timed(item, "word", f"words[{index}]")
        words.append(Word(start=clamp(start), end=clamp(end), word=word.strip()))

    buckets: list[list[Word]] = [[] for _ in spans]
    if spans:
        for word in words:
            buckets[_segment_index(spans, (word.start + word.end) / 2)].append(word)

    segments = [
        Segment(start=start, end=end, text=seg_text, words=bucket if word_timestamps else None)
        for (start, end, seg_text), bucket in zip(spans, buckets, strict=True)
    ]
    language = language_code(body.get("language")) if isinstance(body.get("language"), str) else None
    return TranscriptionResult(
        text=text,
        language=language or requested_language,
        duration_s=duration_s,
        segments=segments,
    )


def _timed(item: Any, text_key: str, where: str) -> tuple[float, float, str]:
    if not isinstance(item, dict):
        raise UpstreamShapeMismatch(f"The relay's {where} is not an object.")
    start, end, text = item.get("start"), item.get("end"), item.get(text_key)
    for name, value in (("start", start), ("end", end)):
        # bool is an int in Python, but never a time.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UpstreamShapeMismatch(f"The relay's {where}.{name} is not a number.")
    if not isinstance(text, str):
        raise UpstreamShapeMismatch(f"The relay's {where}.{text_key} is not a string.")
    return float(start), float(end), text


def _segment_index(spans: list[tuple[float, float, str]], t: float) -> int:
    for index, (start, end, _) in enumerate(spans):
        if start <= t < end:
            return index
    return min(range(len(spans)), key=lambda i: min(abs(t - spans[i][0]), abs(t - spans[i][1])))


def _retry_after(headers: httpx.Headers) -> int:
    """Seconds to wait, from ``Retry-After`` (seconds or an HTTP-date); 1 when absent or unreadable.

    OpenAI also sends ``retry-after-ms``; it is used when ``Retry-After`` is missing. Never below 1,
    so a client told to wait is never told "0, hammer away".
    """
    value = headers.get("retry-after")
    if value is not None:
        value = value.strip()
        try:
            return max(1, math.ceil(float(value)))
        except (ValueError, OverflowError):  # not a number, or nan / inf
            pass
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 1
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(1, math.ceil((when - datetime.now(UTC)).total_seconds()))
    value_ms = headers.get("retry-after-ms")
    if value_ms is not None:
        try:
            return max(1, math.ceil(float(value_ms) / 1000))
        except (ValueError, OverflowError):
            return 1
    return 1
