"""The one engine interface, what every engine returns, and the language names they share.

Every speech engine — openai-whisper on torch, CTranslate2 through faster-whisper, the
OpenAI-compatible relay — is an :class:`Engine`: ``transcribe(samples, *, options)`` takes 16 kHz
mono float32 samples and :class:`TranscribeOptions` and returns a :class:`TranscriptionResult` with
segments and (on request) word timings. The batch task, consent verification and the stream worker
call it the same way and never need to know which engine answered. Nothing here imports Django.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str
    # Whisper reports a probability per word; an OpenAI-shaped relay does not, so ``None`` there
    # rather than an invented number.
    probability: float | None = None


def joined_words(
    pieces: Iterable[tuple[str, float, float, float]], clamp: Callable[[float], float] = float
) -> list[Word]:
    """Timed words from a decoder's word pieces: (text with its leading space, start, end,
    probability). A piece that goes on the word before it is glued to it: punctuation alone
    (openai-whisper's alignment times "," on its own), or a piece without a leading space that does
    not begin with a letter or digit (Whisper times "cold" "-hearted" and "2" "-9" apart): a
    transcript then reads "cold-hearted", not "cold -hearted". Scripts written without spaces keep
    their pieces apart (each begins with a letter). The glued word keeps the first's probability."""
    words: list[Word] = []
    for text, start, end, probability in pieces:
        stripped = text.strip()
        if not stripped:
            continue
        goes_on = not any(c.isalnum() for c in stripped) or (not text[0].isspace() and not stripped[0].isalnum())
        if words and goes_on:
            last = words[-1]
            words[-1] = Word(last.start, max(last.end, clamp(end)), last.word + stripped, last.probability)
            continue
        words.append(Word(clamp(start), clamp(end), stripped, float(probability)))
    return words


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: list[Word] | None = None
    # Filled in by diarization; ``None`` when no speaker was attributed.
    speaker_id: str | None = None
    speaker_label: str | None = None
    # Whisper's decoder confidence for this segment (mean token log probability, and the
    # probability of its "no speech" token); ``None`` from backends that do not report them.
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class TranscriptionResult:
    text: str
    # ISO 639-1 code ("en"), or ``None`` when neither detected nor requested.
    language: str | None
    duration_s: float
    segments: list[Segment]


@dataclass(frozen=True)
class EncodedAudio:
    """The audio as the client sent it, for an engine that forwards files (the relay)."""

    data: bytes
    filename: str


@dataclass(frozen=True)
class TranscribeOptions:
    """How to decode. The same options mean the same thing to every engine."""

    # A code or an English name ("en", "german"); ``None`` lets a multilingual model detect it.
    language: str | None = None
    # ``None``: the engine's temperature fallback schedule; a number decodes at that one only.
    temperature: float | None = None
    word_timestamps: bool = False
    # Text that conditions the decoder (names, spelling); ``None`` for none.
    prompt: str | None = None
    # Text the decode must begin with: what the first part of the samples is already known to say
    # (a stream decodes a span after audio it has finalized). The result holds only what follows
    # it, timed on the samples' own clock. Only engines whose ``supports_prefix`` is true take one.
    prefix: str | None = None
    # Beam search width; ``None`` (or 1) decodes greedily.
    beam_size: int | None = None
    # The upload as sent, when there is one: the relay forwards it rather than re-encoding samples.
    original: EncodedAudio | None = None
    # Decode a whole recording as Silero VAD's speech windows of up to 28 s, each on its own, with
    # the repetition guard of :mod:`speech.engines.windows`; ``False``: the engine reads the whole
    # file as ``whisper.transcribe`` does (for comparison). A stream's short spans are not affected.
    vad_segmentation: bool = True


@dataclass(frozen=True)
class WindowPlan:
    """A recording cut at its pauses into windows of at most 30 s that decode independently.

    ``options`` are those to decode every window with (the file's language fixed, so that all
    windows read in one language); ``join`` turns the windows' results, in order, into the
    recording's result on its own time line. A batcher can decode the windows of several
    recordings together in one pass and still give each caller its own result.
    """

    windows: list[np.ndarray]
    options: TranscribeOptions
    join: Callable[[list[TranscriptionResult]], TranscriptionResult]


class Engine(ABC):
    """A speech engine: one per process, shared by its threads.

    ``lock`` serialises the engine's own calls (a model keeps per-call state, and two decodes on one
    small CPU only halve each other's speed); a caller that drives the model itself, such as a
    stream decoder, holds it too.
    """

    name: ClassVar[str]
    device: str = "cpu"
    # Whether ``transcribe`` honours ``TranscribeOptions.prefix`` (a live stream's short windows do).
    supports_prefix: ClassVar[bool] = False

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def load(self) -> None:  # noqa: B027 - engines without weights (the relay) need no loading
        """Load the weights now, so that a missing model fails at start-up and not at a first job."""

    @abstractmethod
    def transcribe(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        """Transcribe 16 kHz mono float32 ``samples`` (as made by :mod:`speech.audio`)."""

    def transcribe_batch(
        self, windows: Sequence[np.ndarray], *, options: TranscribeOptions
    ) -> list[TranscriptionResult]:
        """Transcribe several independent windows. Engines that can batch on the device override
        this; the results are the same words as one call per window."""
        return [self.transcribe(window, options=options) for window in windows]

    def plan_windows(self, samples: np.ndarray, *, options: TranscribeOptions) -> WindowPlan | None:
        """How this engine would cut ``samples`` into windows for :meth:`transcribe_batch`, or
        ``None`` when it decodes a whole recording itself (then :meth:`transcribe` is the way)."""
        return None

    def stream_decoder(self) -> Engine:
        """The engine a live stream decodes its short spans with (this one, unless the engine has
        a cheaper path for short audio)."""
        return self

    def warm_up(self) -> None:
        """Load and run once, so that the first live decode pays no compile or allocation cost."""
        self.load()


@cache
def _whisper_languages() -> tuple[dict[str, str], dict[str, str]]:
    # Imported on first use: importing ``whisper`` pulls in torch, which a relay-only process or a
    # formats-only test should not pay for at import time.
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    return LANGUAGES, TO_LANGUAGE_CODE


def language_code(value: str | None) -> str | None:
    """Map a language code or English name ("en", "english", "castilian") to its ISO code.

    Returns ``None`` for ``None``, an empty string, or a name Whisper does not know, so that an
    upstream's odd label never reaches a client as if it were a code.
    """
    if not value:
        return None
    key = value.strip().lower()
    codes, names = _whisper_languages()
    if key in codes:
        return key
    return names.get(key)


def language_name(code: str | None) -> str | None:
    """The lowercase English name OpenAI's ``verbose_json`` uses ("en" → "english")."""
    if not code:
        return None
    codes, _ = _whisper_languages()
    return codes.get(code.strip().lower())
