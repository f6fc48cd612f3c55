"""Decoding uploaded audio into what Whisper eats: 16 kHz mono float32.

PyAV (FFmpeg's libraries inside its wheel) decodes from memory: openai-whisper's own
``load_audio`` shells out to an ``ffmpeg`` binary that a fresh machine lacks, and a subprocess per
upload is slower. The container is recognised by content, never by the client's file name or
Content-Type, and only the containers listed in :data:`SUPPORTED_CONTAINERS` are accepted, so that
FFmpeg's long tail of demuxers (images, playlists, subtitles...) is not reachable from an upload.

Every failure is reported as :class:`speech.errors.UnsupportedMedia` (HTTP 415): a caller
never has to know which of FFmpeg's many errors an odd file provokes. Nothing here imports Django.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import av
import numpy as np

from speech.errors import AudioTooLong, UnsupportedMedia

# The one sample rate of the service: every decoder, model and stream works on 16 kHz mono float32.
SAMPLE_RATE = 16_000

# FFmpeg demuxer name -> the extension this service reports and stages files under.
SUPPORTED_CONTAINERS: dict[str, str] = {
    "wav": "wav",
    "mp3": "mp3",
    "flac": "flac",
    "ogg": "ogg",
    # One demuxer serves mov/mp4/m4a; an mp4 is accepted only for its audio track.
    "mov,mp4,m4a,3gp,3g2,mj2": "m4a",
}

_SUPPORTED_LIST = "wav, mp3, flac, ogg, m4a"


@dataclass(frozen=True)
class DecodedAudio:
    """Audio ready for a speech model."""

    samples: np.ndarray  # float32, mono, SAMPLE_RATE Hz, values in [-1, 1]
    duration_s: float
    container: str  # one of SUPPORTED_CONTAINERS' values, e.g. "wav" or "m4a"


def decode_audio(data: bytes, *, max_duration_s: float | None = None) -> DecodedAudio:
    """Decode ``data`` (a whole file in memory) to 16 kHz mono float32.

    Raises ``UnsupportedMedia`` for anything that is not one of the supported containers with a
    decodable audio track, including empty, truncated-to-nothing and corrupt input. A file cut
    short after some whole frames decodes to the part that is there (as any player would play it).
    With ``max_duration_s`` decoding stops early with ``AudioTooLong`` (422) once the audio is longer,
    so a small, highly compressed upload cannot make the process allocate hours of samples.
    """
    container, extension = _open(data)
    try:
        samples = _decode_first_audio_stream(container, max_duration_s=max_duration_s)
    except (UnsupportedMedia, AudioTooLong):
        raise
    except MemoryError:
        raise
    except Exception as exc:  # arbitrary bytes parsed in C: any failure is the input's fault
        raise UnsupportedMedia(f"The {extension} audio could not be decoded: {exc}") from exc
    finally:
        container.close()
    if samples.size == 0:
        raise UnsupportedMedia(f"The {extension} file contains no audio samples.")
    return DecodedAudio(samples=samples, duration_s=samples.size / SAMPLE_RATE, container=extension)


def sniff_extension(data: bytes) -> str:
    """Return the extension (``"wav"``, ``"mp3"``, ...) to stage an upload under.

    Only the container header is probed: this is cheap and checks that the upload is a supported
    container with an audio track, but not that every frame decodes (``decode_audio`` does that).
    """
    container, extension = _open(data)
    container.close()
    return extension


def _open(data: bytes) -> tuple[av.container.InputContainer, str]:
    if not data:
        raise UnsupportedMedia("The upload is empty.")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="replace")
    except MemoryError:
        raise
    except Exception as exc:
        raise UnsupportedMedia(
            f"The content is not audio in a supported format ({_SUPPORTED_LIST})."
        ) from exc
    format_name = container.format.name
    extension = SUPPORTED_CONTAINERS.get(format_name)
    if extension is None:
        container.close()
        raise UnsupportedMedia(
            f"Content of type {format_name!r} is not supported; send {_SUPPORTED_LIST}."
        )
    if not container.streams.audio:
        container.close()
        raise UnsupportedMedia(f"The {extension} file has no audio track.")
    return container, extension


def _decode_first_audio_stream(
    container: av.container.InputContainer, *, max_duration_s: float | None
) -> np.ndarray:
    stream = container.streams.audio[0]
    # Packed float output: FFmpeg scales s16/s32 to [-1, 1) and downmixes to mono for us.
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    limit = None if max_duration_s is None else int(max_duration_s * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0

    def collect(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for frame in frames:
            chunk = frame.to_ndarray().reshape(-1)
            chunks.append(chunk)
            total += chunk.size
        if limit is not None and total > limit:
            raise AudioTooLong(
                f"The audio is longer than the {max_duration_s:g} s this service accepts.",
                details=[{"field": "file", "message": f"Audio longer than {max_duration_s:g} s."}],
            )

    for frame in container.decode(stream):
        collect(resampler.resample(frame))
    collect(resampler.resample(None))  # flush the resampler's delay line

    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    samples = samples.astype(np.float32, copy=False)
    # Float sources can exceed full scale; the contract (and Whisper's training data) is [-1, 1].
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples


def pcm_to_float(raw: bytes | bytearray | memoryview, *, sample_format: str = "s16", channels: int = 1) -> np.ndarray:
    """Interleaved PCM bytes (a whole number of sample frames) as mono float32."""
    if sample_format == "u8":
        values = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif sample_format == "s16":
        values = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif sample_format == "s24":
        triplets = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        packed = triplets[:, 0] | (triplets[:, 1] << 8) | (triplets[:, 2] << 16)
        values = ((packed << 8) >> 8).astype(np.float32) / 8388608.0  # sign-extend 24 -> 32 bits
    elif sample_format == "s32":
        values = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    elif sample_format == "f32":
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif sample_format == "f64":
        values = np.frombuffer(raw, dtype="<f8").astype(np.float32)
    else:  # pragma: no cover - formats are chosen from a fixed table
        raise AssertionError(sample_format)
    if channels > 1:
        values = values.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0)


def float_to_pcm(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM (what the stream worker is sent)."""
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, *, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono WAV of float samples, the format any transcription service accepts."""
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(float_to_pcm(samples))
    return out.getvalue()
