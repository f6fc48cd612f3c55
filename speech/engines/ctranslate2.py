"""Backend A on CTranslate2: Whisper through ``faster-whisper`` (int8 on the CPU, float16 on CUDA).

The packaged ``base`` and ``tiny.en`` weights already are CTranslate2 files, so this engine runs
them as they are (joined and sha256-verified once by :mod:`speech.engines.weights`). On this
project's 2-core machines it is about 2.7 times as fast as ``whisper.transcribe`` (greedy, one
thread, ``bench/batch``) at less memory, hence the default engine.

Decoding follows openai-whisper's rules (timestamp tokens make segments, the temperature fallback
schedule, "no speech" windows skipped) on windows of at most 28 s of speech. :meth:`CTranslate2Engine.transcribe`
cuts the audio at pauses with the Silero VAD that ships inside the faster-whisper wheel (ONNX, no
download; :mod:`speech.engines.windows`) and decodes ``batch_size`` of those windows per batched
encoder/decoder pass, as faster-whisper's ``BatchedInferencePipeline`` does, but with the fallback
schedule that pipeline lacks and a guard against windows repeating earlier text. :meth:`CTranslate2Engine.transcribe_batch` decodes independent windows in one pass, and
:meth:`CTranslate2Engine.stream_decoder` encodes a live span plus a margin instead of 30 s
(CTranslate2's encoder accepts fewer than 3000 frames). Nothing here imports Django.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np

from speech.audio import SAMPLE_RATE
from speech.engines.base import (
    Engine,
    Segment,
    TranscribeOptions,
    TranscriptionResult,
    WindowPlan,
    joined_words,
    language_code,
)
from speech.engines.short import ShortWindowEngine
from speech.engines.weights import PACKAGED, WeightsUnavailable, packaged_ctranslate2_dir
from speech.engines.windows import (
    COMPRESSION_RATIO_THRESHOLD,
    DEFAULT_TEMPERATURES,
    ENCODE_MARGIN_S,
    compression_ratio,
    result_from_segments,
    window_plan,
)
from speech.errors import ValidationError

logger = logging.getLogger(__name__)

# openai-whisper's log probability threshold (its schedule and loop threshold: speech.engines.windows).
_LOGPROB_THRESHOLD = -1.0
_NO_SPEECH_THRESHOLD = 0.6
_BEST_OF = 5  # candidates sampled per window at a temperature above 0

_WINDOW_S = 30
_HOP = 160  # samples per mel frame
_FRAMES_PER_S = SAMPLE_RATE // _HOP
_WINDOW_FRAMES = _WINDOW_S * _FRAMES_PER_S
_TIME_PRECISION = 0.02  # seconds per timestamp token
_MAX_LENGTH = 448  # Whisper's text context
# A window much shorter than 30 s is encoded at its own length (plus ENCODE_MARGIN_S, in steps of
# _ENCODE_STEP_S, at least _MIN_ENCODE_S) rather than padded to 30 s: CTranslate2's encoder takes
# fewer frames, and the encoder is most of the cost (1.1 s for 30 s against 0.2 s for 10 s, base
# int8, one thread). Whisper reads short contexts less surely, so the floor is well above a
# stream's: measured on the 14 test conversations and 8 min of real prompts, a 15 s floor kept WER
# at 4.26 % (30 s everywhere: 4.26 %) and took 20 % less time; a 10 s floor misread the short
# tail of one phone-band window (4.39 %).
_ENCODE_STEP_S = 5
_MIN_ENCODE_S = 15

# Below this peak amplitude (about -80 dBFS) there is nothing a microphone could have picked up.
_SILENCE_PEAK = 1e-4


def _is_silent(samples: np.ndarray) -> bool:
    return samples.size == 0 or float(np.max(np.abs(samples))) < _SILENCE_PEAK


@dataclass
class _Decoded:
    """One window's decode: Whisper's segments (times relative to the window), and its scores."""

    language: str | None
    pieces: list[dict[str, Any]] = field(default_factory=list)  # start, end, tokens, text, words
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


class CTranslate2Engine(Engine):
    """A faster-whisper model shared by all threads of one process.

    ``model_name``: ``base`` / ``tiny.en`` (the packaged offline weights), a local CTranslate2 model
    folder (one holding ``model.bin``), or a name faster-whisper downloads where the host is online.
    ``device`` defaults to CUDA when CTranslate2 sees a GPU; ``compute_type`` defaults to int8 on
    the CPU and float16 on CUDA. ``batch_size`` is how many VAD windows :meth:`transcribe` decodes
    per batched pass (1: one at a time); with ``vad_segmentation`` off in the options, faster-whisper's
    sequential decoder reads the whole audio instead.
    Calls are serialised by ``lock``: one decode at a time uses the CPU threads best, and the
    word-timing state of a decode must not interleave with another's.
    """

    name = "ctranslate2"

    def __init__(
        self,
        *,
        model_name: str = "base",
        device: str | None = None,
        compute_type: str | None = None,
        cpu_threads: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        import ctranslate2

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model_name = model_name
        self.device = device or ("cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu")
        self.compute_type = compute_type or ("float16" if self.device.startswith("cuda") else "int8")
        self.cpu_threads = cpu_threads
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self._model: Any = None
        self.model_path: Path | None = None

    # loading

    def load(self) -> Any:
        """Load the model if it is not loaded yet; raises ``WeightsUnavailable`` when impossible."""
        with self.lock:
            return self._load_locked()

    def _load_locked(self) -> Any:
        if self._model is None:
            from faster_whisper import WhisperModel

            kind, index = (self.device.split(":", 1) + ["0"])[:2]
            path = self._local_model_path()
            try:
                if path is not None:
                    model = WhisperModel(
                        str(path),
                        device=kind,
                        device_index=int(index),
                        compute_type=self.compute_type,
                        cpu_threads=self.cpu_threads,
                    )
                else:
                    model = WhisperModel(
                        self.model_name,
                        device=kind,
                        device_index=int(index),
                        compute_type=self.compute_type,
                        cpu_threads=self.cpu_threads,
                        download_root=str(Path(self.cache_dir or "~/.cache/scaiecho/whisper").expanduser() / "hub"),
                    )
            except ValueError as exc:
                if "compute type" in str(exc).lower() or "compute_type" in str(exc).lower():
                    raise  # a configuration error, not missing weights
                raise WeightsUnavailable(f"Whisper model {self.model_name!r} could not be loaded: {exc}") from exc
            except Exception as exc:  # huggingface_hub offline, missing files, a corrupt model.bin...
                raise WeightsUnavailable(
                    f"Whisper model {self.model_name!r} is neither packaged, nor a CTranslate2 model folder, "
                    f"nor downloadable: {exc}"
                ) from exc
            self.model_path = path
            self._model = model
        return self._model

    def _local_model_path(self) -> Path | None:
        """The model folder on disk, or ``None`` when faster-whisper must download ``model_name``."""
        if self.model_name in PACKAGED:
            folder = packaged_ctranslate2_dir(name=self.model_name, cache_dir=self.cache_dir)
            if folder is not None:
                return folder
            logger.warning("Packaged weights for %r are not installed; trying a download.", self.model_name)
            return None
        path = Path(self.model_name).expanduser()
        if path.suffix == ".pt" or (path.is_dir() and any(path.glob("*.pt")) and not (path / "model.bin").exists()):
            raise WeightsUnavailable(
                f"{self.model_name!r} is an openai-whisper checkpoint (.pt), which the CTranslate2 engine cannot "
                "read: set SCAIECHO_WHISPER_ENGINE=openai-whisper to use it, or convert it with "
                "ct2-transformers-converter."
            )
        if path.is_dir():
            if not (path / "model.bin").is_file():
                raise WeightsUnavailable(f"{self.model_name!r} is a folder without a CTranslate2 model.bin.")
            return path
        if path.exists() or self.model_name.startswith(("/", ".", "~")):
            raise WeightsUnavailable(f"{self.model_name!r} is not a CTranslate2 model folder.")
        return None

    @property
    def multilingual(self) -> bool:
        return bool(self.load().model.is_multilingual)

    def _language_code(self, language: str | None) -> str | None:
        """The ISO code to decode in; ``None`` to detect. The same refusals as the torch engine."""
        if language is None:
            return None if self.multilingual else "en"
        code = language_code(language)
        if code is None:
            raise ValidationError(
                f"Language {language!r} is not one Whisper knows.",
                details=[{"field": "language", "code": "unsupported_language"}],
            )
        if code != "en" and not self.multilingual:
            raise ValidationError(
                f"Model {self.model_name!r} transcribes English only, not {language!r}.",
                details=[{"field": "language", "code": "unsupported_language"}],
            )
        return code

    def stream_decoder(self) -> Engine:
        return ShortWindowCTranslate2(self)

    def warm_up(self) -> None:
        self.stream_decoder().warm_up()

    # transcription

    def transcribe(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        """Transcribe 16 kHz mono float32 ``samples``; raises ``ValidationError`` for a language
        this model cannot transcribe.

        With ``options.vad_segmentation`` (the default) the recording is cut at its pauses
        (:meth:`plan_windows`), the windows are decoded ``batch_size`` at a time, and the
        repetition guard of :mod:`speech.engines.windows` reads them in order; without it,
        faster-whisper's sequential decoder reads the whole file as ``whisper.transcribe`` does.
        """
        if options.vad_segmentation:
            plan = self.plan_windows(samples, options=options)
            return plan.join(self._decode_in_batches(plan.windows, plan.options))
        language = self._language_code(options.language)
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        duration_s = samples.size / SAMPLE_RATE
        if _is_silent(samples):
            return TranscriptionResult(text="", language=language, duration_s=duration_s, segments=[])
        with self.lock:
            segments, detected = self._transcribe_sequential(self._load_locked(), samples, language, options)
        return _result(segments, duration_s=duration_s, language=language, detected=detected)

    def _decode_in_batches(self, windows: list[np.ndarray], options: TranscribeOptions) -> list[TranscriptionResult]:
        results: list[TranscriptionResult] = []
        for first in range(0, len(windows), self.batch_size):
            results += self.transcribe_batch(windows[first : first + self.batch_size], options=options)
        return results

    def _transcribe_sequential(
        self, model: Any, samples: np.ndarray, language: str | None, options: TranscribeOptions
    ) -> tuple[list[Segment], str | None]:
        """faster-whisper's own sequential decoder over the whole audio (no VAD), as
        ``whisper.transcribe`` runs: 30 s windows, seeking by timestamp tokens."""
        beam = options.beam_size or 1
        raw, info = model.transcribe(
            samples,
            language=language,
            task="transcribe",
            beam_size=beam,
            best_of=_BEST_OF,
            temperature=list(DEFAULT_TEMPERATURES) if options.temperature is None else [float(options.temperature)],
            compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD,
            log_prob_threshold=_LOGPROB_THRESHOLD,
            no_speech_threshold=_NO_SPEECH_THRESHOLD,
            condition_on_previous_text=False,
            initial_prompt=options.prompt or None,
            word_timestamps=options.word_timestamps,
            vad_filter=False,
        )
        segments = [
            Segment(
                start=float(s.start),
                end=float(s.end),
                text=s.text.strip(),
                words=(
                    joined_words((w.word, w.start, w.end, w.probability) for w in s.words or [])
                    if options.word_timestamps
                    else None
                ),
                avg_logprob=float(s.avg_logprob),
                no_speech_prob=float(s.no_speech_prob),
            )
            for s in raw
        ]
        return segments, info.language

    def plan_windows(self, samples: np.ndarray, *, options: TranscribeOptions) -> WindowPlan | None:
        """Cut at pauses (Silero VAD) into windows of speech of up to 28 s (:mod:`speech.engines.windows`);
        the join guards against repetition and maps the windows' times back to the recording.
        ``None`` when ``options.vad_segmentation`` is off: the whole file is decoded then.

        When no language is given, it is detected once, on the first window of speech (as
        ``whisper.transcribe`` does), and every window is decoded in it.
        """
        if not options.vad_segmentation:
            return None
        return window_plan(
            samples,
            options=options,
            language=self._language_code(options.language),
            detect_language=self._detect_language,
            decode=lambda windows, window_options: self._decode_in_batches(windows, window_options),
        )

    def _detect_language(self, window: np.ndarray) -> str:
        with self.lock:
            model = self._load_locked()
            if not model.model.is_multilingual:
                return "en"
            encoded = model.encode(_features(model, window, _WINDOW_FRAMES)[None])
            return model.model.detect_language(encoded)[0][0][0][2:-2]

    def transcribe_batch(
        self, windows: Sequence[np.ndarray], *, options: TranscribeOptions
    ) -> list[TranscriptionResult]:
        """Decode independent windows of up to 30 s in one batched pass (longer ones alone).

        Each window is decoded as one 30 s window of ``whisper.transcribe`` (timestamp tokens make
        its segments, the same fallback schedule, a probably-silent window is empty), and with
        ``language`` ``None`` each window's own language is detected: the words are those of one
        call per window.
        """
        language = self._language_code(options.language)
        prepared = [np.asarray(window, dtype=np.float32).reshape(-1) for window in windows]
        results: list[TranscriptionResult | None] = [None] * len(prepared)
        batch: list[int] = []
        for index, samples in enumerate(prepared):
            if samples.size > _WINDOW_S * SAMPLE_RATE:
                results[index] = self.transcribe(samples, options=options)
            elif _is_silent(samples):
                results[index] = TranscriptionResult(
                    text="", language=language, duration_s=samples.size / SAMPLE_RATE, segments=[]
                )
            else:
                batch.append(index)
        # Windows of about the same length share a pass, encoded at that length.
        groups: dict[int, list[int]] = {}
        for index in batch:
            groups.setdefault(_encode_frames(prepared[index].size / SAMPLE_RATE), []).append(index)
        for n_frames, members in sorted(groups.items()):
            with self.lock:
                model = self._load_locked()
                decoded = self._decode(
                    model,
                    [prepared[i] for i in members],
                    language=language,
                    options=options,
                    timestamps=True,
                    n_frames=n_frames,
                )
            for index, window in zip(members, decoded, strict=True):
                duration = prepared[index].size / SAMPLE_RATE
                segments = _segments(window, duration)
                results[index] = _result(segments, duration_s=duration, language=language, detected=window.language)
        return [result for result in results if result is not None]

    # the decoder shared by every path

    def _decode(
        self,
        model: Any,
        windows: list[np.ndarray],
        *,
        language: str | None,
        options: TranscribeOptions,
        timestamps: bool,
        n_frames: int = _WINDOW_FRAMES,
        max_new_tokens: int | None = None,
        skip_silence: bool = True,
    ) -> list[_Decoded]:
        """Decode ``windows`` (each at most ``n_frames`` mel frames) as one batch.

        ``options.temperature`` ``None`` is the fallback schedule: windows whose text loops
        (compression ratio) or is unsure (log probability) are decoded again, together, at the next
        temperature; the best attempt is kept when all fail. With ``skip_silence`` a window that is
        probably silence (Whisper's no-speech rule) comes back without text. ``language`` ``None``
        detects each window's own language.
        """
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        features = np.stack([_features(model, window, n_frames) for window in windows])
        encoded = model.encode(features)
        languages: list[str | None] = [language] * len(windows)
        if language is None:
            if model.model.is_multilingual:
                ranked = model.model.detect_language(encoded)
                languages = [r[0][0][2:-2] for r in ranked]
            else:
                languages = ["en"] * len(windows)
        tokenizers: dict[str | None, Any] = {}

        def tokenizer_for(code: str | None) -> Any:
            if code not in tokenizers:
                tokenizers[code] = Tokenizer(
                    model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=code or "en"
                )
            return tokenizers[code]

        first = tokenizer_for(languages[0])
        suppress = list(get_suppressed_tokens(first, [-1]))
        previous = first.encode(" " + options.prompt.strip()) if options.prompt else []
        # A prefix is for one-segment decodes (a stream's short windows), not timestamped windows.
        prefix_text = options.prefix.strip() if options.prefix and not timestamps else None
        prefix = first.encode(" " + prefix_text) if prefix_text else []
        prompts = [
            model.get_prompt(tokenizer_for(code), previous, without_timestamps=not timestamps, prefix=prefix_text)
            for code in languages
        ]
        longest = max(len(prompt) for prompt in prompts)
        max_length = min(_MAX_LENGTH, longest + max_new_tokens) if max_new_tokens else _MAX_LENGTH
        beam = options.beam_size or 1
        temperatures = DEFAULT_TEMPERATURES if options.temperature is None else (float(options.temperature),)

        # Per window: (score for picking the best, tokens, avg_logprob, no_speech_prob, passed cr).
        attempts: list[list[tuple[float, list[int], float, float, bool]]] = [[] for _ in windows]
        final: list[tuple[list[int], float, float] | None] = [None] * len(windows)
        pending = list(range(len(windows)))
        for step, temperature in enumerate(temperatures):
            source = encoded if len(pending) == len(windows) else model.encode(features[pending])
            if temperature > 0:
                kwargs: dict[str, Any] = {
                    "beam_size": 1,
                    "num_hypotheses": _BEST_OF,
                    "sampling_topk": 0,
                    "sampling_temperature": temperature,
                }
            else:
                kwargs = {"beam_size": beam}
            outputs = model.model.generate(
                source,
                [prompts[i] for i in pending],
                max_length=max_length,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=suppress,
                max_initial_timestamp_index=int(round(1.0 / _TIME_PRECISION)),
                **kwargs,
            )
            last = step == len(temperatures) - 1
            retry = []
            for index, output in zip(pending, outputs, strict=True):
                tokens = list(output.sequences_ids[0])
                avg_logprob = float(output.scores[0]) * len(tokens) / (len(tokens) + 1)
                no_speech = float(output.no_speech_prob)
                text = tokenizer_for(languages[index]).decode(tokens).strip()
                loops = compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD
                attempts[index].append((avg_logprob, tokens, avg_logprob, no_speech, not loops))
                silence = no_speech > _NO_SPEECH_THRESHOLD and avg_logprob < _LOGPROB_THRESHOLD
                if (loops or avg_logprob < _LOGPROB_THRESHOLD) and not silence:
                    if not last:
                        retry.append(index)
                        continue
                    # All failed: the surest attempt that does not loop, as faster-whisper picks.
                    good = [a for a in attempts[index] if a[4]] or attempts[index]
                    best = max(good, key=lambda a: a[0])
                    final[index] = (best[1], best[2], best[3])
                else:
                    final[index] = (tokens, avg_logprob, no_speech)
            if not retry:
                break
            pending = retry

        results: list[_Decoded] = []
        aligned: list[list[dict[str, Any]]] = []
        for index, window in enumerate(windows):
            tokens, avg_logprob, no_speech = final[index] or ([], 0.0, 1.0)
            # The result begins with the prefix: its words are aligned with the rest, then dropped.
            known = prefix if prefix and tokens[: len(prefix)] == prefix else []
            tokens = tokens[len(known) :]
            tokenizer = tokenizer_for(languages[index])
            duration = window.size / SAMPLE_RATE
            decoded = _Decoded(language=languages[index], avg_logprob=avg_logprob, no_speech_prob=no_speech)
            silent = skip_silence and no_speech > _NO_SPEECH_THRESHOLD and avg_logprob < _LOGPROB_THRESHOLD
            if not silent:
                if timestamps:
                    pieces, _, _ = model._split_segments_by_timestamps(
                        tokenizer=tokenizer,
                        tokens=tokens,
                        time_offset=0.0,
                        segment_size=int(ceil(duration) * _FRAMES_PER_S),
                        segment_duration=duration,
                        seek=0,
                    )
                else:
                    pieces = [{"seek": 0, "start": 0.0, "end": duration, "tokens": tokens}]
                for piece in pieces:
                    piece["text"] = tokenizer.decode(piece["tokens"]).strip()
                    piece["words"] = None
                decoded.pieces = [piece for piece in pieces if piece["text"]]
                if known and decoded.pieces:
                    decoded.pieces.insert(
                        0, {"seek": 0, "start": 0.0, "end": 0.0, "tokens": known, "text": "", "known": True}
                    )
            results.append(decoded)
            aligned.append(decoded.pieces)
        if options.word_timestamps and any(aligned):
            spans = [[(piece["start"], piece["end"]) for piece in pieces] for pieces in aligned]
            self._add_words(model, tokenizer_for(languages[0]), encoded, windows, aligned)
            if timestamps:
                # The alignment moves a segment's ends onto its words; keep the timestamp tokens'
                # ends, where a window is read on from: the words say where the text ends, the
                # segments where the decode stopped, and the text must not depend on alignment.
                for pieces, kept in zip(aligned, spans, strict=True):
                    for piece, (start, end) in zip(pieces, kept, strict=True):
                        piece["start"], piece["end"] = start, end
        for decoded in results:
            decoded.pieces = [piece for piece in decoded.pieces if not piece.get("known")]
        return results

    def _add_words(
        self,
        model: Any,
        tokenizer: Any,
        encoded: Any,
        windows: list[np.ndarray],
        pieces: list[list[dict[str, Any]]],
    ) -> None:
        """faster-whisper's word alignment (cross-attention + DTW), one batched pass.

        A window without text still takes part (the encoder output is one batch), with its
        end-of-text token alone; its empty word list is dropped again.
        """
        eot_only = [{"seek": 0, "start": 0.0, "end": 0.0, "tokens": [], "text": ""}]
        batch = [window_pieces or eot_only for window_pieces in pieces]
        sizes = [max(1, int(ceil(window.size / SAMPLE_RATE) * _FRAMES_PER_S)) for window in windows]
        model.add_word_timestamps(batch, tokenizer, encoded, sizes, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、", 0.0)
        for window_pieces in pieces:
            for piece in window_pieces:
                piece["words"] = [w for w in piece.get("words") or [] if w["word"].strip()]


def _encode_frames(seconds: float) -> int:
    """The mel frames to encode a window of ``seconds`` with: its length plus a margin, rounded up
    to a step, between ``_MIN_ENCODE_S`` and Whisper's 30 s."""
    steps = ceil((seconds + ENCODE_MARGIN_S) / _ENCODE_STEP_S)
    return int(min(_WINDOW_S, max(_MIN_ENCODE_S, steps * _ENCODE_STEP_S)) * _FRAMES_PER_S)


def _features(model: Any, samples: np.ndarray, n_frames: int) -> np.ndarray:
    """Log-mel features of ``samples`` padded with real silence to ``n_frames`` frames (as
    openai-whisper pads its 30 s window), not with zero-valued features."""
    padded = np.zeros(n_frames * _HOP, dtype=np.float32)
    padded[: min(samples.size, padded.size)] = samples[: padded.size]
    return np.ascontiguousarray(model.feature_extractor(padded, padding=_HOP)[:, :n_frames])


def _segments(window: _Decoded, duration: float) -> list[Segment]:
    def clamp(value: float) -> float:
        return round(min(max(float(value), 0.0), duration), 3)

    segments = []
    for piece in window.pieces:
        words = None
        if piece["words"] is not None:
            words = joined_words([(w["word"], w["start"], w["end"], w["probability"]) for w in piece["words"]], clamp)
        segments.append(
            Segment(
                start=clamp(piece["start"]),
                end=clamp(piece["end"]),
                text=piece["text"],
                words=words,
                avg_logprob=window.avg_logprob,
                no_speech_prob=window.no_speech_prob,
            )
        )
    return segments


def _result(
    segments: list[Segment], *, duration_s: float, language: str | None, detected: str | None
) -> TranscriptionResult:
    """Our result from the segments, with times clamped to the audio and empty segments dropped."""
    return result_from_segments(segments, duration_s=duration_s, language=language, detected=detected)


class ShortWindowCTranslate2(ShortWindowEngine):
    """Decode a live span with a :class:`CTranslate2Engine`'s model, encoding the span plus
    ``margin_s`` (at least ``min_window_s``) instead of 30 s.

    CTranslate2's Whisper encoder accepts fewer than 3000 mel frames (its positional encodings are
    sliced to the input), so this is whisper.cpp's ``audio_ctx`` trick without patching the model.
    One segment per span without timestamp tokens, greedy or a beam of ``options.beam_size``, at
    ``options.temperature`` (default 0) with no fallback; a token cap proportional to the span stops loops early. Both confidence
    figures (``avg_logprob``, ``no_speech_prob``) are reported for the stream session to judge.
    """

    name = "ctranslate2-short-window"
    engine: CTranslate2Engine

    def transcribe_batch(
        self, windows: Sequence[np.ndarray], *, options: TranscribeOptions
    ) -> list[TranscriptionResult]:
        """Decode several short spans in one pass (a beam of ``options.beam_size``, greedy by
        default); the encoder window fits the longest."""
        language = self.engine._language_code(options.language)
        prepared = [np.asarray(window, dtype=np.float32).reshape(-1)[: _WINDOW_S * SAMPLE_RATE] for window in windows]
        results: list[TranscriptionResult | None] = [None] * len(prepared)
        batch = []
        for index, samples in enumerate(prepared):
            if _is_silent(samples):
                results[index] = TranscriptionResult(
                    text="", language=language, duration_s=samples.size / SAMPLE_RATE, segments=[]
                )
            else:
                batch.append(index)
        if batch:
            longest = max(prepared[i].size for i in batch) / SAMPLE_RATE
            window_s = self.window_s(longest)
            with self.engine.lock:
                model = self.engine._load_locked()
                decoded = self.engine._decode(
                    model,
                    [prepared[i] for i in batch],
                    language=language,
                    options=TranscribeOptions(
                        language=options.language,
                        temperature=float(options.temperature or 0.0),
                        word_timestamps=options.word_timestamps,
                        prompt=options.prompt,
                        prefix=options.prefix,
                        beam_size=options.beam_size,
                    ),
                    timestamps=False,
                    n_frames=int(window_s * _FRAMES_PER_S),
                    # Speech is ~3 words (~4 tokens) a second; a cap well above that stops loops.
                    max_new_tokens=min(224, int(12 + 8 * longest)),
                    skip_silence=False,
                )
            for index, window in zip(batch, decoded, strict=True):
                duration = prepared[index].size / SAMPLE_RATE
                results[index] = _result(
                    _segments(window, duration), duration_s=duration, language=language, detected=window.language
                )
        return [result for result in results if result is not None]
