"""The short-window decoder a live stream uses, shared by the engines that run Whisper themselves.

A stream decodes spans of a few seconds. Encoding each as Whisper's full 30 s window would cost the
same as 30 s of speech, so the engines that hold a Whisper model (openai-whisper, CTranslate2) give
the stream a :class:`ShortWindowEngine` over their model that encodes only the span plus a margin.
How each one trims its encoder stays in its own module: engines import this module, never each
other (import-linter ``engines-independent``). Nothing here imports Django, torch or whisper.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from speech.audio import SAMPLE_RATE
from speech.engines.base import Engine, TranscribeOptions, TranscriptionResult

# Whisper's encoder window, the most a short window may be.
_WHISPER_WINDOW_S = 30.0


class ShortWindowEngine(Engine):
    """Decode live spans with a full ``engine``'s model (and under its lock), encoding the span plus
    ``margin_s``, at least ``min_window_s``, instead of 30 s. Subclasses decode in
    :meth:`transcribe_batch`, with an encoder window of :meth:`window_s`.
    """

    supports_prefix = True

    def __init__(self, engine: Engine, *, margin_s: float = 1.5, min_window_s: float = 4.0) -> None:
        super().__init__()
        self.engine = engine
        self.lock = engine.lock
        self.device = engine.device
        self.margin_s = margin_s
        self.min_window_s = min_window_s

    def load(self) -> None:
        self.engine.load()

    def warm_up(self) -> None:
        """Load the model and run one decode with word timings, so the first live cut pays no
        allocation cost. Call at worker start-up."""
        t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
        tone = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        self.transcribe(tone, options=TranscribeOptions(language="en", word_timestamps=True))

    def transcribe(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        """Decode one short span (at ``options.temperature``, default 0; greedy unless
        ``options.beam_size``), one segment; after ``options.prefix``, when given."""
        return self.transcribe_batch([samples], options=options)[0]

    @abstractmethod
    def transcribe_batch(
        self, windows: Sequence[np.ndarray], *, options: TranscribeOptions
    ) -> list[TranscriptionResult]:
        """Decode several short spans in one pass; the encoder window fits the longest."""

    def window_s(self, longest_s: float) -> float:
        """The encoder window for spans of up to ``longest_s``: that plus the margin, rounded up to
        whole seconds, at least ``min_window_s`` and at most Whisper's 30 s."""
        return min(_WHISPER_WINDOW_S, max(self.min_window_s, float(np.ceil(longest_s + self.margin_s))))
