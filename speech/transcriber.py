"""Live transcription of one audio stream: voice activity detection, partial and final deltas.

A :class:`StreamSession` takes 16 kHz mono float32 samples as they arrive and returns
:class:`Delta` objects. Silero VAD finds speech; while someone speaks, the current span (the audio
since the last final) is decoded about every ``partial_interval`` seconds and its whole text sent
as a partial. Two consecutive decodes that agree on a word prefix confirm it (LocalAgreement-2);
a confirmed prefix ending at a clause boundary, or any confirmed prefix once the span is longer
than ``chunk_seconds``, becomes a final and the audio is cut after its last word. A pause of
``silence_seconds`` (0.3 s: the short pauses of natural turn-taking, not only long silences)
finalizes the whole span; the span is decoded as soon as the pause begins, so that final usually
costs no decode of its own. No final spans more than ``max_span_seconds`` (the decoder reads at
most 30 s), and a final decode that comes back much shorter than the partial before it (Whisper
looping on one word, or skipping what the prompt already said) gives way to that partial's words:
text heard once is never dropped. Finals are never changed or sent again. Each decode begins
with the audio of the latest finals (``context_seconds``, 3 s by default), their text its forced prefix: a
short turn ("seven of clubs") is heard after the words before it, not alone, as a batch window
would hear it.

Cost: openai-whisper always encodes a 30 s window, about 2-3 s of compute on one core of the
2-core machines this runs on, whatever the span's length. :class:`ShortWindowWhisper` encodes only
the span plus a margin (whisper.cpp's ``audio_ctx`` trick), which is several times cheaper for
the short spans a stream decodes. Nothing here imports Django.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from speech.audio import SAMPLE_RATE
from speech.engines.base import Engine, Segment, TranscribeOptions, TranscriptionResult, Word
from speech.engines.windows import COMPRESSION_RATIO_THRESHOLD, compression_ratio
from speech.splitting import shifted
from speech.vad import VAD_FRAME, Vad

# Spans shorter than this are decoded without the previous text as a prompt (see ``_decode``).
PROMPT_MIN_SECONDS = 2.0
# A decode after the context (``context_seconds``) that says this many of its words again in a row
# started it over ("... fruitly in it. And Mr. John Dashwood had then leisure to ...", the context
# "And Mr. Johnson.") and is done again without it.
CONTEXT_REPEAT_WORDS = 4
# A pause this long after speech is decoded at once, so the final at ``silence_seconds`` reuses it.
PAUSE_DECODE_SECONDS = 0.15
# Conversational speech runs at 2-3 words a second: a decode of at least this much speech with
# fewer words than ``MIN_WORDS_PER_SECOND`` per second is suspect (see ``_decode_checked``). At 0.6
# a decode that kept a number ("2 -9 -3 -4 -0") and skipped the 7 s sentence after it passed.
SHORT_CHECK_SECONDS = 3.0
MIN_WORDS_PER_SECOND = 1.3
# A partial of at least this many words that the next decode of the span mostly drops is kept.
DROP_CHECK_WORDS = 2
# ... and the span is then cut at the VAD's least speech-like frame in the last this long of that partial's audio.
DROP_SEARCH_SECONDS = 0.6
# A new decode that leaves out this many of the previous partial's words in a row has dropped them
# (a second voice's "Change to which folder?" gone, though most words are still there).
LOST_RUN_WORDS = 3
# A split of the span must keep at least this share of the new decode's words too: a cut inside a
# sentence loses the sentence's head from both halves.
SPLIT_KEEPS = 0.8
# ... or all of them but this many that Whisper gave a probability below SPARE_WORD_PROBABILITY: it
# answered "Rear, less." (0.55, 0.00) for "Rear. Lash. Change to Witch." in an overlap, and "Last,
# four, queen of" (0.02 for "Last,") for "La change to which folder? | 4. Queen of"; a garbled
# partial that a new decode corrects ("Eighth and two" -> "Agent logged off.", 0.31 for "Agent")
# still stands corrected.
SPLIT_SPARE_WORDS = 1
SPARE_WORD_PROBABILITY = 0.1
# A run of at least LOST_RUN_WORDS of the partial's words that the span's final decode left out,
# said at least this long before the final's words in its place began, was another voice (see
# ``_with_dropped_voice``).
DROPPED_LEAD_SECONDS = 0.3

# A cut after confirmed words goes on to the VAD's pause within this long after the last one's end
# (Whisper's word times end early: "Hello." ended 0.25 s before the speaker stopped), but not past
# the next word's start plus the slack.
CUT_PAUSE_SECONDS = 0.5
CUT_PAUSE_SLACK_SECONDS = 0.1
# A decode's last word, which two decodes agree on, is final only when it ends at least this long
# before the decoded audio does, at a pause (the word was not cut off by the audio's end).
LAST_WORD_MARGIN_SECONDS = 0.5
# A decode made as a pause began whose last word ends a sentence ("... as urgent.") no later than
# this after the VAD's silence began is final up to there, though no decode before it had that
# word: the turn is over, and the next voice may follow before the pause is long enough to end
# the span (0.24 s here; ``silence_seconds`` is 0.3).
PAUSE_WORD_SLACK_SECONDS = 0.2

# Speech this long that no word of a fresh final decode covers (by word times, give or take
# GAP_WORD_SLACK_SECONDS) is decoded on its own and its words put in their place (see ``_fill_gaps``).
GAP_CHECK_SECONDS = 0.5
GAP_WORD_SLACK_SECONDS = 0.2
# Uncovered speech either side of a pause shorter than this is one run: a short turn ("front
# left") is two words with a pause between them, each shorter than GAP_CHECK_SECONDS.
GAP_BRIDGE_SECONDS = 0.3
# A word the gap's decode hears within this of the same word in the decode it mends is that word.
GAP_SAME_WORD_SECONDS = 0.1
# ... and digits within this of a number holding them are that number heard again (see ``_in_number``).
GAP_NUMBER_SECONDS = 1.0

# A repeated last word shorter than this, by the word times of a fresh decode, is an echo (see
# ``StreamSession._without_echo``).
ECHO_WORD_SECONDS = 0.1
# ... or shorter than this share of the words it repeats: "left left" timed 0.30 s then 0.14 s.
ECHO_SHARE = 0.5

# Whisper's well-known inventions for silence, music and noise (its training data's subtitles).
HALLUCINATIONS = (
    "thanks for watching",
    "thank you for watching",
    "thank you",
    "subtitles by",
    "subscribe",
    "please subscribe",
    "like and subscribe",
    "see you next time",
    "bye",
    "you",
    "amara.org",
    "transcribed by",
    "captions by",
)
# Below this RMS (about -40 dBFS) a blocklisted phrase is taken for a hallucination.
_QUIET_RMS = 0.01
_CLAUSE_END = re.compile(r"[.!?;:,]$")
_SENTENCE_END = re.compile(r"[.!?]$")


@dataclass(frozen=True)
class Delta:
    """One transcript update. ``start``/``end`` are seconds from the start of the stream.

    ``confidence`` is ``exp`` of the mean token log probability of the decode (0-1, higher is
    surer); ``None`` when the engine reports no log probabilities.
    """

    text: str
    is_final: bool
    start: float
    end: float
    confidence: float | None = None


# --- the session ---------------------------------------------------------------------------------


# Whisper writes a small number as a word in one decode and as digits in the next ("four", "4").
_NUMBER_WORDS = {
    name: str(value) for value, name in enumerate("zero one two three four five six seven eight nine ten".split())
}


def _key(word: str) -> str:
    """A word as decodes are compared: lower case, without punctuation, small numbers as digits."""
    key = re.sub(r"[^\w']", "", word.lower())
    return _NUMBER_WORDS.get(key, key)


def _agreed_words(previous: list[Word], words: list[Word]) -> int:
    """How many of ``words`` begin as ``previous`` does (LocalAgreement's confirmed prefix). A
    number compares whole, however it was written: from one decode to the next Whisper writes a
    digit string "29340." or "Two nine three four zero.", and the two agree; its first digits alone
    do not."""
    agreed = 0
    for (key, _), (other, size) in zip(_units(previous), _units(words), strict=False):
        if key != other:
            break
        agreed += size
    return agreed


def _units(words: list[Word]) -> list[tuple[str, int]]:
    """``words`` as compared keys with how many words each is: digits said one after another in
    one sentence ("2, 9, 3", "two nine three") are one key ("293")."""
    units: list[tuple[str, int]] = []
    for index, word in enumerate(words):
        key = _key(word.word)
        if (
            units
            and key.isdigit()
            and units[-1][0].isdigit()
            and not _SENTENCE_END.search(words[index - 1].word)
        ):
            units[-1] = (units[-1][0] + key, units[-1][1] + 1)
        else:
            units.append((key, 1))
    return units


def _trailing_repeat(words: list[Word]) -> int:
    """The length of a last run of 1-3 words that repeats the run just before it (0: none)."""
    keys = [_key(word.word) for word in words]
    for count in (3, 2, 1):
        if len(keys) >= 2 * count and keys[-count:] == keys[-2 * count : -count] and all(keys[-count:]):
            return count
    return 0


def _says_twice(words: list[Word], run: int = 3) -> bool:
    """Whether some run of ``run`` words occurs twice in ``words`` (Whisper looping on a short span:
    "Today we will remove the quark. Today we will remove the qu")."""
    keys = [_key(word.word) for word in words]
    runs = [tuple(keys[i : i + run]) for i in range(len(keys) - run + 1)]
    return len(set(runs)) < len(runs)


def _alignment(previous: list[Word], words: list[Word]) -> difflib.SequenceMatcher:
    """``previous``'s words aligned with ``words``'s, compared by :func:`_key`."""
    return difflib.SequenceMatcher(
        None, [_key(w.word) for w in previous], [_key(w.word) for w in words], autojunk=False
    )


def _kept(previous: list[Word], words: list[Word]) -> float:
    """Share of ``previous``'s words that ``words`` still holds, in order."""
    if not previous:
        return 1.0
    return sum(block.size for block in _alignment(previous, words).get_matching_blocks()) / len(previous)


def _keeps_enough(words: list[Word], split: list[Word]) -> bool:
    """Whether ``split`` (two decodes of a span's halves) holds ``SPLIT_KEEPS`` of ``words`` (one
    decode of the whole), or all but ``SPLIT_SPARE_WORDS`` that Whisper itself barely believed."""
    alignment = _alignment(words, split)
    held = [False] * len(words)
    for block in alignment.get_matching_blocks():
        held[block.a : block.a + block.size] = [True] * block.size
    if sum(held) >= SPLIT_KEEPS * len(words):
        return True
    unheld = [word for word, kept in zip(words, held, strict=True) if not kept]
    return (
        len(unheld) <= SPLIT_SPARE_WORDS
        and any(held)
        and all(w.probability is not None and w.probability < SPARE_WORD_PROBABILITY for w in unheld)
    )


def _drops(previous: list[Word], words: list[Word]) -> bool:
    """Whether ``words`` drops ``previous``'s: keeps under half of them, or leaves out
    ``LOST_RUN_WORDS`` of them in a row with nothing in their place (one alignment for both)."""
    alignment = _alignment(previous, words)
    kept = sum(block.size for block in alignment.get_matching_blocks())
    lost = max((last - first for op, first, last, _, _ in alignment.get_opcodes() if op == "delete"), default=0)
    return kept < 0.5 * len(previous) or lost >= LOST_RUN_WORDS


def _in_number(word: Word, words: list[Word]) -> bool:
    """Whether ``word`` is digits that a number of ``words`` within ``GAP_NUMBER_SECONDS`` already
    holds: Whisper writes a string said digit by digit as "29340" in one decode and "2 9 3 4" in
    another, and the one word "29340" is timed over only part of its speech."""
    key = _key(word.word)
    if not key.isdigit():
        return False
    near = [w for w in words if w.start - GAP_NUMBER_SECONDS < word.end and word.start < w.end + GAP_NUMBER_SECONDS]
    return any(len(number) > len(key) and number.isdigit() and key in number for number in (_key(w.word) for w in near))


def _with_dropped_voice(partial: list[Word], hyp: _Hypothesis) -> _Hypothesis:
    """``hyp``, a span's final decode, with the runs of the span's partial (``partial``) that it
    left out put back in their place: where two voices overlap Whisper hears one of them, and the
    final decode may hear the other one than the partial did ("You are now muted." under "seven of
    clubs": the partial held the first, the final "7 of clothes" only). A run counts when it is at
    least ``LOST_RUN_WORDS`` words and began ``DROPPED_LEAD_SECONDS`` before the final's word in
    its place, so a garbled partial that the final decode corrects (the same speech, heard at the
    same time) is not kept beside its correction."""
    words = list(hyp.words)
    if not partial or not words:
        return hyp
    opcodes = _alignment(partial, words).get_opcodes()
    for tag, first, last, at, _ in reversed(opcodes):
        if tag not in ("delete", "replace") or last - first < LOST_RUN_WORDS or at >= len(words):
            continue
        if partial[first].start <= words[at].start - DROPPED_LEAD_SECONDS:
            words[at:at] = partial[first:last]
    if len(words) == len(hyp.words):
        return hyp
    return _Hypothesis(words, hyp.confidence, filled=hyp.filled)


def _open_end(text: str) -> str:
    """``text`` without the punctuation after its last word."""
    return re.sub(r"[.!?;:,]+$", "", text)


def _repeats(known: list[str], new: list[str], run: int) -> bool:
    """Whether some run of ``run`` words of ``new`` was already said in ``known`` or earlier in ``new``."""
    keys = [_key(word) for word in known + new]
    for at in range(len(known), len(keys) - run + 1):
        phrase = keys[at : at + run]
        if any(keys[i : i + run] == phrase for i in range(at)):
            return True
    return False


def _cut_repetition(text: str) -> str:
    """Whisper on a window that ends mid-speech sometimes loops ("sunny tomorrow. The weather will
    be sunny tomorrow. The weather ..."): keep the text up to where a phrase starts repeating."""
    words = text.split()
    keys = [_key(w) for w in words]
    n = len(words)
    for i in range(n):
        for k in range(1, (n - i) // 2 + 1):
            times = 2 if k >= 3 else 3
            if i + k * times <= n and all(keys[i + j * k : i + (j + 1) * k] == keys[i : i + k] for j in range(times)):
                return " ".join(words[: i + k])
    return text


@dataclass
class _Hypothesis:
    words: list[Word]
    confidence: float | None
    # Words of speech the decode left out, heard in a decode of their own (``_fill_gaps``).
    filled: bool = False


@dataclass
class DecodeStats:
    """Compute spent decoding, for benchmarks and the stream worker's metrics."""

    count: int = 0
    seconds: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (span seconds, compute seconds)


class StreamSession:
    """One live stream's transcription state. Not thread-safe: one caller feeds a session.

    ``feed(samples, now)``: ``now`` is the caller's clock in stream seconds when the audio is
    handed over (``None``: assume real time). When ``now`` runs ahead of the audio by more than
    ``max_lag`` — the worker is behind — partial decodes are skipped and only finals are made,
    so a loaded worker sheds work instead of falling further behind.

    ``beam_size`` is every decode's beam width (``None`` or 1: greedy). The default, 5, costs about
    what greedy decoding does on a stream's short windows, whose cost is mostly the encoder.

    ``context_seconds``: that much of the latest finals' audio (from a pause between two of their
    words) goes before every decode of the span, with its text as the decode's forced prefix
    (``TranscribeOptions.prefix``); 0, or a decoder without ``supports_prefix``, decodes the span
    alone. Each decode's window grows by that much: on the real conversations 3 s cut the stream's
    word errors by 27 % for about 55 % more decode time (``bench/README.md``).
    """

    def __init__(
        self,
        engine: Any,
        *,
        chunk_seconds: float = 5.0,
        silence_seconds: float = 0.3,
        max_span_seconds: float = 25.0,
        partial_interval: float = 1.0,
        language: str | None = "en",
        start_threshold: float = 0.5,
        stop_threshold: float = 0.35,
        min_speech_seconds: float = 0.25,
        speech_pad_seconds: float = 0.2,
        max_lag: float = 1.0,
        no_speech_threshold: float = 0.6,
        logprob_threshold: float = -1.0,
        decoder: Engine | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prompt: str | None = None,
        beam_size: int | None = 5,
        context_seconds: float = 3.0,
    ) -> None:
        if not 0.5 <= chunk_seconds <= 30:
            raise ValueError("chunk_seconds must be between 0.5 and 30")
        self.decoder = decoder or engine.stream_decoder()
        self.chunk_seconds = chunk_seconds
        self.silence_seconds = silence_seconds
        # Below the decoder's 30 s window, and never above what chunk_seconds lets grow.
        self.max_span = int(min(max_span_seconds, 28.0) * SAMPLE_RATE)
        self.partial_interval = partial_interval
        self.language = language
        self.start_threshold = start_threshold
        self.stop_threshold = stop_threshold
        self.min_speech = int(min_speech_seconds * SAMPLE_RATE)
        self.pad = int(speech_pad_seconds * SAMPLE_RATE)
        self.max_lag = max_lag
        self.no_speech_threshold = no_speech_threshold
        self.logprob_threshold = logprob_threshold
        self.beam_size = beam_size
        if context_seconds < 0:
            raise ValueError("context_seconds must not be negative")
        # An engine that cannot begin a decode with known text (the relay) gets no context.
        self.context = int(context_seconds * SAMPLE_RATE) if getattr(self.decoder, "supports_prefix", False) else 0
        # The latest finals' audio, and their words timed on it.
        self._heard_audio = np.zeros(0, dtype=np.float32)
        self._heard_words: list[Word] = []
        self._heard_closed = False  # whether the latest final ended at a pause
        self.stats = DecodeStats()
        self._clock = clock
        self._vad = Vad()
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet a whole VAD frame
        self._history = np.zeros(0, dtype=np.float32)  # recent audio outside speech (for padding)
        self._pos = 0  # samples of the stream seen by the VAD
        self._span: list[np.ndarray] = []
        self._span_start = 0  # stream sample where the current span starts
        self._span_len = 0
        # The VAD's probability of each whole frame of the span; the first starts at sample _probs_at.
        self._probs: list[float] = []
        self._probs_at = 0
        self._speech_len = 0  # speech samples in the current span
        self._in_speech = False
        self._silence_run = 0
        self._last_decode_len = 0
        self._previous: list[Word] | None = None
        # The latest decode of the span covering its first ``_last_decode_len`` samples: reused as
        # the final when the speaker stops after it, so a pause costs no decode of its own.
        self._last_hyp: _Hypothesis | None = None
        # Finalized text, the decoder's prompt; the caller's ``prompt`` (names, spelling) before the first.
        self._context = (prompt or "").strip()[-400:]
        self._last_final_end = 0.0
        self._closed = False

    # public API

    def feed(self, samples: np.ndarray, now: float | None = None) -> list[Delta]:
        if self._closed:
            raise RuntimeError("session is closed")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._pending = np.concatenate([self._pending, samples])
        deltas: list[Delta] = []
        n = self._pending.size // VAD_FRAME
        for i in range(n):
            frame = self._pending[i * VAD_FRAME : (i + 1) * VAD_FRAME]
            deltas += self._frame(frame)
            if self._in_speech and self._span_len >= self.max_span:
                # However far behind the caller is, and however much audio one call brings: a
                # longer span would not fit the decoder's window.
                deltas += self._cut_long_span()
        self._pending = self._pending[n * VAD_FRAME :]
        if self._in_speech and self._speech_len >= self.min_speech and self._partial_due(now):
            deltas += self._decode_partial()
        return deltas

    def _partial_due(self, now: float | None) -> bool:
        if now is not None and now - self._pos / SAMPLE_RATE > self.max_lag:
            return False  # behind real time: finals only
        new = self._span_len - self._last_decode_len
        if self._last_decode_len == 0:
            # The first partial comes early, so a speaker sees words within about a second.
            return new >= min(self.partial_interval, 0.6) * SAMPLE_RATE
        if new >= self.partial_interval * SAMPLE_RATE:
            return True
        # A pause has begun and the last decode missed the end of the speech: decode now, so the
        # final at the end of the pause can reuse this decode instead of starting one.
        speech_end = self._span_len - self._silence_run
        return self._pause_begun() and self._last_decode_len < speech_end

    def _pause_begun(self) -> bool:
        """Whether the span ends in a pause long enough to decode at (``PAUSE_DECODE_SECONDS``)."""
        return self._silence_run >= min(PAUSE_DECODE_SECONDS, self.silence_seconds / 2) * SAMPLE_RATE

    def finalize(self) -> list[Delta]:
        """Emit everything heard so far as finals (the client's ``finalize``); the stream goes on."""
        deltas: list[Delta] = []
        if self._pending.size:
            frame = np.zeros(VAD_FRAME, dtype=np.float32)
            frame[: self._pending.size] = self._pending
            self._pending = np.zeros(0, dtype=np.float32)
            deltas += self._frame(frame)
        if self._in_speech:
            deltas += self._end_utterance()
        return deltas

    def close(self) -> list[Delta]:
        deltas = self.finalize()
        self._closed = True
        return deltas

    # VAD state machine

    def _frame(self, frame: np.ndarray) -> list[Delta]:
        prob = self._vad.probability(frame)
        self._pos += VAD_FRAME
        if not self._in_speech:
            if prob >= self.start_threshold:
                self._in_speech = True
                pre = self._history[-self.pad :] if self.pad else self._history[:0]
                self._span = [pre.copy(), frame.copy()]
                self._span_start = self._pos - VAD_FRAME - pre.size
                self._span_len = pre.size + VAD_FRAME
                self._probs = [prob]
                self._probs_at = pre.size
                self._speech_len = VAD_FRAME
                self._silence_run = 0
                self._last_decode_len = 0
                self._previous = None
                self._last_hyp = None
            else:
                self._history = np.concatenate([self._history, frame])[-max(self.pad, VAD_FRAME) :]
            return []
        self._span.append(frame.copy())
        self._span_len += VAD_FRAME
        self._probs.append(prob)
        if prob >= self.stop_threshold:
            self._speech_len += VAD_FRAME
            self._silence_run = 0
        else:
            self._silence_run += VAD_FRAME
            if self._silence_run >= self.silence_seconds * SAMPLE_RATE:
                return self._end_utterance()
        return []

    # decoding

    def _audio(self) -> np.ndarray:
        audio = np.concatenate(self._span) if self._span else np.zeros(0, dtype=np.float32)
        self._span = [audio]
        return audio

    def _decode(
        self, audio: np.ndarray, *, word_timestamps: bool, use_prompt: bool = True, from_start: bool = True
    ) -> _Hypothesis:
        """Decode ``audio``. With ``use_prompt`` the session's text so far conditions the decoder,
        and when ``audio`` is the span from its start (``from_start``) the audio of the latest
        finals (``context_seconds``) goes before it, their text the decode's forced beginning: a
        short turn is then heard after the words before it ("Seven of clubs." rather than "7 of
        clothes"). A decode that says a run of the context's words again (Whisper starting the
        context's sentence over), or whose word times leave speech of the span unheard (after a
        reader's sentence, Whisper went on with the reader and skipped the other voice between:
        "... than he was." | "Aless to be rather cold" for "Press star to cancel this message.
        Unless to be rather cold"), is done again without it."""
        started = self._clock()
        result = None
        skipping: _Hypothesis | None = None  # the decode with context that left speech unheard
        left, known = self._left_context() if use_prompt and from_start else (np.zeros(0, dtype=np.float32), "")
        if known:
            before = self._context[: len(self._context) - len(known)].strip()
            result = shifted(
                self._transcribe(np.concatenate([left, audio]), word_timestamps, before, self._prefix(known)),
                start_s=0.0,
                end_s=audio.size / SAMPLE_RATE,
                by_s=-left.size / SAMPLE_RATE,
            )
            new = [w.word for seg in result.segments for w in seg.words or []] or " ".join(
                seg.text for seg in result.segments
            ).split()
            if _repeats(known.split(), new, CONTEXT_REPEAT_WORDS):
                self.stats.count += 1
                result = None
            elif word_timestamps and self._skips_speech(result, audio.size):
                self.stats.count += 1
                skipping, result = self._filter(result, audio), None
        if result is None:
            # On a short span Whisper tends to echo the prompt (the previous utterance) as if it
            # were heard again; the prompt helps only once there is audio enough to outweigh it.
            prompt = self._context if use_prompt and audio.size >= PROMPT_MIN_SECONDS * SAMPLE_RATE else ""
            result = self._transcribe(audio, word_timestamps, prompt, "")
        spent = self._clock() - started
        self.stats.count += 1
        self.stats.seconds += spent
        self.stats.samples.append((audio.size / SAMPLE_RATE, spent))
        hyp = self._filter(result, audio)
        if skipping is not None and len(skipping.words) > len(hyp.words):
            # Alone, the span was heard as less (a reader's "-disposed." and another voice after it
            # came back as "All disposed.", so unsure that it counted as no speech): the decode
            # with context stands, and the final's gap check decodes the speech it left out.
            return skipping
        return hyp

    def _skips_speech(self, result: TranscriptionResult, size: int) -> bool:
        """Whether the words of ``result``, a decode of the span's first ``size`` samples, leave a
        run of its speech unheard (``_uncovered``)."""
        words = [w for seg in result.segments for w in seg.words or []]
        return bool(self._uncovered(words, size))

    def _transcribe(self, audio: np.ndarray, word_timestamps: bool, prompt: str, prefix: str) -> TranscriptionResult:
        return self.decoder.transcribe(
            audio,
            options=TranscribeOptions(
                language=self.language,
                temperature=0.0,
                word_timestamps=word_timestamps,
                prompt=prompt[-200:] or None,
                prefix=prefix or None,
                beam_size=self.beam_size,
            ),
        )

    def _left_context(self) -> tuple[np.ndarray, str]:
        """The latest finals' audio, at most ``context_seconds`` of it from a pause between two of
        their words, and what it says."""
        words, audio = self._heard_words, self._heard_audio
        first = audio.size - self.context
        for index, word in enumerate(words):
            cut = int(((words[index - 1].end + word.start) / 2 if index else word.start) * SAMPLE_RATE)
            if cut >= first:
                return audio[max(0, cut - VAD_FRAME // 2) :], " ".join(w.word for w in words[index:])
        return audio[:0], ""

    def _prefix(self, known: str) -> str:
        """The context's text as the decode's forced beginning. After a final cut where the speaker
        went on, without the punctuation after its last word ("... one other participant." |
        "in the conference.": a full stop tells the decoder a new sentence follows, and it skipped
        the rest of this one); after a final at a pause, ended as a sentence ("front, right." |
        "Nobody is available ... moment.": the decoder writes on in the prefix's style, and
        without a sentence end it wrote none either, so no clause mark let a final come sooner)."""
        if not self._heard_closed:
            return _open_end(known)
        return known if known[-1] in ".!?" else _open_end(known) + "."

    def _hear(self, audio: np.ndarray, words: list[Word], *, closed: bool) -> None:
        """Keep a final's audio and words for the context of the decodes after it (the last
        ``context_seconds`` and a second more)."""
        if not self.context:
            return
        self._heard_closed = closed
        shift = self._heard_audio.size / SAMPLE_RATE
        if len(words) > 1 and len({(w.start, w.end) for w in words}) == 1:
            # One time for every word (a decode without word times): the context takes all or none.
            words = [Word(0.0, 0.0, " ".join(w.word for w in words))]
        self._heard_audio = np.concatenate([self._heard_audio, audio])
        self._heard_words += [replace(w, start=w.start + shift, end=w.end + shift) for w in words]
        drop = max(0, self._heard_audio.size - self.context - SAMPLE_RATE)
        if drop:
            self._heard_audio = self._heard_audio[drop:]
            moved = drop / SAMPLE_RATE
            self._heard_words = [
                replace(w, start=w.start - moved, end=w.end - moved) for w in self._heard_words if w.start >= moved
            ]

    def _filter(self, result: TranscriptionResult, audio: np.ndarray) -> _Hypothesis:
        """Drop what Whisper says when there was nothing to say (its usual hallucinations)."""
        rms = float(np.sqrt(np.mean(audio**2))) if audio.size else 0.0
        words: list[Word] = []
        logprobs: list[float] = []
        for seg in result.segments:
            text = _cut_repetition(seg.text)
            if text != seg.text:
                seg = Segment(
                    start=seg.start,
                    end=seg.end,
                    text=text,
                    avg_logprob=seg.avg_logprob,
                    no_speech_prob=seg.no_speech_prob,
                    words=seg.words[: len(text.split())] if seg.words else None,
                )
            if (
                seg.no_speech_prob is not None
                and seg.avg_logprob is not None
                and seg.no_speech_prob > self.no_speech_threshold
                and seg.avg_logprob < self.logprob_threshold
            ):
                continue
            # Whisper's own rule above needs both signs of non-speech; a real but unclear sentence
            # (espeak's voice often decodes near -1.6) must survive, so only plain garbage goes.
            if seg.avg_logprob is not None and seg.avg_logprob < self.logprob_threshold - 1.0:
                continue
            if compression_ratio(seg.text) > COMPRESSION_RATIO_THRESHOLD:  # a repetition loop
                continue
            if not any(c.isalnum() for c in seg.text):  # "♪", "..."
                continue
            if rms < _QUIET_RMS and re.sub(r"[^\w' ]", "", seg.text.lower()).strip() in HALLUCINATIONS:
                continue
            if seg.avg_logprob is not None:
                logprobs.append(seg.avg_logprob)
            # A lone mark (". You are entering" after a prefix without its full stop) is no word,
            # and would keep two decodes of the same words from agreeing.
            if seg.words:
                words += [w for w in seg.words if any(c.isalnum() for c in w.word)]
            else:
                words += [Word(start=seg.start, end=seg.end, word=w) for w in seg.text.split() if any(c.isalnum() for c in w)]
        confidence = round(float(np.exp(np.mean(logprobs))), 3) if logprobs else None
        return _Hypothesis(words=words, confidence=confidence)

    def _decode_partial(self) -> list[Delta]:
        audio = self._audio()
        heard_len = self._last_decode_len  # the audio the previous partial was decoded from
        self._last_decode_len = self._span_len
        span_s = audio.size / SAMPLE_RATE
        # Word times are needed only where a cut may follow: a previous hypothesis with a clause
        # boundary (its last word too: "...at the moment." with the next voice 0.17 s later, too
        # short a pause to end the span, is confirmed by this decode), or a span past chunk_seconds.
        previous = self._previous or []
        want_times = span_s >= self.chunk_seconds or any(_CLAUSE_END.search(w.word) for w in previous)
        # Once a pause has begun this decode is likely the final, whose words are checked against
        # the speech by their times (``_fill_gaps``).
        hyp = self._decode_checked(audio, word_timestamps=want_times or self._silence_run > 0)
        deltas: list[Delta] = []
        if len(previous) >= DROP_CHECK_WORDS and 0 < heard_len < audio.size and _drops(previous, hyp.words):
            kept = self._keep_dropped(previous, heard_len, hyp, want_times=want_times)
            if kept is not None:
                final, hyp = kept
                deltas += final
        if (want_times or self._silence_run > 0) and self._previous is not None:
            deltas += self._commit_agreed(hyp, span_s)
        else:
            self._previous = hyp.words
        self._last_hyp = _Hypothesis(self._previous or [], hyp.confidence)
        if self._previous:
            text = " ".join(w.word for w in self._previous)
            start = self._span_start / SAMPLE_RATE
            end = start + self._span_len / SAMPLE_RATE
            deltas.append(Delta(text, False, round(start, 3), round(end, 3), hyp.confidence))
        return deltas

    def _keep_dropped(
        self, previous: list[Word], heard_len: int, hyp: _Hypothesis, *, want_times: bool
    ) -> tuple[list[Delta], _Hypothesis] | None:
        """The new decode of the span lost most of the previous partial's words, or a run of
        ``LOST_RUN_WORDS`` of them: Whisper, given a second voice after a short pause, now and then
        hears only the second ("You are now muted. Seven of clubs." becomes "Seven of clubs."), or
        only one of two overlapping voices ("Rear, last. Change to which folder? Four, queen of
        clubs." becomes "Rear, last. Four, queen of clothes."), even in audio that holds the words.

        The span is cut at the pause the VAD heard last before the previous partial's audio ended, and each side decoded on its own; when the first side still holds the lost words, it
        is a final and the second side the new partial. Failing that, the previous partial itself
        is the final of the audio it was decoded from (its last word may be cut short there), and
        the rest is decoded on its own. Either split must also keep ``SPLIT_KEEPS`` of the new
        decode's words, or all but one it barely believed (``_keeps_enough``): a cut inside the
        new decode's sentence loses its head from both sides.
        ``None``: neither holds more than the new decode, which then heard the span afresh (a
        garbled partial corrected) and stands."""
        audio = self._audio()
        cut = self._pause_before(heard_len, int(DROP_SEARCH_SECONDS * SAMPLE_RATE))
        if cut is not None:
            head = self._decode_checked(audio[:cut], word_timestamps=False)
            if _kept(previous, head.words) >= 0.5:
                tail = self._decode_checked(audio[cut:], word_timestamps=want_times, from_start=False)
                both = head.words + tail.words
                if len(both) > len(hyp.words) and _keeps_enough(hyp.words, both):
                    return self._split_span(head, cut), tail
        tail = self._decode_checked(audio[heard_len:], word_timestamps=want_times, from_start=False)
        both = previous + tail.words
        if len(both) <= len(hyp.words) or not _keeps_enough(hyp.words, both) or _says_twice(previous):
            return None  # a partial that says a phrase twice was a loop, which the new decode mended
        return self._split_span(_Hypothesis(list(previous), None), heard_len), tail

    def _split_span(self, head: _Hypothesis, cut: int) -> list[Delta]:
        """``head`` is the final of the span's first ``cut`` samples; the span goes on after them."""
        delta = self._final(head.words, self._span_start + cut, head.confidence)
        self._drop_head(cut)
        self._speech_len = max(self._span_len - self._silence_run, 0)
        self._previous = None
        return [delta] if delta else []

    def _commit_agreed(self, hyp: _Hypothesis, span_s: float) -> list[Delta]:
        """LocalAgreement-2: finalize the confirmed prefix up to its last clause boundary, or all
        of it once the span is past ``chunk_seconds``, and cut the audio after it."""
        agreed = _agreed_words(self._previous or [], hyp.words)
        # The last word of a decode is often cut mid-word; it is committed by agreement only where
        # the speech pauses after it, well before the audio ends (a turn's "... the pound key."
        # with the next voice's first words not yet heard).
        if hyp.words and agreed >= len(hyp.words) - 1 and self._ends_turn(hyp.words[-1]):
            agreed = len(hyp.words)
        elif agreed and agreed == len(hyp.words) and not self._heard_whole(hyp.words[-1], span_s):
            agreed -= 1
        cut = 0
        for i in range(agreed):
            if _CLAUSE_END.search(hyp.words[i].word):
                cut = i + 1
        if span_s >= self.chunk_seconds:
            cut = max(cut, agreed)
            if cut == 0 and span_s >= 2 * self.chunk_seconds and len(hyp.words) > 2:
                cut = len(hyp.words) - 2  # no agreement for too long: keep the span bounded
        if cut and _says_twice(hyp.words) and span_s < 2 * self.chunk_seconds:
            # Whisper looping ("2 9 3 4 0 2 9 3 4 0" for digits and then a reader's sentence): two
            # decodes agree on the loop, and its words' times spread over speech they never said.
            cut = 0
        if cut == 0:
            self._previous = hyp.words
            return []
        return self._cut(hyp, cut)

    def _heard_whole(self, word: Word, span_s: float) -> bool:
        """Whether ``word``, a decode's last, ends ``LAST_WORD_MARGIN_SECONDS`` before the span's
        end at a pause the VAD heard."""
        end = int(word.end * SAMPLE_RATE)
        reach = int(CUT_PAUSE_SECONDS * SAMPLE_RATE)
        return word.end <= span_s - LAST_WORD_MARGIN_SECONDS and self._pause_after(end, reach) != end

    def _ends_turn(self, word: Word) -> bool:
        """Whether ``word``, the last of a decode made as a pause began, ends a sentence said before
        that pause (``PAUSE_WORD_SLACK_SECONDS``)."""
        silence_began = self._span_len - self._silence_run
        return (
            self._pause_begun()
            and bool(_SENTENCE_END.search(word.word))
            and word.end * SAMPLE_RATE <= silence_began + PAUSE_WORD_SLACK_SECONDS * SAMPLE_RATE
        )

    def _cut(self, hyp: _Hypothesis, cut: int) -> list[Delta]:
        """Finalize ``hyp``'s first ``cut`` words and drop the audio up to the last one's end; the
        rest of the hypothesis stays the span's partial."""
        committed = hyp.words[:cut]
        cut_samples = min(int(committed[-1].end * SAMPLE_RATE), self._span_len)
        if cut_samples <= 0:
            self._previous = hyp.words
            return []
        # Word times often end a word early: the cut goes on to the pause after it, if there is
        # one before the next word begins, so that the word's tail is not the next span's head.
        reach = int(CUT_PAUSE_SECONDS * SAMPLE_RATE)
        if cut < len(hyp.words):
            next_start = int((hyp.words[cut].start + CUT_PAUSE_SLACK_SECONDS) * SAMPLE_RATE)
            reach = min(reach, max(0, next_start - cut_samples))
        cut_samples = self._pause_after(cut_samples, reach)
        if cut == len(hyp.words) and self._silence_run > 0:
            cut_samples = self._span_len  # the turn ended at the pause heard now: all of it is final
        delta = self._final(committed, self._span_start + cut_samples, hyp.confidence)
        self._drop_head(cut_samples)
        # Whatever follows the cut is the speaker going on (word times are approximate, and padding
        # counts as no speech): its words must not be dropped as too little speech at the pause.
        self._speech_len = max(self._speech_len - cut_samples, self._span_len - self._silence_run, 0)
        self._previous = [
            Word(
                start=max(0.0, w.start - cut_samples / SAMPLE_RATE),
                end=max(0.0, w.end - cut_samples / SAMPLE_RATE),
                word=w.word,
            )
            for w in hyp.words[cut:]
        ]
        return [delta] if delta else []

    def _drop_head(self, samples: int) -> None:
        """The span's first ``samples`` are finalized: the span goes on from there."""
        audio = self._audio()[samples:]
        self._span = [audio]
        self._span_start += samples
        self._span_len = audio.size
        self._last_decode_len = self._span_len
        self._probs_at -= samples
        while self._probs and self._probs_at < 0:
            self._probs.pop(0)
            self._probs_at += VAD_FRAME

    def _frames(self) -> list[tuple[int, float]]:
        """(first span sample, VAD speech probability) of each whole VAD frame of the span."""
        return [(self._probs_at + index * VAD_FRAME, prob) for index, prob in enumerate(self._probs)]

    def _pause_after(self, sample: int, reach: int) -> int:
        """The middle of the least speech-like VAD frame in the ``reach`` samples after ``sample``
        when it is below the stop threshold (the pause after a word whose time ends early); else
        ``sample``."""
        last = min(sample + reach, self._span_len)
        quiet = [
            (prob, start + VAD_FRAME // 2)
            for start, prob in self._frames()
            if sample <= start + VAD_FRAME // 2 <= last and prob < self.stop_threshold
        ]
        return min(quiet)[1] if quiet else sample

    def _pause_before(self, sample: int, reach: int) -> int | None:
        """The middle of the span's least speech-like VAD frame in the ``reach`` samples before
        ``sample`` (the latest of equals); ``None`` when there is none."""
        candidates = [
            (prob, abs(middle - sample), middle)
            for middle, prob in ((start + VAD_FRAME // 2, prob) for start, prob in self._frames())
            if sample - reach <= middle <= sample and VAD_FRAME <= middle
        ]
        return min(candidates)[2] if candidates else None

    def _cut_long_span(self) -> list[Delta]:
        """The span reached ``max_span_seconds`` without a pause or a confirmed cut (the caller is
        behind, so partials were skipped): finalize all but its last word, which may be cut off."""
        audio = self._audio()
        hyp = self._decode_checked(audio, word_timestamps=True)
        self._last_decode_len = self._span_len
        words = [w for w in hyp.words if w.end > 0]
        if len(words) < 2 or words[-2].end * SAMPLE_RATE < self._span_len / 3:
            # Few words, or word times that would cut off too little: all of it is the final.
            delta = self._final(hyp.words, self._span_start + self._span_len, hyp.confidence)
            self._span_start += self._span_len
            self._span = []
            self._span_len = 0
            self._speech_len = 0
            self._previous = None
            self._last_hyp = None
            return [delta] if delta else []
        deltas = self._cut(_Hypothesis(words, hyp.confidence), len(words) - 1)
        self._last_hyp = _Hypothesis(self._previous or [], hyp.confidence)
        return deltas

    def _end_utterance(self) -> list[Delta]:
        """A pause (or a flush): finalize all of the span, by a fresh decode or by the one made as
        the pause began, whose words are checked against the speech as a fresh one's are."""
        audio = self._audio()
        # Trailing silence beyond the padding only costs decode time (and invites inventions).
        keep = min(audio.size, max(0, audio.size - self._silence_run + self.pad))
        audio = audio[:keep]
        deltas: list[Delta] = []
        if (self._speech_len >= self.min_speech or self._previous) and audio.size:
            hyp = self._last_hyp
            if hyp is None or self._last_decode_len < audio.size - self.pad or self._too_short(hyp):
                hyp = self._decode_final(audio)
            else:
                hyp = self._fill_gaps(audio, hyp)
            delta = self._final(
                hyp.words,
                self._span_start + audio.size,
                hyp.confidence,
                echo_check=not hyp.filled,
                gaps_checked=True,
                at_pause=True,
            )
            if delta:
                deltas.append(delta)
        self._in_speech = False
        self._span = []
        self._span_len = 0
        self._speech_len = 0
        self._silence_run = 0
        self._previous = None
        self._last_hyp = None
        self._history = np.zeros(0, dtype=np.float32)  # no padding taken from before this end
        return deltas

    def _too_short(self, hyp: _Hypothesis) -> bool:
        speech_s = self._speech_len / SAMPLE_RATE
        return speech_s >= SHORT_CHECK_SECONDS and len(hyp.words) < MIN_WORDS_PER_SECOND * speech_s

    def _decode_checked(self, audio: np.ndarray, *, word_timestamps: bool, from_start: bool = True) -> _Hypothesis:
        """Decode, and again without the prompt when the answer has too few words for the speech.

        Whisper now and then answers a long span with a word or two: a loop cut back by
        ``_cut_repetition``, or the prompt's last words echoed ("Rear, Last," then "Last," for
        eight seconds of someone else speaking). Without the prompt it hears the span afresh; the
        longer answer is kept.
        """
        hyp = self._decode(audio, word_timestamps=word_timestamps, from_start=from_start)
        if self._too_short(hyp) and self._context and audio.size >= PROMPT_MIN_SECONDS * SAMPLE_RATE:
            retry = self._decode(audio, word_timestamps=word_timestamps, use_prompt=False)
            if len(retry.words) > len(hyp.words):
                hyp = retry
        return hyp

    def _decode_final(self, audio: np.ndarray) -> _Hypothesis:
        """The span's last decode, guarded against losing what was heard: checked as every decode
        is (``_decode_checked``), speech its words leave out decoded on its own (``_fill_gaps``),
        and if still much shorter than the partial before it, the partial's words are the final."""
        hyp = self._fill_gaps(audio, self._decode_checked(audio, word_timestamps=True))
        partial = self._previous or []
        if len(hyp.words) < 0.6 * len(partial) and len(partial) - len(hyp.words) >= 3:
            hyp = _Hypothesis(list(partial), hyp.confidence)
        return _with_dropped_voice(partial, hyp)

    def _fill_gaps(self, audio: np.ndarray, hyp: _Hypothesis) -> _Hypothesis:
        """Whisper, given two voices in one span, now and then answers with one of them only ("Ten
        of clubs." for five seconds of a reader and then that). Each run of at least
        ``GAP_CHECK_SECONDS`` of speech (by the VAD) that no word of ``hyp`` covers is decoded on
        its own, and its words join the hypothesis in time order. A word whose time overlaps the
        same word's in ``hyp`` (widened by ``GAP_SAME_WORD_SECONDS``: the decode's padding holds
        the edge of its neighbours) is that word heard again, not added twice; anywhere else it is
        said once more ("No." for a speaker's "No. No." that Whisper answered "No,")."""
        words = list(hyp.words)
        for first, last in self._uncovered(words, audio.size):
            first, last = max(0, first - self.pad), min(audio.size, last + self.pad)
            shift = first / SAMPLE_RATE
            for word in self._decode(audio[first:last], word_timestamps=True, use_prompt=False).words:
                placed = Word(start=word.start + shift, end=word.end + shift, word=word.word)
                widen = GAP_SAME_WORD_SECONDS
                if not any(
                    _key(w.word) == _key(placed.word) and w.start - widen < placed.end and placed.start < w.end + widen
                    for w in words
                ) and not _in_number(placed, words):
                    words.append(placed)
        if len(words) == len(hyp.words):
            return hyp
        return _Hypothesis(sorted(words, key=lambda w: w.start), hyp.confidence, filled=True)

    def _uncovered(self, words: list[Word], size: int) -> list[tuple[int, int]]:
        """Runs (span samples) of VAD speech frames within the first ``size`` samples, at least
        ``GAP_CHECK_SECONDS`` long, that no word's time covers; a pause shorter than
        ``GAP_BRIDGE_SECONDS`` inside a run does not end it, a covered frame does."""
        covered = np.zeros(size, dtype=bool)
        slack = GAP_WORD_SLACK_SECONDS
        for word in words:
            covered[max(0, int((word.start - slack) * SAMPLE_RATE)) : max(0, int((word.end + slack) * SAMPLE_RATE))] = (
                True
            )
        runs: list[tuple[int, int]] = []
        run_start: int | None = None
        run_end = 0
        bridge = GAP_BRIDGE_SECONDS * SAMPLE_RATE
        for start, prob in self._frames():
            end = start + VAD_FRAME
            if start < 0 or end > size:
                continue
            in_word = bool(covered[start:end].any())
            speech = prob >= self.start_threshold and not in_word
            if run_start is not None and (in_word or (speech and start - run_end > bridge)):
                runs.append((run_start, run_end))  # a word, or a pause longer than the bridge, ends it
                run_start = None
            if speech:
                run_start = start if run_start is None else run_start
                run_end = end
        if run_start is not None:
            runs.append((run_start, run_end))
        return [(first, last) for first, last in runs if last - first >= GAP_CHECK_SECONDS * SAMPLE_RATE]

    def _without_echo(self, words: list[Word], end_sample: int) -> list[Word]:
        """``words`` without a last run that merely repeats the one before it ("left left", "Thank
        you. Thank you.") where the speech holds it once: Whisper, decoding a short span, often
        says its last words twice. The span up to ``end_sample`` is decoded again with word times;
        the repeat is dropped when that decode does not repeat them, or squeezes the copy into
        less than ``ECHO_WORD_SECONDS`` a word or ``ECHO_SHARE`` of the time of the words it
        repeats (real speech that says it twice takes the time to)."""
        count = _trailing_repeat(words)
        if not count:
            return words
        audio = self._audio()[: max(0, end_sample - self._span_start)]
        timed = self._decode(audio, word_timestamps=True).words
        if _trailing_repeat(timed) != count:
            return words[:-count]
        if len({(word.start, word.end) for word in timed}) == 1:
            return words  # one span for every word (a relay without word times): nothing to judge by
        copy, original = timed[-count:], timed[-2 * count : -count]
        squeezed = max(ECHO_WORD_SECONDS * count, ECHO_SHARE * (original[-1].end - original[0].start))
        return words[:-count] if copy[-1].end - copy[0].start < squeezed else words

    def _final(
        self,
        words: list[Word],
        end_sample: int,
        confidence: float | None,
        *,
        echo_check: bool = True,
        gaps_checked: bool = False,
        at_pause: bool = False,
    ) -> Delta | None:
        """The final of ``words`` up to ``end_sample``. Whatever made it (a pause, two decodes that
        agree, a split, a span too long), speech its words do not cover is heard on its own first
        (``_fill_gaps``): two decodes can agree in leaving out a voice, an overlapped question under
        the next speaker's words (``gaps_checked``: the caller did that). ``echo_check`` false, or
        words so filled: a repeat at its end was heard in speech of its own, not said twice by one
        decode."""
        if not gaps_checked:
            heard = self._fill_gaps(
                self._audio()[: max(0, end_sample - self._span_start)], _Hypothesis(words, confidence)
            )
            words, echo_check = heard.words, echo_check and not heard.filled
        if echo_check:
            words = self._without_echo(words, end_sample)
        text = " ".join(w.word for w in words).strip()
        if not text:
            return None
        self._hear(self._audio()[: max(0, end_sample - self._span_start)], words, closed=at_pause)
        start = max(self._span_start / SAMPLE_RATE, self._last_final_end)
        end = max(start, end_sample / SAMPLE_RATE)
        self._last_final_end = end
        self._context = (self._context + " " + text).strip()[-400:]
        return Delta(text, True, round(start, 3), round(end, 3), confidence)
