"""Backend A: OpenAI's Whisper running in this process (openai-whisper on PyTorch).

One :class:`WhisperEngine` is meant to live for the whole worker process: loading ``base`` costs
about a second and ~0.8 GB, so it must never happen per request. The model is loaded lazily on the
first :meth:`WhisperEngine.transcribe` (or explicitly with :meth:`WhisperEngine.load`, which a
worker calls at start-up so a missing model fails there rather than on the first job). Nothing
here imports Django; the Celery task and the stream worker pass plain arguments.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
import whisper
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from scaiecho_site.errors import ValidationError
from transcription.audio import SAMPLE_RATE
from transcription.backends.base import Segment, TranscriptionResult, Word
from transcription.backends.weights import LoadedModel, load_whisper_model

# openai-whisper's own fallback schedule: retry a window at rising temperature when greedy
# decoding loops (compression ratio) or is unsure (log probability).
DEFAULT_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# Below this peak amplitude (about -80 dBFS) there is nothing a microphone could have picked up;
# Whisper is known to "hear" words such as "you" in pure silence, so it is not asked.
_SILENCE_PEAK = 1e-4


class WhisperEngine:
    """A Whisper model shared by all threads of one process.

    ``device`` defaults to CUDA when available. ``cpu_threads`` sets torch's intra-op threads on
    CPU: on small machines one thread is both faster and steadier than several (2-5x slower with 2
    threads on 2 cores was measured). That setting is process-wide in torch, so one process should
    run one engine. Calls are serialised by a lock, because a Whisper model keeps per-call state
    (kv-cache hooks) and two concurrent decodes on one model would also just halve each other's
    speed.
    """

    def __init__(
        self,
        *,
        model_name: str = "base",
        device: str | None = None,
        cpu_threads: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model_name = model_name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cpu_threads = cpu_threads
        self.cache_dir = cache_dir
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def english_only(self) -> bool:
        return self.model_name.endswith(".en")

    def load(self) -> LoadedModel:
        """Load the model if it is not loaded yet; raises ``WeightsUnavailable`` when impossible."""
        with self._lock:
            return self._load_locked()

    def _load_locked(self) -> LoadedModel:
        if self._loaded is None:
            if self.device == "cpu":
                torch.set_num_threads(self.cpu_threads)
            self._loaded = load_whisper_model(
                name=self.model_name, device=self.device, cache_dir=self.cache_dir
            )
            self._loaded.model.eval()
        return self._loaded

    def transcribe(
        self,
        samples: np.ndarray,
        *,
        language: str | None = None,
        temperature: float | None = None,
        word_timestamps: bool = False,
        initial_prompt: str | None = None,
    ) -> TranscriptionResult:
        """Transcribe 16 kHz mono float32 ``samples`` (as made by ``transcription.audio``).

        ``language`` is a code or an English name ("en", "german"); ``None`` lets a multilingual
        model detect it. ``temperature`` ``None`` uses Whisper's fallback schedule, a number
        decodes at that temperature only. Raises ``ValidationError`` for a language this model
        cannot transcribe.
        """
        language_code = self._language_code(language)
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        duration_s = samples.size / SAMPLE_RATE
        if samples.size == 0 or float(np.max(np.abs(samples))) < _SILENCE_PEAK:
            return TranscriptionResult(
                text="", language=language_code, duration_s=duration_s, segments=[]
            )

        temperatures = DEFAULT_TEMPERATURES if temperature is None else float(temperature)
        with self._lock:
            loaded = self._load_locked()
            if self.device == "cpu":
                # Process-wide in torch; set again in case other code changed it since load.
                torch.set_num_threads(self.cpu_threads)
            with torch.inference_mode():
                raw = whisper.transcribe(
                    loaded.model,
                    samples,
                    verbose=None,  # no printing, no progress bar
                    language=language_code,
                    task="transcribe",
                    temperature=temperatures,
                    # Not feeding the previous window's text back avoids the repetition loops it
                    # causes and keeps a hallucination in a quiet window from propagating.
                    condition_on_previous_text=False,
                    compression_ratio_threshold=2.4,
                    logprob_threshold=-1.0,
                    no_speech_threshold=0.6,
                    word_timestamps=word_timestamps,
                    initial_prompt=initial_prompt,
                    fp16=self.device.startswith("cuda"),
                )
        return _result(
            raw, duration_s=duration_s, word_timestamps=word_timestamps, language=language_code
        )

    def _language_code(self, language: str | None) -> str | None:
        if language is None:
            return "en" if self.english_only else None
        key = language.strip().lower()
        code = key if key in LANGUAGES else TO_LANGUAGE_CODE.get(key)
        if code is None:
            raise ValidationError(
                f"Language {language!r} is not one Whisper knows.",
                details=[{"field": "language", "code": "unsupported_language"}],
            )
        if self.english_only and code != "en":
            raise ValidationError(
                f"Model {self.model_name!r} transcribes English only, not {language!r}.",
                details=[{"field": "language", "code": "unsupported_language"}],
            )
        return code


def _result(
    raw: dict, *, duration_s: float, word_timestamps: bool, language: str | None
) -> TranscriptionResult:
    """Shape openai-whisper's dict into our types.

    Times are clamped to the audio, because Whisper's last timestamp token can point past the end.
    When nothing was heard the detected language is noise (noise is "detected" as Nynorsk, say),
    so only a requested language is reported then.
    """

    def clamp(value: float) -> float:
        return round(min(max(float(value), 0.0), duration_s), 3)

    segments = []
    for seg in raw.get("segments", []):
        words = None
        if word_timestamps:
            words = [
                Word(
                    start=clamp(w["start"]),
                    end=clamp(w["end"]),
                    word=w["word"].strip(),
                    probability=float(w["probability"]),
                )
                for w in seg.get("words", [])
            ]
        segments.append(
            Segment(
                start=clamp(seg["start"]),
                end=clamp(seg["end"]),
                text=seg["text"].strip(),
                words=words,
            )
        )
    text = str(raw.get("text", "")).strip()
    return TranscriptionResult(
        text=text,
        language=raw.get("language") if text else language,
        duration_s=duration_s,
        segments=segments,
    )
