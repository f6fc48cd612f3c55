"""Real recorded human speech with exact reference text, for the benchmarks.

Two Debian packages carry it (see ``../shared/models.md``):

- ``pocketsphinx-testdata``: five LibriVox clips of one male reader (16 kHz, 3-7 s each, 26 s in
  all), transcripts in the file ``transcription`` beside them;
- ``asterisk-core-sounds-en-wav`` + ``asterisk-core-sounds-en``: the English Asterisk prompts, one
  professional female voice (8 kHz telephone audio, resampled here to 16 kHz), with their text in
  ``core-sounds-en.txt.gz``. Only whole sentences are used: prompts of at least three words, without
  bracketed sound descriptions or key symbols, 1-20 s long (about 20 minutes of distinct speech).

The LibriVox clips are always there (the tests need them); without the Asterisk prompts a long
benchmark repeats the same 26 s over and over, which says little, so the caller prints
:data:`INSTALL_HINT`. Clips are level-matched (same RMS over their speech) and joined with natural
short gaps. Nothing here imports Django.
"""

from __future__ import annotations

import gzip
import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from speech.audio import float_to_pcm, pcm_to_float

RATE = 16_000
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en")
ASTERISK_TEXT = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
INSTALL_HINT = "apt-get install -y pocketsphinx-testdata asterisk-core-sounds-en-wav asterisk-core-sounds-en"
_SPEECH_RMS = 0.08  # about -22 dBFS over the loud part of each clip
_FRAME = RATE // 50  # 20 ms
_LOUD = 0.01  # -40 dBFS frame RMS: where a clip's speech starts and ends


@dataclass(frozen=True)
class Clip:
    samples: np.ndarray  # 16 kHz mono float32
    text: str
    source: str  # "librivox" or "asterisk"
    speech: tuple[float, float]  # (start, end) of the speech inside the clip, seconds
    name: str = ""  # the file's stem, e.g. "auth-thankyou" or "sense_and_sensibility_01_austen_64kb-0870"

    @property
    def seconds(self) -> float:
        return self.samples.size / RATE


@dataclass(frozen=True)
class Recording:
    samples: np.ndarray
    text: str  # the reference: every clip's text in order
    spans: list[tuple[float, float]]  # each clip's speech, seconds into the recording
    texts: list[str]  # each clip's text
    distinct: int  # distinct clips used (fewer than len(spans) when the pool ran out)
    sources: dict[str, int]  # clips per source

    @property
    def seconds(self) -> float:
        return self.samples.size / RATE

    def pcm(self) -> bytes:
        return (np.clip(self.samples, -1, 1) * 32767).astype("<i2").tobytes()

    def wav(self) -> bytes:
        from speech.audio import wav_bytes

        return wav_bytes(self.samples)

    def describe(self) -> str:
        parts = ", ".join(f"{n} {src}" for src, n in sorted(self.sources.items()))
        repeats = len(self.spans) - self.distinct
        return (
            f"{self.seconds:.1f} s of real speech, {len(self.spans)} clips ({parts})"
            + (f", {repeats} of them repeats" if repeats else "")
            + f", {len(self.text.split())} reference words"
        )


def _read(path: Path) -> np.ndarray:
    from speech.audio import decode_audio

    return decode_audio(path.read_bytes()).samples


def _trimmed(samples: np.ndarray, text: str, source: str, name: str = "") -> Clip:
    """Level-match the clip and find where its speech is."""
    n = samples.size // _FRAME
    rms = np.sqrt(np.mean(samples[: n * _FRAME].reshape(n, _FRAME) ** 2, axis=1)) if n else np.zeros(0)
    loud = np.flatnonzero(rms > _LOUD)
    if loud.size:
        first, last = int(loud[0]) * _FRAME, (int(loud[-1]) + 1) * _FRAME
        gain = _SPEECH_RMS / max(float(np.sqrt(np.mean(samples[first:last] ** 2))), 1e-6)
    else:
        first, last, gain = 0, samples.size, 1.0
    out = np.clip(samples * gain, -1.0, 1.0).astype(np.float32)
    return Clip(out, text, source, (first / RATE, last / RATE), name)


def librivox() -> list[Clip]:
    listing = LIBRIVOX / "transcription"
    if not listing.is_file():
        raise RuntimeError(f"{listing} is missing: {INSTALL_HINT}")
    clips = []
    for line in listing.read_text().splitlines():
        m = re.match(r"<s>\s*(.*?)\s*</s>\s*\((\S+)\)", line.strip())
        if m:
            clips.append(_trimmed(_read(LIBRIVOX / f"{m.group(2)}.wav"), m.group(1), "librivox", m.group(2)))
    return clips


def asterisk() -> list[Clip]:
    """The English Asterisk prompts that are whole sentences (empty when not installed)."""
    if not (ASTERISK_SOUNDS.is_dir() and ASTERISK_TEXT.is_file()):
        return []
    clips = []
    for line in gzip.open(ASTERISK_TEXT, "rt", encoding="utf-8", errors="replace"):
        name, sep, text = line.partition(":")
        text = text.strip()
        # Top-level prompts only (the sub-folders are letters, digits, dictation keys), real words only.
        if not sep or "/" in name or line.startswith(";") or re.search(r"[\[\]*#@<>=+]", text):
            continue
        if len(text.split()) < 3:
            continue
        path = ASTERISK_SOUNDS / f"{name.strip()}.wav"
        if not path.is_file():
            continue
        samples = _read(path)
        if 1.0 <= samples.size / RATE <= 20.0:
            clips.append(_trimmed(samples, text, "asterisk", name.strip()))
    return clips


def asterisk_prompt(name: str) -> Clip:
    """One English Asterisk prompt by file name (``"auth-thankyou"``), short ones included."""
    for line in gzip.open(ASTERISK_TEXT, "rt", encoding="utf-8", errors="replace"):
        stem, sep, text = line.partition(":")
        if sep and stem.strip() == name:
            return _trimmed(_read(ASTERISK_SOUNDS / f"{name}.wav"), text.strip(), "asterisk", name)
    raise KeyError(f"no Asterisk prompt {name!r} in {ASTERISK_TEXT}")


@cache
def pool() -> tuple[Clip, ...]:
    """Every usable clip, LibriVox first."""
    return tuple(librivox() + asterisk())


def has_asterisk() -> bool:
    return any(c.source == "asterisk" for c in pool())


def _gap(rng: random.Random) -> np.ndarray:
    return np.zeros(int(rng.uniform(0.25, 0.7) * RATE), np.float32)


def recording(seconds: float, *, seed: int = 0, max_clip_s: float | None = None) -> Recording:
    """About ``seconds`` of clips in a shuffled order, joined with 0.25-0.7 s of silence.

    The pool is used up before any clip repeats; then it is shuffled again.
    """
    clips = [c for c in pool() if max_clip_s is None or c.seconds <= max_clip_s]
    rng = random.Random(seed)
    order: list[Clip] = []
    used: list[Clip] = []
    parts: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    pos = 0
    while pos < seconds * RATE:
        if not order:
            order = rng.sample(clips, len(clips))
        clip = order.pop()
        used.append(clip)
        spans.append((pos / RATE + clip.speech[0], pos / RATE + clip.speech[1]))
        gap = _gap(rng)
        parts += [clip.samples, gap]
        pos += clip.samples.size + gap.size
    return _recording(parts, used, spans)


def _recording(parts: list[np.ndarray], used: list[Clip], spans: list[tuple[float, float]]) -> Recording:
    sources: dict[str, int] = {}
    for c in used:
        sources[c.source] = sources.get(c.source, 0) + 1
    texts = [c.text for c in used]
    # As a WAV holds it (16-bit): the engines are measured on the very samples the API decodes
    # from the upload, so the API's overhead is not mixed with a different decode of other audio.
    samples = pcm_to_float(float_to_pcm(np.concatenate(parts)))
    return Recording(samples, " ".join(texts), spans, texts, len({id(c) for c in used}), sources)


def conversations(
    k: int, utterances: int, *, lead_s: float, gap_s: float, trail_s: float, offset: int = 0
) -> list[Recording]:
    """``k`` streams of ``utterances`` clips each (2-8 s long, like turns in a conversation), with
    ``lead_s`` of silence before the first, ``gap_s`` between and ``trail_s`` after the last. As far
    as the pool allows, no clip is spoken twice, neither within a stream nor across streams
    (``offset`` skips that many clips, for a stream unlike the others)."""
    clips = [c for c in pool() if 2.0 <= c.seconds <= 8.0] or list(pool())
    rng = random.Random(1)
    shuffled = rng.sample(clips, len(clips))
    out = []
    for j in range(k):
        picked = [shuffled[(offset + j * utterances + i) % len(shuffled)] for i in range(utterances)]
        parts = [np.zeros(int(lead_s * RATE), np.float32)]
        spans = []
        pos = parts[0].size
        for i, clip in enumerate(picked):
            spans.append((pos / RATE + clip.speech[0], pos / RATE + clip.speech[1]))
            parts.append(clip.samples)
            pos += clip.samples.size
            parts.append(np.zeros(int((gap_s if i < len(picked) - 1 else trail_s) * RATE), np.float32))
            pos += parts[-1].size
        out.append(_recording(parts, picked, spans))
    return out
