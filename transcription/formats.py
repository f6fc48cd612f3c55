"""Render a :class:`TranscriptionResult` in the response formats of OpenAI's transcription API.

Our ``/oai/v1/audio/transcriptions`` must be a drop-in for existing OpenAI clients, the official
SDK included, so the shapes follow what OpenAI returns rather than what would be tidiest: JSON
formats are dicts (the view serialises them), the caption formats are strings. ``diarized_json``
is OpenAI's ``TranscriptionDiarized``, plus our ``speaker_id`` on each segment.
"""

from __future__ import annotations

from typing import Any

from speech.engines.base import Segment, TranscriptionResult, language_name

RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")

JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
# OpenAI answers srt as text/plain too; vtt gets its own type so that a browser's <track> takes it.
VTT_CONTENT_TYPE = "text/vtt; charset=utf-8"


def render(
    result: TranscriptionResult,
    *,
    response_format: str,
    word_timestamps: bool,
    segment_timestamps: bool,
) -> tuple[str | dict[str, Any], str]:
    """Return ``(body, content_type)`` for ``response_format``.

    ``word_timestamps`` / ``segment_timestamps`` are the request's ``timestamp_granularities[]``;
    they only shape ``verbose_json``, as in OpenAI's API. The caller validates the format first;
    an unknown one here is a programming error and raises ``ValueError``.
    """
    if response_format == "json":
        return {"text": result.text}, JSON_CONTENT_TYPE
    if response_format == "text":
        return result.text, TEXT_CONTENT_TYPE
    if response_format == "srt":
        return render_srt(result), TEXT_CONTENT_TYPE
    if response_format == "vtt":
        return render_vtt(result), VTT_CONTENT_TYPE
    if response_format == "verbose_json":
        return (
            render_verbose_json(result, word_timestamps=word_timestamps, segment_timestamps=segment_timestamps),
            JSON_CONTENT_TYPE,
        )
    if response_format == "diarized_json":
        return render_diarized_json(result), JSON_CONTENT_TYPE
    raise ValueError(f"Unsupported response_format {response_format!r}; expected one of {RESPONSE_FORMATS}.")


def format_timestamp(seconds: float, *, decimal_marker: str) -> str:
    """``HH:MM:SS<marker>mmm``, rounded to the nearest millisecond.

    Rounding the total once, before splitting, is what keeps 59.9996 s from printing as
    ``00:00:59,1000``. Hours are always written (valid in both SRT and WebVTT) and simply grow past
    two digits beyond 99 h.
    """
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def render_srt(result: TranscriptionResult) -> str:
    """Numbered cues, numbering from 1; an empty transcript is an empty file."""
    blocks = [
        f"{number}\n"
        f"{format_timestamp(seg.start, decimal_marker=',')} --> {format_timestamp(seg.end, decimal_marker=',')}\n"
        f"{_cue_text(seg.text)}\n"
        for number, seg in enumerate(_cues(result), start=1)
    ]
    return "\n".join(blocks)


def render_vtt(result: TranscriptionResult) -> str:
    """A ``WEBVTT`` file; an empty transcript still has the header, so players accept it."""
    blocks = [
        f"{format_timestamp(seg.start, decimal_marker='.')} --> {format_timestamp(seg.end, decimal_marker='.')}\n"
        f"{_cue_text(seg.text)}\n"
        for seg in _cues(result)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render_verbose_json(
    result: TranscriptionResult, *, word_timestamps: bool, segment_timestamps: bool
) -> dict[str, Any]:
    """OpenAI's ``TranscriptionVerbose``.

    Segments come when asked for, or when no granularity was asked (OpenAI's default); words only
    when asked for. The per-segment decoder statistics are not something every backend has, so
    they are neutral zeros: present, because the SDK's model requires them. ``language`` is the
    lowercase English name OpenAI uses, ``""`` when no language is known.
    """
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": language_name(result.language) or "",
        "duration": round(float(result.duration_s), 3),
        "text": result.text,
    }
    if segment_timestamps or not word_timestamps:
        body["segments"] = [
            {
                "id": index,
                "seek": 0,
                "start": seg.start,
                "end": seg.end,
                "text": seg.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for index, seg in enumerate(result.segments)
        ]
    if word_timestamps:
        body["words"] = [
            {"word": word.word, "start": word.start, "end": word.end}
            for seg in result.segments
            for word in seg.words or []
        ]
    return body


def render_diarized_json(result: TranscriptionResult) -> dict[str, Any]:
    """OpenAI's ``TranscriptionDiarized``: segments with a ``speaker`` label each.

    ``speaker`` is the enrolled speaker's display name or an anonymous ``SPEAKER_n``; our
    ``speaker_id`` (the enrolled profile's id, or ``null``) rides along as an extra key.
    """
    return {
        "task": "transcribe",
        "duration": round(float(result.duration_s), 3),
        "text": result.text,
        "segments": [
            {
                "type": "transcript.text.segment",
                "id": f"seg_{index:03d}",
                "start": seg.start,
                "end": seg.end,
                "text": seg.text,
                "speaker": seg.speaker_label or "SPEAKER_0",
                "speaker_id": seg.speaker_id,
            }
            for index, seg in enumerate(result.segments, start=1)
        ],
        "usage": {"type": "duration", "seconds": round(float(result.duration_s), 3)},
    }


def _cues(result: TranscriptionResult) -> list[Segment]:
    segments = [seg for seg in result.segments if seg.text.strip()]
    if not segments and result.text.strip():
        # A backend that gave text without timing still gets one cue over the whole audio.
        return [Segment(start=0.0, end=result.duration_s, text=result.text)]
    return segments


def _cue_text(text: str) -> str:
    # "-->" inside a cue, or a blank line, would end the cue early in SRT and WebVTT parsers.
    lines = (line.strip() for line in text.replace("-->", "->").splitlines())
    return "\n".join(line for line in lines if line)
