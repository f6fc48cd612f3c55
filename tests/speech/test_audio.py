"""Uploads in each supported container decode to the same 16 kHz mono audio; the rest are 415s."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

from scaiecho_site.errors import UnsupportedMedia
from speech.audio import SAMPLE_RATE, AudioTooLong, decode_audio, sniff_extension
from tests.voices import convert_audio, synth_speech

TEXT = "Please send the quarterly report to the finance team before Friday."
FORMATS = ["wav", "mp3", "flac", "ogg", "m4a"]


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    return synth_speech(TEXT)


@pytest.fixture(scope="module")
def wav_duration(speech_wav: bytes) -> float:
    with av.open(io.BytesIO(speech_wav)) as container:
        stream = container.streams.audio[0]
        return stream.frames / stream.rate if stream.frames else float(container.duration) / 1e6


@pytest.fixture(scope="module")
def encoded(speech_wav: bytes) -> dict[str, bytes]:
    return {fmt: convert_audio(speech_wav, fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_decodes_to_16k_mono_float_of_the_same_length(
    fmt: str, encoded: dict[str, bytes], wav_duration: float
) -> None:
    decoded = decode_audio(encoded[fmt])

    assert decoded.container == fmt
    assert decoded.samples.dtype == np.float32
    assert decoded.samples.ndim == 1
    assert decoded.duration_s == pytest.approx(decoded.samples.size / SAMPLE_RATE)
    assert decoded.duration_s == pytest.approx(wav_duration, abs=0.1)
    peak = float(np.max(np.abs(decoded.samples)))
    assert 0.05 < peak <= 1.0  # speech, at a sane scale, not silence or raw int16
    assert sniff_extension(encoded[fmt]) == fmt


@pytest.mark.skipif(shutil.which("sox") is None, reason="needs sox")
def test_stereo_44k_and_vorbis_from_sox_are_downmixed_and_resampled(
    tmp_path: Path, speech_wav: bytes, wav_duration: float
) -> None:
    source = tmp_path / "speech.wav"
    source.write_bytes(speech_wav)
    for name in ("stereo.wav", "vorbis.ogg"):
        target = tmp_path / name
        subprocess.run(
            ["sox", str(source), "-r", "44100", "-c", "2", str(target)],
            check=True,
            capture_output=True,
        )

        decoded = decode_audio(target.read_bytes())

        assert decoded.samples.ndim == 1
        assert decoded.duration_s == pytest.approx(wav_duration, abs=0.1)


def _png() -> bytes:
    # A real 1x1 PNG: FFmpeg has an image demuxer for it, which must not be reachable.
    return bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )


def _video_only_mp4() -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            image = np.full((64, 64, 3), i * 20, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def _corrupt_middle(data: bytes) -> bytes:
    damaged = bytearray(data)
    start = len(data) // 4
    for i in range(start, start + 2000):
        damaged[i] = 0xFF if i % 2 else 0x00
    return bytes(damaged)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda enc: b"", id="empty"),
        pytest.param(lambda enc: b"meeting notes: nothing to hear here\n" * 50, id="text"),
        pytest.param(lambda enc: _png(), id="png"),
        pytest.param(lambda enc: np.random.default_rng(7).bytes(40_000), id="random-bytes"),
        pytest.param(lambda enc: _video_only_mp4(), id="mp4-video-only"),
        pytest.param(lambda enc: enc["wav"][:44], id="wav-header-only"),
        pytest.param(lambda enc: enc["mp3"][:100], id="mp3-first-100-bytes"),
        pytest.param(lambda enc: enc["flac"][:100], id="flac-first-100-bytes"),
        pytest.param(lambda enc: enc["ogg"][:100], id="ogg-first-100-bytes"),
        pytest.param(lambda enc: enc["flac"][: len(enc["flac"]) // 2], id="flac-cut-in-half"),
        pytest.param(lambda enc: enc["m4a"][: len(enc["m4a"]) // 2], id="m4a-cut-in-half"),
        pytest.param(lambda enc: _corrupt_middle(enc["mp3"]), id="mp3-corrupt-middle"),
        pytest.param(lambda enc: _corrupt_middle(enc["m4a"]), id="m4a-corrupt-middle"),
    ],
)
def test_unreadable_uploads_are_unsupported_media(
    make: Callable[[dict[str, bytes]], bytes], encoded: dict[str, bytes]
) -> None:
    data = make(encoded)

    with pytest.raises(UnsupportedMedia) as excinfo:
        decode_audio(data)

    assert excinfo.value.http_status == 415
    assert excinfo.value.message


def test_sniff_refuses_what_decode_refuses() -> None:
    with pytest.raises(UnsupportedMedia, match="not supported"):
        sniff_extension(_png())


def test_a_wav_cut_short_decodes_to_the_part_that_arrived(
    encoded: dict[str, bytes], wav_duration: float
) -> None:
    # A player would play the first half; so do we (documented in decode_audio).
    decoded = decode_audio(encoded["wav"][: len(encoded["wav"]) // 2])

    assert decoded.duration_s == pytest.approx(wav_duration / 2, abs=0.1)


def test_audio_longer_than_the_limit_stops_decoding(encoded: dict[str, bytes]) -> None:
    with pytest.raises(AudioTooLong):
        decode_audio(encoded["flac"], max_duration_s=1.0)
