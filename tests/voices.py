"""Real test audio: speech synthesized by espeak-ng, format conversion, and word error rate.

Synthesis is cached on disk by a hash of its arguments, so a test run pays for espeak-ng once per
distinct utterance. Transcripts are compared by word error rate after Whisper's English
normalizer, never as exact strings: a correct transcript may differ in punctuation or numerals.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import av
import numpy as np

DEFAULT_SPEECH_CACHE = Path("~/.cache/scaiecho/test-speech")


def synth_speech(
    text: str,
    *,
    voice: str = "en-us",
    speed: int = 150,
    pitch: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> bytes:
    """Return WAV bytes (22.05 kHz mono s16) of espeak-ng saying ``text``."""
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_SPEECH_CACHE).expanduser()
    args = ["-v", voice, "-s", str(speed)]
    if pitch is not None:
        args += ["-p", str(pitch)]
    key = hashlib.sha256("\0".join([*args, text]).encode()).hexdigest()[:24]
    path = cache / f"{key}.wav"
    if path.is_file():
        return path.read_bytes()
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install -y espeak-ng")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=cache)
    os.close(fd)
    try:
        # "--" so a text starting with "-" is not read as an option.
        subprocess.run([espeak, *args, "-w", tmp, "--", text], check=True, capture_output=True)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path.read_bytes()


# format -> (PyAV muxer, encoder, sample rate or None to keep the source's)
_ENCODERS = {
    "wav": ("wav", "pcm_s16le", None),
    "mp3": ("mp3", "libmp3lame", None),
    "flac": ("flac", "flac", None),
    "ogg": ("ogg", "libopus", 48_000),  # what browsers record; opus only runs at 48 kHz
    "m4a": ("ipod", "aac", None),  # "ipod" is FFmpeg's muxer for .m4a
}


def convert_audio(wav_bytes: bytes, fmt: str) -> bytes:
    """Re-encode ``wav_bytes`` as ``fmt`` (wav, mp3, flac, ogg, m4a) with PyAV's encoders.

    PyAV rather than sox, because Debian's sox has no mp3 or AAC encoder.
    """
    muxer, codec, rate = _ENCODERS[fmt]
    out = io.BytesIO()
    with av.open(io.BytesIO(wav_bytes)) as src, av.open(out, "w", format=muxer) as dst:
        in_stream = src.streams.audio[0]
        stream = dst.add_stream(codec, rate=rate or in_stream.rate, layout="mono")
        sample_format = stream.codec_context.codec.audio_formats[0].name
        resampler = av.AudioResampler(format=sample_format, layout="mono", rate=stream.rate)
        frames = [f for frame in src.decode(in_stream) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
        for frame in [*frames, None]:
            for packet in stream.encode(frame):
                dst.mux(packet)
    return out.getvalue()


def silence_wav(*, seconds: float, rate: int = 16_000) -> bytes:
    """WAV bytes of digital silence."""
    out = io.BytesIO()
    with av.open(out, "w", format="wav") as dst:
        stream = dst.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame(format="s16", layout="mono", samples=int(seconds * rate))
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            dst.mux(packet)
    return out.getvalue()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after Whisper's English normalizer
    (the service's own measure, which consent verification uses)."""
    from speakers.verification import word_error_rate as service_word_error_rate

    return service_word_error_rate(reference, hypothesis, language="en")


# --- Real recorded speech ---------------------------------------------------------------------------
# Human voices from Debian packages (see ../shared/models.md), for what synthetic voices cannot
# show: speaker-verification thresholds are far lower for real people than for espeak-ng voices.

POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
REAL_SPEECH_PACKAGES = "pocketsphinx-testdata alsa-utils"

# speaker -> recordings, each a list of files joined into one segment (the ALSA and card clips are
# single words or phrases of 1-2 s, too short for a voice profile on their own). Four people:
# a LibriVox reader; the voice of ALSA's channel test; the pocketsphinx "cards" speaker; and
# David Huggins-Daines (pocketsphinx's maintainer), whose raw 16 kHz s16le test commands and
# TIDIGITS utterance ("dhd") are one voice by ear and by embedding (cosine 0.53-0.67).
REAL_SPEAKERS: dict[str, list[list[str]]] = {
    "librivox": [
        [f"librivox/sense_and_sensibility_01_austen_64kb-{n}.wav"] for n in ("0870", "0880", "0890", "0920", "0930")
    ],
    "alsa": [
        ["Front_Center.wav", "Front_Left.wav", "Front_Right.wav"],
        ["Rear_Center.wav", "Rear_Left.wav", "Rear_Right.wav"],
        ["Side_Left.wav", "Side_Right.wav"],
    ],
    "cards": [["cards/001.wav", "cards/002.wav"], ["cards/003.wav", "cards/004.wav"], ["cards/005.wav"]],
    "dhd": [["goforward.raw"], ["numbers.raw"], ["something.raw"], ["tidigits/dhd.2934z.raw"]],
}


def _real_file(name: str) -> np.ndarray:
    from speech.audio import decode_audio

    path = (ALSA_SOUNDS if name[0].isupper() else POCKETSPHINX_DATA) / name
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: apt-get install -y {REAL_SPEECH_PACKAGES}")
    if path.suffix == ".raw":  # headerless 16 kHz mono s16le
        return np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
    return decode_audio(path.read_bytes()).samples


def real_speech() -> dict[str, list[np.ndarray]]:
    """Recordings of four real people as 16 kHz mono float32, by speaker (see ``REAL_SPEAKERS``)."""
    return {
        speaker: [np.concatenate([_real_file(name) for name in files]) for files in segments]
        for speaker, segments in REAL_SPEAKERS.items()
    }


def librivox_clips(numbers: tuple[str, ...] = ("0870", "0890", "0920", "0930")) -> list[tuple[np.ndarray, str]]:
    """LibriVox clips of ``pocketsphinx-testdata`` (one real reader) with their transcripts."""
    from speech.audio import decode_audio

    folder = POCKETSPHINX_DATA / "librivox"
    transcripts = {}
    for line in (folder / "transcription").read_text().splitlines():
        text, _, name = line.rpartition("(")
        transcripts[name.strip(" )")] = text.replace("<s>", "").replace("</s>", "").strip()
    clips = []
    for number in numbers:
        name = f"sense_and_sensibility_01_austen_64kb-{number}"
        clips.append((decode_audio((folder / f"{name}.wav").read_bytes()).samples, transcripts[name]))
    return clips


def assert_hyphenated_word_is_one_word(decoder: Any) -> None:
    """``decoder`` (an engine or its stream decoder) hears the LibriVox clip "unless to be rather
    cold hearted and rather selfish is to be ill disposed" with "cold-hearted" as one word, no word
    beginning with a hyphen, and its words joined with spaces as its text."""
    from speech.engines.base import TranscribeOptions

    ((samples, _),) = librivox_clips(("0890",))
    result = decoder.transcribe(samples, options=TranscribeOptions(language="en", word_timestamps=True, beam_size=5))

    words = [w.word for seg in result.segments for w in seg.words or []]
    assert "cold-hearted" in words, words
    assert not any(w.startswith("-") for w in words), words
    assert " ".join(words) == result.text, (words, result.text)
