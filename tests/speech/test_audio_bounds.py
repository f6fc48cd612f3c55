"""Decoding holds its bounds: only allowed containers and codecs reach FFmpeg's decoders, declared
sample rates outside 8-192 kHz are refused, the duration is checked before decoding (or decoding
stops at the limit), and memory grows with the output only."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from speech.audio import SAMPLE_RATE, decode_audio, probe_audio, sniff_extension
from speech.errors import AudioOverBudget, AudioTooLong, UnsupportedMedia
from tests.speech.test_audio import _png

ROOT = Path(__file__).resolve().parents[2]
HOUR_OF_OUTPUT = 3600 * SAMPLE_RATE * 4  # bytes of float32 at 16 kHz: what a 1 Hz WAV used to become


def pcm_wav(*, rate: int, samples: int, channels: int = 1, declared_bytes: int | None = None) -> bytes:
    """A PCM s16 WAV of a quiet tone whose header declares ``rate`` (and ``declared_bytes`` of data)."""
    tone = (np.sin(np.arange(samples * channels) / 7.0) * 3000).astype("<i2").tobytes()
    size = len(tone) if declared_bytes is None else declared_bytes
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size) + tone


def encoded_tone(*, seconds: int, fmt: str, codec: str, rate: int = SAMPLE_RATE, options: dict[str, str] | None = None) -> bytes:
    """``seconds`` of a noisy 220 Hz tone encoded with PyAV, ten seconds at a time."""
    out = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(out, "w", format=fmt, options=options or {}) as dst:
        stream = dst.add_stream(codec, rate=rate, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="mono", rate=rate)
        for start in range(0, seconds, 10):
            n = min(10, seconds - start) * rate
            t = (np.arange(n) + start * rate) / rate
            x = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
            frame.rate = rate
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    dst.mux(packet)
        for resampled in [*resampler.resample(None), None]:
            for packet in stream.encode(resampled):
                dst.mux(packet)
    return out.getvalue()


def live_webm(seconds: int) -> bytes:
    """Opus in WebM as a browser's MediaRecorder writes it: no duration anywhere in the container."""
    return encoded_tone(seconds=seconds, fmt="webm", codec="libopus", rate=48_000, options={"live": "1"})


_MEASURE = """
import json, sys, time
from speech.audio import decode_audio
data = open(sys.argv[1], "rb").read()
kwargs = json.loads(sys.argv[2])
def memory(field):  # this process's own counters (ru_maxrss would count the parent's before exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
before = memory("VmRSS")
started = time.monotonic()
result = {}
try:
    audio = decode_audio(data, **kwargs)
    result["output_bytes"] = audio.samples.nbytes
    result["duration_s"] = audio.duration_s
except Exception as exc:
    result["error"] = type(exc).__name__
    result["code"] = getattr(exc, "code", "")
    result["message"] = str(exc)
result["seconds"] = time.monotonic() - started
result["growth_bytes"] = memory("VmHWM") - before
print(json.dumps(result))
"""


def decode_in_fresh_process(path: Path, **kwargs: float) -> dict:
    """Decode ``path`` in a new interpreter and report its peak RSS growth while decoding."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), json.dumps(kwargs)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- Sample rates --------------------------------------------------------------------------------


def test_a_1_hz_wav_is_refused_at_once_without_making_an_hour_of_audio(tmp_path: Path) -> None:
    # Given the 7 KB upload of the report: 3,600 samples whose header claims 1 Hz (one hour).
    wav = pcm_wav(rate=1, samples=3600)
    assert len(wav) < 8 * 1024
    path = tmp_path / "one-hertz.wav"
    path.write_bytes(wav)

    # When a worker decodes it with the service's duration limit
    report = decode_in_fresh_process(path, max_duration_s=10_800)

    # Then it is refused as unsupported media, naming the rate, quickly and with no hour of samples.
    assert (report["error"], report["code"]) == ("UnsupportedMedia", "UNSUPPORTED_MEDIA")
    assert "1 Hz" in report["message"]
    assert "8000-192000 Hz" in report["message"]
    assert report["seconds"] < 1.0
    assert report["growth_bytes"] < HOUR_OF_OUTPUT / 20, report


@pytest.mark.parametrize("rate", [1, 4_000, 7_999, 192_001, 384_000])
def test_declared_sample_rates_outside_8_to_192_khz_are_refused(rate: int) -> None:
    wav = pcm_wav(rate=rate, samples=4_000)

    for check in (probe_audio, decode_audio, sniff_extension):
        with pytest.raises(UnsupportedMedia) as excinfo:
            check(wav)
        assert excinfo.value.http_status == 415
        assert f"{rate} Hz" in excinfo.value.message
        assert excinfo.value.details == [{"field": "file", "message": excinfo.value.message}]


@pytest.mark.parametrize("rate", [8_000, 192_000])
def test_the_edges_of_the_rate_range_decode_at_their_real_length(rate: int) -> None:
    decoded = decode_audio(pcm_wav(rate=rate, samples=rate // 2))

    assert decoded.duration_s == pytest.approx(0.5, abs=0.01)
    assert float(np.max(np.abs(decoded.samples))) > 0.05


# --- Containers and codecs -----------------------------------------------------------------------

FFCONCAT = b"ffconcat version 1.0\nfile 'https://attacker.invalid/a.wav'\nfile '/etc/passwd'\n"
WEBVTT = b"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nhello\n"


def _mkv_with_aac() -> bytes:
    return encoded_tone(seconds=1, fmt="matroska", codec="aac")


def _wav_with_mp3() -> bytes:
    return encoded_tone(seconds=1, fmt="wav", codec="libmp3lame")


@pytest.mark.parametrize(
    ("make", "ffmpeg_would_open_as"),
    [
        pytest.param(lambda: FFCONCAT, None, id="ffconcat"),
        pytest.param(lambda: WEBVTT, "webvtt", id="webvtt"),
        pytest.param(_png, "png_pipe", id="png"),
        pytest.param(lambda: b"#EXTM3U\n#EXTINF:10,\nhttp://attacker.invalid/a.ts\n", None, id="hls-playlist"),
        pytest.param(_mkv_with_aac, "matroska,webm", id="matroska-aac"),
        pytest.param(_wav_with_mp3, "wav", id="wav-carrying-mp3"),
    ],
)
def test_formats_and_codecs_outside_the_allow_list_are_refused(make, ffmpeg_would_open_as: str | None) -> None:
    data = make()
    if ffmpeg_would_open_as is not None:  # left to itself, FFmpeg parses this upload
        with av.open(io.BytesIO(data)) as container:
            assert container.format.name == ffmpeg_would_open_as

    for check in (probe_audio, decode_audio):
        with pytest.raises(UnsupportedMedia) as excinfo:
            check(data)
        assert excinfo.value.code == "UNSUPPORTED_MEDIA"
        assert "not supported" in excinfo.value.message


def test_webm_opus_is_accepted_and_decodes_at_its_length() -> None:
    for data in (encoded_tone(seconds=3, fmt="webm", codec="libopus", rate=48_000), live_webm(3)):
        decoded = decode_audio(data)

        assert decoded.container == "webm" == sniff_extension(data)
        assert decoded.duration_s == pytest.approx(3.0, abs=0.05)


# --- Duration before decoding --------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "codec"), [("flac", "flac"), ("ipod", "aac"), ("mp3", "libmp3lame"), ("ogg", "libopus")])
def test_a_declared_duration_over_the_limit_is_refused_before_decoding(fmt: str, codec: str) -> None:
    data = encoded_tone(seconds=20, fmt=fmt, codec=codec, rate=48_000 if codec == "libopus" else SAMPLE_RATE)

    assert probe_audio(data).duration_s == pytest.approx(20, abs=0.2)
    with pytest.raises(AudioTooLong) as excinfo:
        decode_audio(data, max_duration_s=10)
    # The whole length is in the message: it came from the container, not from decoding 10 s.
    assert re.search(r"is 20\.\d s long", excinfo.value.message), excinfo.value.message
    assert (excinfo.value.code, excinfo.value.http_status) == ("VALIDATION_ERROR", 422)
    with pytest.raises(AudioOverBudget) as excinfo:
        probe_audio(data, budget_s=5)
    assert (excinfo.value.code, excinfo.value.http_status) == ("BUDGET_EXCEEDED", 429)
    assert "5.0 s of the budget are left" in excinfo.value.message


def test_a_wav_is_measured_by_the_bytes_it_holds_not_by_what_its_header_claims() -> None:
    # A header claiming an hour of 16 kHz data, with one second present (a lying or cut-short file).
    wav = pcm_wav(rate=SAMPLE_RATE, samples=SAMPLE_RATE, declared_bytes=3600 * SAMPLE_RATE * 2)

    assert probe_audio(wav, max_duration_s=60).duration_s == pytest.approx(1.0)
    assert decode_audio(wav, max_duration_s=60).duration_s == pytest.approx(1.0, abs=0.01)


def test_without_a_declared_duration_decoding_stops_at_the_limit() -> None:
    data = live_webm(30)
    assert probe_audio(data).duration_s is None

    with pytest.raises(AudioTooLong) as too_long:
        decode_audio(data, max_duration_s=5)
    with pytest.raises(AudioOverBudget) as over_budget:
        decode_audio(data, max_duration_s=60, budget_s=3)

    # Decoding stopped within a frame (20 ms of opus) of the limit, not at the end of the 30 s.
    for excinfo, limit in ((too_long, 5), (over_budget, 3)):
        stopped_at = float(excinfo.value.message.split("runs past ")[1].split(" s")[0])
        assert limit <= stopped_at <= limit + 0.1, excinfo.value.message


@pytest.mark.slow
def test_a_30_minute_file_over_the_limit_is_refused_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "long.flac"
    path.write_bytes(encoded_tone(seconds=1800, fmt="flac", codec="flac"))

    report = decode_in_fresh_process(path, max_duration_s=600)

    assert (report["error"], report["code"]) == ("AudioTooLong", "VALIDATION_ERROR")
    assert "1800.0 s long" in report["message"]
    assert report["seconds"] < 0.5  # decoding the file takes seconds
    assert report["growth_bytes"] < 16 * 1024 * 1024, report


# --- Memory --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "make", "overhead"),
    [
        # FLAC declares its length: the buffer is sized once.
        pytest.param("long.flac", lambda: encoded_tone(seconds=1800, fmt="flac", codec="flac"), 1.10, id="flac-30-min"),
        # A live WebM declares none: the buffer grows in place by a quarter at a time.
        pytest.param("long.webm", lambda: live_webm(600), 1.35, id="live-webm-10-min"),
    ],
)
def test_decoding_memory_grows_with_the_output_only(tmp_path: Path, name: str, make, overhead: float) -> None:
    path = tmp_path / name
    path.write_bytes(make())

    report = decode_in_fresh_process(path, max_duration_s=10_800)

    # 16 kHz float32 is 64 KB a second; a list of frames joined at the end used to take twice that.
    assert "error" not in report, report
    assert report["output_bytes"] == pytest.approx(report["duration_s"] * SAMPLE_RATE * 4)
    assert report["growth_bytes"] < report["output_bytes"] * overhead + 8 * 1024 * 1024, report
