"""Our OpenAI-compatible endpoint's bodies: what an OpenAI client (and a subtitle player) reads."""

from __future__ import annotations

import pytest

from speech.engines.base import Segment, TranscriptionResult, Word
from transcription.formats import format_timestamp, render

HELLO = TranscriptionResult(
    text="Hello there. General Kenobi.",
    language="en",
    duration_s=3725.9,
    segments=[
        Segment(
            start=0.0,
            end=1.8,
            text="Hello there.",
            words=[Word(start=0.0, end=0.7, word="Hello", probability=0.9), Word(start=0.8, end=1.8, word="there.")],
        ),
        Segment(
            start=3723.4567,
            end=3725.9,
            text="General Kenobi.",
            words=[Word(start=3723.4567, end=3724.0, word="General"), Word(start=3724.1, end=3725.9, word="Kenobi.")],
        ),
    ],
)
EMPTY = TranscriptionResult(text="", language=None, duration_s=2.0, segments=[])

SEGMENT_KEYS = {
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
}


def body(result: TranscriptionResult, response_format: str, *, words: bool = False, segments: bool = False) -> object:
    rendered, _ = render(result, response_format=response_format, word_timestamps=words, segment_timestamps=segments)
    return rendered


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0.0, "00:00:00,000", "00:00:00.000"),
        (2.3456, "00:00:02,346", "00:00:02.346"),
        (59.9996, "00:01:00,000", "00:01:00.000"),  # rounding carries into the minutes
        (3725.5, "01:02:05,500", "01:02:05.500"),
        (360_000.0, "100:00:00,000", "100:00:00.000"),
        (-0.2, "00:00:00,000", "00:00:00.000"),
    ],
)
def test_timestamps_round_to_the_millisecond_with_hours(seconds: float, srt: str, vtt: str) -> None:
    assert format_timestamp(seconds, decimal_marker=",") == srt
    assert format_timestamp(seconds, decimal_marker=".") == vtt


def test_srt_has_numbered_cues() -> None:
    rendered, content_type = render(HELLO, response_format="srt", word_timestamps=False, segment_timestamps=False)

    assert rendered == (
        "1\n00:00:00,000 --> 00:00:01,800\nHello there.\n\n2\n01:02:03,457 --> 01:02:05,900\nGeneral Kenobi.\n"
    )
    assert content_type.startswith("text/plain")


def test_vtt_has_a_header_and_dotted_times() -> None:
    rendered, content_type = render(HELLO, response_format="vtt", word_timestamps=False, segment_timestamps=False)

    assert rendered == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.800\nHello there.\n\n01:02:03.457 --> 01:02:05.900\nGeneral Kenobi.\n"
    )
    assert content_type.startswith("text/vtt")


def test_cue_text_cannot_break_the_cue() -> None:
    tricky = TranscriptionResult(
        text="a --> b",
        language="en",
        duration_s=1.0,
        segments=[Segment(start=0.0, end=1.0, text="a --> b\n\nc")],
    )

    assert body(tricky, "srt") == "1\n00:00:00,000 --> 00:00:01,000\na -> b\nc\n"


def test_an_empty_transcript_renders_as_empty_but_valid_bodies() -> None:
    assert body(EMPTY, "srt") == ""
    assert body(EMPTY, "vtt") == "WEBVTT\n\n"
    assert body(EMPTY, "text") == ""
    assert body(EMPTY, "json") == {"text": ""}
    assert body(EMPTY, "verbose_json") == {
        "task": "transcribe",
        "language": "",
        "duration": 2.0,
        "text": "",
        "segments": [],
    }


def test_text_without_segments_still_gets_one_cue() -> None:
    bare = TranscriptionResult(text="Only text.", language="en", duration_s=2.5, segments=[])

    assert body(bare, "srt") == "1\n00:00:00,000 --> 00:00:02,500\nOnly text.\n"


def test_json_and_text_carry_only_the_transcript() -> None:
    assert render(HELLO, response_format="json", word_timestamps=True, segment_timestamps=True) == (
        {"text": HELLO.text},
        "application/json",
    )
    assert body(HELLO, "text") == HELLO.text


def test_verbose_json_has_openais_fields_and_segments_by_default() -> None:
    verbose = body(HELLO, "verbose_json")

    assert isinstance(verbose, dict)
    assert set(verbose) == {"task", "language", "duration", "text", "segments"}
    assert (verbose["task"], verbose["language"], verbose["duration"]) == ("transcribe", "english", 3725.9)
    assert [set(s) for s in verbose["segments"]] == [SEGMENT_KEYS, SEGMENT_KEYS]
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in verbose["segments"]] == [
        (0, 0.0, 1.8, "Hello there."),
        (1, 3723.4567, 3725.9, "General Kenobi."),
    ]


def test_verbose_json_words_only_when_asked() -> None:
    both = body(HELLO, "verbose_json", words=True, segments=True)
    words_only = body(HELLO, "verbose_json", words=True)

    assert isinstance(both, dict)
    assert isinstance(words_only, dict)
    assert (
        both["words"]
        == words_only["words"]
        == [
            {"word": "Hello", "start": 0.0, "end": 0.7},
            {"word": "there.", "start": 0.8, "end": 1.8},
            {"word": "General", "start": 3723.4567, "end": 3724.0},
            {"word": "Kenobi.", "start": 3724.1, "end": 3725.9},
        ]
    )
    assert "segments" in both
    assert "segments" not in words_only  # as OpenAI does for timestamp_granularities[]=word


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="diarized_json"):
        body(HELLO, "srt_with_colours")


def test_diarized_json_is_openais_diarized_shape_with_our_speaker_ids() -> None:
    from dataclasses import replace

    from openai.types.audio import TranscriptionDiarized

    diarized = replace(
        HELLO,
        segments=[
            replace(HELLO.segments[0], speaker_id="8d5e5a0e-0000-4000-8000-000000000001", speaker_label="Alice"),
            replace(HELLO.segments[1], speaker_id=None, speaker_label="SPEAKER_1"),
        ],
    )
    rendered = body(diarized, "diarized_json")
    parsed = TranscriptionDiarized.model_validate(rendered)  # what the official SDK builds from it
    assert [segment.speaker for segment in parsed.segments] == ["Alice", "SPEAKER_1"]
    assert [segment["speaker_id"] for segment in rendered["segments"]] == ["8d5e5a0e-0000-4000-8000-000000000001", None]
    assert parsed.text == HELLO.text
    assert [(s.start, s.end) for s in parsed.segments] == [(s.start, s.end) for s in HELLO.segments]
