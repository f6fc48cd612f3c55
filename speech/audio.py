"""Decoding uploaded audio into what Whisper eats: 16 kHz mono float32.

PyAV (FFmpeg's libraries inside its wheel) decodes from memory: openai-whisper's own
``load_audio`` shells out to an ``ffmpeg`` binary that a fresh machine lacks, and a subprocess per
upload is slower. Uploads are untrusted, so FFmpeg is held to a small part of itself:

- The container is recognised here, by its magic bytes (never by the client's file name or
  Content-Type), and FFmpeg is told which demuxer to use. FFmpeg's own probing, and with it the
  long tail of demuxers an upload could otherwise reach (ffconcat playlists, subtitles, image
  pipes...), never runs. Only the codecs listed for each container in :data:`CONTAINERS` decode.
- A declared sample rate outside :data:`MIN_SAMPLE_RATE`-:data:`MAX_SAMPLE_RATE` is refused before
  anything is decoded or resampled (a WAV claiming 1 Hz would otherwise turn 3,600 samples into
  an hour of 16 kHz audio).
- The duration is read from the container (header arithmetic for PCM WAV) before decoding and
  checked against the caller's limits; where the container does not say, decoding stops as soon
  as the decoded duration passes them.
- Decoded frames are resampled one at a time into one growing float32 buffer, so memory grows
  with the output and nothing else.

Unreadable or refused input is :class:`speech.errors.UnsupportedMedia` (HTTP 415): a caller never
has to know which of FFmpeg's many errors an odd file provokes. Audio over ``max_duration_s`` is
:class:`~speech.errors.AudioTooLong` (422), over ``budget_s`` :class:`~speech.errors.AudioOverBudget`
(429). Nothing here imports Django.
"""

from __future__ import annotations

import io
import math
import struct
import wave
from dataclasses import dataclass

import av
import numpy as np

from speech.errors import AudioOverBudget, AudioTooLong, UnsupportedMedia

# The one sample rate of the service: every decoder, model and stream works on 16 kHz mono float32.
SAMPLE_RATE = 16_000

# Declared sample rates outside this range are a lie or not speech; refused before decoding.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000


@dataclass(frozen=True)
class Container:
    """One accepted container: the FFmpeg demuxer forced on it and the codecs it may carry."""

    demuxer: str
    codecs: frozenset[str]  # FFmpeg's canonical codec names (``mp3``, not the decoder ``mp3float``)


_PCM_CODECS = frozenset(
    {"pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le", "pcm_alaw", "pcm_mulaw"}
)

# The extension this service reports and stages files under -> how it is opened.
CONTAINERS: dict[str, Container] = {
    "wav": Container("wav", _PCM_CODECS | {"adpcm_ms", "adpcm_ima_wav"}),
    "mp3": Container("mp3", frozenset({"mp3"})),
    "flac": Container("flac", frozenset({"flac"})),
    "ogg": Container("ogg", frozenset({"opus", "vorbis", "flac"})),
    # One demuxer serves mov/mp4/m4a; an mp4 is accepted only for its audio track.
    "m4a": Container("mov", frozenset({"aac", "alac"})),
    "webm": Container("matroska", frozenset({"opus", "vorbis"})),
}

_SUPPORTED_LIST = "wav, mp3, flac, ogg (opus, vorbis), m4a (aac, alac) or webm (opus, vorbis)"

# Decoded audio grows its buffer by at least this many samples (and by a quarter of itself).
_GROW_SAMPLES = 30 * SAMPLE_RATE


@dataclass(frozen=True)
class DecodedAudio:
    """Audio ready for a speech model."""

    samples: np.ndarray  # float32, mono, SAMPLE_RATE Hz, values in [-1, 1]
    duration_s: float
    container: str  # one of CONTAINERS' keys, e.g. "wav" or "m4a"


@dataclass(frozen=True)
class AudioInfo:
    """What the container says about an upload, read before any audio is decoded."""

    container: str  # one of CONTAINERS' keys
    codec: str
    sample_rate: int
    duration_s: float | None  # None when the container does not say (a live-recorded webm)


def probe_audio(
    data: bytes, *, max_duration_s: float | None = None, budget_s: float | None = None
) -> AudioInfo:
    """Check ``data``'s container, codec, sample rate and declared duration without decoding.

    Raises what :func:`decode_audio` would raise for the same limits, as far as the headers tell:
    ``UnsupportedMedia``, ``AudioTooLong`` (the declared duration is over ``max_duration_s``) or
    ``AudioOverBudget`` (over ``budget_s``). Cheap: only headers (and, for Ogg, the last page) are read.
    """
    container, info = _open(data, max_duration_s=max_duration_s, budget_s=budget_s)
    container.close()
    return info


def sniff_extension(data: bytes) -> str:
    """Return the extension (``"wav"``, ``"mp3"``, ...) to stage an upload under.

    Only the headers are probed: this checks that the upload is a supported container and codec
    with an audio track at a sane rate, not that every frame decodes (``decode_audio`` does that).
    """
    return probe_audio(data).container


def decode_audio(
    data: bytes, *, max_duration_s: float | None = None, budget_s: float | None = None
) -> DecodedAudio:
    """Decode ``data`` (a whole file in memory) to 16 kHz mono float32.

    Raises ``UnsupportedMedia`` for anything that is not one of the supported containers and codecs
    with a decodable audio track at a supported rate, including empty, truncated-to-nothing and
    corrupt input. A file cut short after some whole frames decodes to the part that is there (as
    any player would play it). Audio longer than ``max_duration_s`` raises ``AudioTooLong`` and
    audio longer than ``budget_s`` (what is left of the caller's budget) ``AudioOverBudget``:
    before decoding when the container declares its duration, else as soon as the decoded audio
    passes the limit, so a small, highly compressed upload cannot make the process allocate hours
    of samples.
    """
    container, info = _open(data, max_duration_s=max_duration_s, budget_s=budget_s)
    try:
        samples = _decode_first_audio_stream(
            container, info=info, max_duration_s=max_duration_s, budget_s=budget_s
        )
    except (UnsupportedMedia, AudioTooLong, AudioOverBudget, MemoryError):
        raise
    except Exception as exc:  # arbitrary bytes parsed in C: any failure is the input's fault
        raise UnsupportedMedia(f"The {info.container} audio could not be decoded: {exc}") from exc
    finally:
        container.close()
    if samples.size == 0:
        raise UnsupportedMedia(f"The {info.container} file contains no audio samples.")
    return DecodedAudio(samples=samples, duration_s=samples.size / SAMPLE_RATE, container=info.container)


# --- Opening: container, codec, rate and duration from the headers -------------------------------


def sniff_container(data: bytes) -> str | None:
    """The :data:`CONTAINERS` key ``data``'s magic bytes name, or ``None`` for anything else."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska, of which WebM is a profile
        return "webm"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "m4a"
    if head[:3] == b"ID3":  # an ID3v2 tag, then usually MP3 frames (sometimes FLAC)
        end = 10 + _syncsafe(data[6:10]) + (10 if len(data) > 5 and data[5] & 0x10 else 0)
        if data[end : end + 4] == b"fLaC":
            return "flac"
        # Encoders may pad after the tag: the first frame is looked for a little further on.
        window = data[end : end + _ID3_PADDING_SCAN]
        return "mp3" if any(_is_mpeg_audio_layer3(window[i : i + 3]) for i in _sync_candidates(window)) else None
    return "mp3" if _is_mpeg_audio_layer3(head) else None


_ID3_PADDING_SCAN = 64 * 1024


def _syncsafe(raw: bytes) -> int:
    value = 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
    return value


def _sync_candidates(window: bytes) -> list[int]:
    candidates, start = [], window.find(b"\xff")
    while start != -1 and len(candidates) < 64:
        candidates.append(start)
        start = window.find(b"\xff", start + 1)
    return candidates


def _is_mpeg_audio_layer3(head: bytes) -> bool:
    # 11 sync bits, a valid MPEG version, layer III, a bitrate that is not "free" or "bad", a valid rate.
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer, bitrate, rate = (head[1] >> 3) & 3, (head[1] >> 1) & 3, head[2] >> 4, (head[2] >> 2) & 3
    return version != 1 and layer == 1 and bitrate not in (0, 15) and rate != 3


def _refused(message: str) -> UnsupportedMedia:
    return UnsupportedMedia(message, details=[{"field": "file", "message": message}])


def _open(
    data: bytes, *, max_duration_s: float | None, budget_s: float | None
) -> tuple[av.container.InputContainer, AudioInfo]:
    if not data:
        raise _refused("The upload is empty.")
    name = sniff_container(data)
    if name is None:
        raise _refused(f"This content is not supported: send {_SUPPORTED_LIST}.")
    spec = CONTAINERS[name]
    try:
        container = av.open(io.BytesIO(data), mode="r", format=spec.demuxer, metadata_errors="replace")
    except MemoryError:
        raise
    except Exception as exc:
        raise _refused(f"The {name} file could not be read.") from exc
    try:
        info = _inspect(container, name=name, spec=spec, data=data)
        _check_duration(info.duration_s, max_duration_s=max_duration_s, budget_s=budget_s)
    except BaseException:
        container.close()
        raise
    return container, info


def _inspect(container: av.container.InputContainer, *, name: str, spec: Container, data: bytes) -> AudioInfo:
    if not container.streams.audio:
        raise _refused(f"The {name} file has no audio track.")
    stream = container.streams.audio[0]
    codec = stream.codec_context.codec.canonical_name
    if codec not in spec.codecs:
        allowed = ", ".join(sorted(spec.codecs))
        raise _refused(f"Audio coded as {codec!r} is not supported in {name}; use {allowed}.")
    rate = int(stream.codec_context.sample_rate or 0)
    _check_rate(rate)
    if name == "wav" and codec in _PCM_CODECS:
        duration = _wav_pcm_duration(data)
    elif stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = None
    return AudioInfo(container=name, codec=codec, sample_rate=rate, duration_s=duration)


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise _refused(
            f"The audio declares a sample rate of {rate} Hz; "
            f"supported rates are {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz."
        )


def _check_duration(
    seconds: float | None, *, max_duration_s: float | None, budget_s: float | None, declared: bool = True
) -> None:
    """Refuse ``seconds`` of audio over a limit; ``declared`` is False while decoding, when only
    the part decoded so far is known."""
    if seconds is None:
        return
    length = f"is {seconds:.1f} s long" if declared else f"runs past {seconds:.1f} s (decoding stopped there)"
    if max_duration_s is not None and seconds > max_duration_s:
        raise AudioTooLong(
            f"The audio {length}; this service accepts at most {max_duration_s:g} s.",
            details=[{"field": "file", "message": f"Audio longer than {max_duration_s:g} s."}],
        )
    if budget_s is not None and seconds > budget_s:
        raise AudioOverBudget(f"The audio {length}; {max(budget_s, 0.0):.1f} s of the budget are left.")


def _wav_pcm_duration(data: bytes) -> float | None:
    """A PCM WAV's duration from its header and the bytes actually present (a header may claim
    more data than arrived, or an unknown size, as streaming writers leave it)."""
    offset, block_align, rate, data_size, ds64_size = 12, 0, 0, None, None
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if chunk == b"fmt " and size >= 16 and body + 16 <= len(data):
            rate = struct.unpack_from("<I", data, body + 4)[0]
            block_align = struct.unpack_from("<H", data, body + 12)[0]
        elif chunk == b"ds64" and body + 24 <= len(data):  # RF64: the real 64-bit data size
            ds64_size = struct.unpack_from("<Q", data, body + 8)[0]
        elif chunk == b"data":
            available = len(data) - body
            declared = ds64_size if size == 0xFFFFFFFF and ds64_size is not None else size
            data_size = available if declared in (0, 0xFFFFFFFF) else min(declared, available)
            break
        offset = body + size + (size & 1)
    if data_size is None or not block_align or not rate:
        return None
    return (data_size // block_align) / rate


# --- Decoding: frame by frame into one buffer -----------------------------------------------------


class _Samples:
    """A float32 buffer that grows in place (``ndarray.resize``: realloc, so large buffers move by
    remapping pages instead of copying) and ends exactly as long as what was written."""

    def __init__(self, capacity: int) -> None:
        self.array = np.empty(max(capacity, 1), dtype=np.float32)
        self.size = 0

    def append(self, chunk: np.ndarray) -> None:
        end = self.size + chunk.size
        if end > self.array.size:
            self.array.resize(max(end + _GROW_SAMPLES, self.array.size * 5 // 4), refcheck=False)
        self.array[self.size : end] = chunk
        self.size = end

    def finish(self) -> np.ndarray:
        self.array.resize(self.size, refcheck=False)
        return self.array


def _decode_first_audio_stream(
    container: av.container.InputContainer,
    *,
    info: AudioInfo,
    max_duration_s: float | None,
    budget_s: float | None,
) -> np.ndarray:
    stream = container.streams.audio[0]
    limits = [limit for limit in (max_duration_s, budget_s) if limit is not None]
    limit_s = min(limits) if limits else None
    expected_s = info.duration_s if info.duration_s is not None else 0.0
    if limit_s is not None:
        expected_s = min(expected_s, limit_s)
    # Room for the declared duration (np.empty maps pages lazily: a lying header costs no memory).
    out = _Samples(math.ceil(expected_s * SAMPLE_RATE) + SAMPLE_RATE if expected_s else _GROW_SAMPLES)
    resampler: av.AudioResampler | None = None
    resampler_rate = 0
    decoded_s = 0.0

    def collect(frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            out.append(frame.to_ndarray().reshape(-1))

    for frame in container.decode(stream):
        _check_rate(frame.sample_rate)  # a stream may change its rate mid-way
        decoded_s += frame.samples / frame.sample_rate
        if limit_s is not None and decoded_s > limit_s:
            # Never resample or keep audio past the limit: the duration check the header could not make.
            _check_duration(decoded_s, max_duration_s=max_duration_s, budget_s=budget_s, declared=False)
        if resampler is None or frame.sample_rate != resampler_rate:
            if resampler is not None:
                collect(resampler.resample(None))
            # Packed float output: FFmpeg scales s16/s32 to [-1, 1) and downmixes to mono for us.
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            resampler_rate = frame.sample_rate
        collect(resampler.resample(frame))
    if resampler is not None:
        collect(resampler.resample(None))  # flush the resampler's delay line

    samples = out.finish()
    # Float sources can exceed full scale; the contract (and Whisper's training data) is [-1, 1].
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples


# --- PCM helpers ----------------------------------------------------------------------------------


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


# --- Channel simulation ----------------------------------------------------------------------------

# The telephone band (ITU-T G.712): what survives an 8 kHz line.
PHONE_BAND_HZ = (300, 3400)


def phone_band(samples: np.ndarray) -> np.ndarray:
    """What a telephone line does to 16 kHz audio: down to 8 kHz, 300-3400 Hz, back to 16 kHz.

    The same length as ``samples``, float32 in [-1, 1]. A speaker's reference recording goes
    through it at enrollment (a phone-band reference for callers), and the test conversations'
    phone-band copies are made by it.
    """
    from scipy import signal

    narrow = signal.resample_poly(np.asarray(samples, dtype=np.float32), 1, 2)
    sos = signal.butter(8, list(PHONE_BAND_HZ), btype="bandpass", fs=SAMPLE_RATE // 2, output="sos")
    narrow = signal.sosfiltfilt(sos, narrow)
    return np.clip(signal.resample_poly(narrow, 2, 1), -1.0, 1.0).astype(np.float32)[: samples.size]
