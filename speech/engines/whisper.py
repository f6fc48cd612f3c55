"""Backend A: OpenAI's Whisper running in this process (openai-whisper on PyTorch).

One :class:`WhisperEngine` is meant to live for the whole worker process: loading ``base`` costs
about a second and ~0.8 GB, so it must never happen per request. The model is loaded lazily on the
first :meth:`WhisperEngine.transcribe` (or explicitly with :meth:`WhisperEngine.load`, which a
worker calls at start-up so a missing model fails there rather than on the first job). Nothing
here imports Django; the Celery task and the stream worker pass plain arguments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.timing import find_alignment
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, get_tokenizer

from speech.audio import SAMPLE_RATE
from speech.engines.base import Engine, Segment, TranscribeOptions, TranscriptionResult, WindowPlan, joined_words
from speech.engines.short import ShortWindowEngine
from speech.engines.weights import LoadedModel, load_whisper_model
from speech.engines.windows import COMPRESSION_RATIO_THRESHOLD, DEFAULT_TEMPERATURES, window_plan
from speech.errors import ValidationError

_WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's one window

# Below this peak amplitude (about -80 dBFS) there is nothing a microphone could have picked up;
# Whisper is known to "hear" words such as "you" in pure silence, so it is not asked.
_SILENCE_PEAK = 1e-4


class WhisperEngine(Engine):
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
        super().__init__()
        self.model_name = model_name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cpu_threads = cpu_threads
        self.cache_dir = cache_dir
        self._loaded: LoadedModel | None = None

    @property
    def english_only(self) -> bool:
        return self.model_name.endswith(".en")

    name = "openai-whisper"

    def load(self) -> LoadedModel:
        """Load the model if it is not loaded yet; raises ``WeightsUnavailable`` when impossible."""
        with self.lock:
            return self._load_locked()

    def _load_locked(self) -> LoadedModel:
        if self._loaded is None:
            if self.device == "cpu":
                torch.set_num_threads(self.cpu_threads)
            self._loaded = load_whisper_model(name=self.model_name, device=self.device, cache_dir=self.cache_dir)
            self._loaded.model.eval()
        return self._loaded

    def stream_decoder(self) -> Engine:
        return ShortWindowWhisper(self)

    def warm_up(self) -> None:
        self.stream_decoder().warm_up()

    def transcribe(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        """Transcribe 16 kHz mono float32 ``samples`` (as made by ``speech.audio``).

        ``language`` is a code or an English name ("en", "german"); ``None`` lets a multilingual
        model detect it. ``temperature`` ``None`` uses Whisper's fallback schedule, a number
        decodes at that temperature only. Raises ``ValidationError`` for a language this model
        cannot transcribe.

        With ``options.vad_segmentation`` (the default) the recording's speech windows
        (:meth:`plan_windows`) are decoded each on its own, in batches, and the repetition guard
        of :mod:`speech.engines.windows` reads them in order; without it ``whisper.transcribe`` runs over
        the whole file, seeking window by window.
        """
        plan = self.plan_windows(samples, options=options)
        if plan is not None:
            return plan.join(self._decode_plan(plan.windows, plan.options))
        return self._transcribe_whole(samples, options=options)

    def plan_windows(self, samples: np.ndarray, *, options: TranscribeOptions) -> WindowPlan | None:
        """Silero VAD's speech windows of up to 25 s (:mod:`speech.engines.windows`), decoded in one
        language (the requested one, or detected on the first window); ``None`` when
        ``options.vad_segmentation`` is off."""
        if not options.vad_segmentation:
            return None
        return window_plan(
            samples,
            options=options,
            language=self._language_code(options.language),
            detect_language=self._detect_language,
            decode=self._decode_plan,
        )

    def _decode_plan(self, windows: list[np.ndarray], options: TranscribeOptions) -> list[TranscriptionResult]:
        if not windows:
            return []
        return self.transcribe_batch(windows, options=options)

    def _detect_language(self, window: np.ndarray) -> str:
        with self.lock, torch.inference_mode():
            model = self._load_locked().model
            if not model.is_multilingual:
                return "en"
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(window), model.dims.n_mels)
            _, probs = model.detect_language(mel.to(model.device, dtype=model.encoder.conv1.weight.dtype))
            return str(max(probs, key=probs.get))

    def _transcribe_whole(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        """``whisper.transcribe`` over the whole of ``samples`` (no VAD)."""
        language_code = self._language_code(options.language)
        temperature, word_timestamps = options.temperature, options.word_timestamps
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        duration_s = samples.size / SAMPLE_RATE
        if samples.size == 0 or float(np.max(np.abs(samples))) < _SILENCE_PEAK:
            return TranscriptionResult(text="", language=language_code, duration_s=duration_s, segments=[])

        temperatures = DEFAULT_TEMPERATURES if temperature is None else float(temperature)
        with self.lock:
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
                    compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
                    logprob_threshold=-1.0,
                    no_speech_threshold=0.6,
                    word_timestamps=word_timestamps,
                    initial_prompt=options.prompt,
                    beam_size=options.beam_size if (options.beam_size or 1) > 1 else None,
                    fp16=self.device.startswith("cuda"),
                )
        return _result(raw, duration_s=duration_s, word_timestamps=word_timestamps, language=language_code)

    def transcribe_batch(
        self, windows: Sequence[np.ndarray], *, options: TranscribeOptions
    ) -> list[TranscriptionResult]:
        """Decode windows of up to 30 s in one batched encoder/decoder pass (longer ones alone).

        Each window is decoded as ``whisper.transcribe`` decodes one 30 s window (timestamp
        tokens make its segments), with the same fallback: a window whose text loops (compression
        ratio) or is unsure (log probability) is decoded again, with the other such windows, at the
        next temperature. Beam search is not batched here: ``beam_size`` falls back to one call per
        window.
        """
        if (options.beam_size or 1) > 1:
            return [self._transcribe_whole(window, options=options) for window in windows]
        language = self._language_code(options.language)
        prepared = [np.asarray(window, dtype=np.float32).reshape(-1) for window in windows]
        results: list[TranscriptionResult | None] = [None] * len(prepared)
        batch: list[int] = []
        for index, samples in enumerate(prepared):
            if samples.size > _WINDOW_SAMPLES:
                results[index] = self._transcribe_whole(samples, options=options)
            elif samples.size == 0 or float(np.max(np.abs(samples))) < _SILENCE_PEAK:
                results[index] = TranscriptionResult(
                    text="", language=language, duration_s=samples.size / SAMPLE_RATE, segments=[]
                )
            else:
                batch.append(index)
        if batch:
            with self.lock, torch.inference_mode():
                model = self._load_locked().model
                if self.device == "cpu":
                    torch.set_num_threads(self.cpu_threads)
                decoded = _decode_windows(
                    model,
                    [prepared[i] for i in batch],
                    n_frames=_WINDOW_SAMPLES // 160,
                    language=language,
                    options=options,
                    timestamps=True,
                    fp16=self.device.startswith("cuda"),
                )
            for index, result in zip(batch, decoded, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

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


def _result(raw: dict, *, duration_s: float, word_timestamps: bool, language: str | None) -> TranscriptionResult:
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
            words = joined_words(
                [(w["word"], w["start"], w["end"], w["probability"]) for w in seg.get("words", [])], clamp
            )
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


class _TrimmedEncoder(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, n_frames: int) -> None:
        super().__init__()
        self.inner = encoder
        self.n_frames = n_frames

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        enc = self.inner
        x = F.gelu(enc.conv1(mel[..., : self.n_frames]))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
        for block in enc.blocks:
            x = block(x)
        return enc.ln_post(x)


class _ShortModel:
    """The Whisper model seen through an encoder that reads only the first ``n_frames``."""

    def __init__(self, model: Any, n_frames: int) -> None:
        import dataclasses

        self._model = model
        self.encoder = _TrimmedEncoder(model.encoder, n_frames)
        self.decoder = model.decoder
        # Whisper recognises already-encoded audio by its shape (n_audio_ctx, n_audio_state); the
        # short window's features are n_frames / 2 long, so say so, or language detection would
        # run the encoder a second time on the features.
        self.dims = dataclasses.replace(model.dims, n_audio_ctx=n_frames // 2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, self.encoder(mel))

    def detect_language(self, mel: torch.Tensor, tokenizer: Any = None) -> Any:
        # The model's own method is bound to the full model; detect through this view instead.
        from whisper.decoding import detect_language

        return detect_language(self, mel, tokenizer)


class ShortWindowWhisper(ShortWindowEngine):
    """Decode a short span with a :class:`~speech.engines.whisper.WhisperEngine`'s model,
    encoding the span plus ``margin_s`` (at least ``min_window_s``) instead of 30 s.

    Whisper was trained on 30 s windows; with less than about a second of trailing padding it
    can loop ("qu qu qu ..."), hence the margin, the token cap proportional to the span, and the
    compression-ratio check in :class:`StreamSession`. One decode at temperature 0, no fallback.
    It takes the engine's own lock, because Whisper's kv-cache hooks are per model, not per call.
    """

    name = "openai-whisper-short-window"
    engine: WhisperEngine

    def warm_up(self) -> None:
        """Load the model and compile Whisper's word-alignment code (numba, several seconds on the
        first call in a process), so the first live cut does not stall. Call at worker start-up."""
        super().warm_up()
        from whisper.timing import dtw

        dtw(torch.rand(4, 4))

    def transcribe_batch(
        self, windows: Sequence[np.ndarray], *, options: TranscribeOptions
    ) -> list[TranscriptionResult]:
        """Decode several short spans in one pass; the encoder window fits the longest. With a beam
        (``options.beam_size`` above 1) each span is decoded alone, as in :meth:`WhisperEngine.transcribe_batch`."""
        if (options.beam_size or 1) > 1 and len(windows) > 1:
            return [self.transcribe_batch([window], options=options)[0] for window in windows]
        language = self.engine._language_code(options.language)
        prepared = [np.asarray(window, dtype=np.float32).reshape(-1) for window in windows]
        longest = max((samples.size for samples in prepared), default=0) / SAMPLE_RATE
        window = self.window_s(longest)
        with self.engine.lock, torch.inference_mode():
            model = self.engine.load().model
            if str(model.device) == "cpu":
                torch.set_num_threads(self.engine.cpu_threads)
            return _decode_windows(
                model,
                prepared,
                n_frames=int(window * 100),
                language=language,
                options=replace(options, temperature=float(options.temperature or 0.0)),
                timestamps=False,
                fp16=False,
            )


def _decode_windows(
    model: Any,
    windows: list[np.ndarray],
    *,
    n_frames: int,
    language: str | None,
    options: TranscribeOptions,
    timestamps: bool,
    fp16: bool,
) -> list[TranscriptionResult]:
    """Decode ``windows`` (each at most ``n_frames`` mel frames long) as one batch.

    ``timestamps`` asks Whisper for timestamp tokens, which cut each window into segments; without
    them each window is one segment. ``options.temperature`` ``None`` means the fallback schedule:
    windows that loop or are unsure are decoded again, together, at the next temperature.
    """
    short = _ShortModel(model, n_frames) if n_frames < 3000 else model
    padded = np.zeros((len(windows), n_frames * 160), dtype=np.float32)
    for row, samples in enumerate(windows):
        padded[row, : min(samples.size, padded.shape[1])] = samples[: padded.shape[1]]
    mel = torch.stack([whisper.log_mel_spectrogram(row, model.dims.n_mels)[:, :n_frames] for row in padded]).to(
        model.device
    )
    longest = max(samples.size for samples in windows) / SAMPLE_RATE
    temperatures = DEFAULT_TEMPERATURES if options.temperature is None else (float(options.temperature),)
    decoded: list[Any] = [None] * len(windows)
    pending = list(range(len(windows)))
    for step, temperature in enumerate(temperatures):
        decoding = whisper.DecodingOptions(
            task="transcribe",
            language=language,
            temperature=temperature,
            without_timestamps=not timestamps,
            # Speech is ~3 words (~4 tokens) a second; a cap well above that stops loops early.
            sample_len=min(224, int(12 + 8 * longest)),
            prompt=options.prompt or None,
            prefix=options.prefix or None,
            # Beam search at temperature 0 only; the fallback samples (as whisper.transcribe does).
            beam_size=options.beam_size if (options.beam_size or 1) > 1 and temperature == 0 else None,
            fp16=fp16,
        )
        outputs = whisper.decode(short, mel[pending], decoding)
        last = step == len(temperatures) - 1
        retry = []
        for index, output in zip(pending, outputs, strict=True):
            decoded[index] = output
            looping = output.compression_ratio > COMPRESSION_RATIO_THRESHOLD
            unsure = output.avg_logprob < -1.0 and not output.no_speech_prob > 0.6
            if (looping or unsure) and not last:
                retry.append(index)
        if not retry:
            break
        pending = retry
    results = []
    for index, samples in enumerate(windows):
        output = decoded[index]
        duration = samples.size / SAMPLE_RATE
        # whisper.transcribe's own rule: a window that is probably silence is skipped (a stream's
        # short spans are judged by the stream session itself, which reads both figures).
        silent = timestamps and output.no_speech_prob > 0.6 and output.avg_logprob < -1.0
        text = "" if silent else output.text.strip()
        if not text:
            results.append(TranscriptionResult(text="", language=language, duration_s=duration, segments=[]))
            continue
        detected = language or output.language
        tokenizer = get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language=detected, task="transcribe"
        )
        words = None
        text_tokens = [t for t in output.tokens if t < tokenizer.eot]
        if options.word_timestamps:
            # The prefix's words are aligned with the rest (they are what the audio begins with), then dropped.
            known = tokenizer.encode(" " + options.prefix.strip()) if options.prefix else []
            timings = find_alignment(short, tokenizer, known + text_tokens, mel[index], samples.size // 160)
            while known and timings:
                known = known[len(timings.pop(0).tokens) :]
            words = joined_words(
                [(t.word, float(t.start), float(t.end), float(t.probability)) for t in timings],
                partial(min, duration),
            )
        pieces = _timestamped_pieces(output.tokens, tokenizer, duration) if timestamps else [(0.0, duration, text)]
        # A word belongs to the last piece that starts before its middle.
        owner = [0] * len(words or [])
        for w_index, word in enumerate(words or []):
            middle = (word.start + word.end) / 2
            owner[w_index] = max([p for p, (start, _, _) in enumerate(pieces) if start <= middle] or [0])
        segments = [
            Segment(
                start=round(start, 3),
                end=round(end, 3),
                text=piece,
                words=None if words is None else [w for w, o in zip(words, owner, strict=True) if o == p_index],
                avg_logprob=float(output.avg_logprob),
                no_speech_prob=float(output.no_speech_prob),
            )
            for p_index, (start, end, piece) in enumerate(pieces)
        ]
        results.append(TranscriptionResult(text=text, language=detected, duration_s=duration, segments=segments))
    return results


def _timestamped_pieces(tokens: list[int], tokenizer: Any, duration: float) -> list[tuple[float, float, str]]:
    """Whisper's ``<|t0|> text <|t1|>`` pairs as (start, end, text), clamped to the audio."""
    begin = tokenizer.timestamp_begin
    pieces: list[tuple[float, float, str]] = []
    start: float | None = None
    text_tokens: list[int] = []
    for token in tokens:
        if token >= begin:
            time_s = min((token - begin) * 0.02, duration)
            if start is None or not text_tokens:
                start = time_s
            else:
                text = tokenizer.decode(text_tokens).strip()
                if text:
                    pieces.append((start, max(time_s, start), text))
                start, text_tokens = None, []
        elif token < tokenizer.eot:
            text_tokens.append(token)
    if text_tokens:  # text after the last timestamp runs to the end of the window
        text = tokenizer.decode(text_tokens).strip()
        if text:
            pieces.append((start if start is not None else 0.0, duration, text))
    if not pieces:
        text = tokenizer.decode([t for t in tokens if t < tokenizer.eot]).strip()
        if text:
            pieces.append((0.0, duration, text))
    return pieces
