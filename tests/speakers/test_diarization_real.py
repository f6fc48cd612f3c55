"""Diarization on conversations of real people (tests/conversations.py), with the real ECAPA model
and the default thresholds: the speaker count, each turn's words under one label, a forced count,
one person staying one speaker, an enrolled person named (batch and stream, wideband and over a
phone line, enrolled over the line or from a wideband clip), and a stream final split at a change.

Words are the reference text spread evenly over each turn (the timing Whisper's word timestamps
give, without running Whisper), so a failure here is the diarizer's, not the recognizer's.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import pytest
from django.conf import settings

from speakers.diarization import SpeakerTracker, attribute_final, diarize_recording
from speakers.selectors import Candidate
from speech.engines.base import Segment, Word
from streaming.worker import STREAM_EMBED_SECONDS
from tests.conversations import Conversation, Turn, conversations, enrollment_clip, phone_band

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wideband() -> dict[str, Conversation]:
    return {c.name: c for c in conversations(band="wideband")}


def by_speakers(convs: dict[str, Conversation], count: int) -> Conversation:
    return next(c for c in convs.values() if len(c.speakers) == count)


def turn_words(turn: Turn) -> list[Word]:
    """The turn's words spread evenly over it (as word timestamps would be)."""
    tokens = (turn.text or "").split()
    step = (turn.end - turn.start) / len(tokens)
    return [Word(turn.start + i * step, turn.start + (i + 1) * step, f" {t}") for i, t in enumerate(tokens)]


def turn_segments(conv: Conversation) -> list[Segment]:
    """One segment per turn, with its words."""
    return [Segment(start=turn.start, end=turn.end, text=turn.text or "", words=turn_words(turn)) for turn in conv.turns]


def word_labels(segments: list[Segment]) -> list[tuple[float, str]]:
    return [((w.start + w.end) / 2, s.speaker_label) for s in segments for w in s.words or []]


def turn_majorities(conv: Conversation, segments: list[Segment]) -> list[tuple[str, str, float]]:
    """(speaker, majority label, share of the turn's words under it) for each turn of 1.5 s or more."""
    labelled = word_labels(segments)
    found = []
    for turn in conv.turns:
        if turn.end - turn.start < 1.5:
            continue
        inside = Counter(label for t, label in labelled if turn.start <= t <= turn.end)
        label, count = inside.most_common(1)[0]
        found.append((turn.speaker, label, count / sum(inside.values())))
    return found


def assert_one_label_per_person(
    conv: Conversation, segments: list[Segment], *, mostly_share: float = 0.9, turn_share: float = 0.8
) -> None:
    """Each turn's words mostly under one label (on average ``mostly_share``, and ``turn_share`` in
    four turns of five), one label per person."""
    majorities = turn_majorities(conv, segments)
    mostly = [share for _, _, share in majorities]
    assert np.mean(mostly) >= mostly_share, majorities
    assert sum(share >= turn_share for share in mostly) >= 0.8 * len(mostly), majorities
    people = {}
    for speaker, label, _ in majorities:
        people.setdefault(speaker, Counter())[label] += 1
    labels = {speaker: counts.most_common(1)[0][0] for speaker, counts in people.items()}
    assert len(set(labels.values())) == len(labels), labels  # distinct per person


@pytest.mark.parametrize("band", ["wideband", "phone"])
def test_real_conversations_get_one_label_per_person(encoder, band):
    """Every conversation with text (2-4 people), wideband and over a phone line (each cut at its
    band's threshold): the count exact in every one (over all 20, the untranscribed radio ones
    included, 9/10 wideband and 9/10 phone; the phone band's cards-ast-alsa, where one person
    speaks only in half-second bursts, had two labels for three people while short windows were
    compared with cluster centroids), and each turn's words under one label, one label per person."""
    convs = conversations(band=band)
    exact = 0
    for conv in convs:
        segments = diarize_recording(conv.samples, turn_segments(conv), encoder=encoder, candidates=[])
        assert all(s.text.strip() for s in segments)
        assert segments[0].speaker_label == "SPEAKER_1"  # numbered by first appearance
        # Nothing is lost or reordered: the segments hold the reference words in order.
        assert " ".join(s.text for s in segments).split() == conv.reference_text.split()
        if len({s.speaker_label for s in segments}) == len(conv.speakers):
            exact += 1
            # Over a phone line the windows at turn changes blur more (DER 7.6 % against 3.9 %): a
            # short turn of a minor speaker can lose a third of its words to the neighbouring voice.
            phone = band == "phone"
            assert_one_label_per_person(conv, segments, mostly_share=0.85 if phone else 0.9, turn_share=0.6 if phone else 0.8)
    assert exact == len(convs), exact


def test_num_speakers_forces_the_count(encoder, wideband):
    conv = by_speakers(wideband, 3)
    segments = diarize_recording(conv.samples, turn_segments(conv), encoder=encoder, candidates=[], num_speakers=2)
    assert len({s.speaker_label for s in segments}) == 2
    bounded = diarize_recording(conv.samples, turn_segments(conv), encoder=encoder, candidates=[], max_speakers=2)
    assert len({s.speaker_label for s in bounded}) == 2


@pytest.mark.parametrize("speaker", ["asterisk", "librivox", "dhd", "cards"])
def test_one_real_person_stays_one_speaker(encoder, speaker):
    samples = enrollment_clip(speaker)
    seconds = samples.size / 16000
    tokens = "one two three four five six seven eight nine ten".split()
    words = [Word(i * seconds / 10, (i + 1) * seconds / 10, f" {t}") for i, t in enumerate(tokens)]
    segments = diarize_recording(samples, [Segment(0.0, seconds, " ".join(tokens), words=words)], encoder=encoder, candidates=[])
    assert {s.speaker_label for s in segments} == {"SPEAKER_1"}
    assert len(segments) == 1


def test_an_enrolled_real_person_is_named_in_the_conversation(encoder, wideband):
    conv = next(c for c in wideband.values() if "librivox" in c.speakers and len(c.speakers) >= 3)
    enrolled = Candidate(speaker_id="id-librivox", label="Reader", embedding=encoder.embed(enrollment_clip("librivox")))
    segments = diarize_recording(conv.samples, turn_segments(conv), encoder=encoder, candidates=[enrolled])
    names = {speaker: label for speaker, label, _ in turn_majorities(conv, segments)}
    assert names["librivox"] == "Reader", names
    assert all(label.startswith("SPEAKER_") for speaker, label in names.items() if speaker != "librivox"), names
    assert {s.speaker_id for s in segments if s.speaker_label == "Reader"} == {"id-librivox"}
    assert_one_label_per_person(conv, segments)


def test_a_stream_final_spanning_two_people_is_split_between_them(encoder, wideband):
    conv = by_speakers(wideband, 2)
    # Two consecutive turns of different people, of 2 s or more each, as one final.
    first, second = next(
        (a, b) for a, b in zip(conv.turns, conv.turns[1:], strict=False)
        if a.speaker != b.speaker and a.end - a.start >= 2.0 and b.end - b.start >= 2.0 and b.start >= a.end
    )
    start, end = first.start, second.end
    text = f"{first.text} {second.text}"
    tracker = SpeakerTracker(match_threshold=settings.SCAIECHO_SPEAKER_MATCH_THRESHOLD, anon_threshold=settings.SCAIECHO_SPEAKER_CLUSTER_THRESHOLD)
    pieces = attribute_final(conv.samples, start=start, end=end, text=text, encoder=encoder, tracker=tracker, candidates=[])
    assert len(pieces) == 2, pieces
    assert pieces[0].speaker_label != pieces[1].speaker_label
    # Without word times the cut is by speaking rate: within two words of the true change.
    cut = len(pieces[0].text.split())
    assert abs(cut - len((first.text or "").split())) <= 2, (pieces, first.text)
    assert " ".join(p.text for p in pieces) == text
    # The same voice later in the session keeps its label.
    again = next(t for t in conv.turns if t.speaker == second.speaker and t.start > second.end and t.end - t.start >= 1.5)
    [later] = attribute_final(conv.samples, start=again.start, end=again.end, text=again.text or "", encoder=encoder, tracker=tracker, candidates=[])
    assert later.speaker_label == pieces[1].speaker_label


# --- Enrolled people and strangers in one session: stream and phone band -------------------------


def enrolled_and_strangers(conv: Conversation) -> tuple[list[str], list[str]]:
    """Everybody but two people enrolled (one of three, two of four): two strangers are left to
    tell apart."""
    return conv.speakers[:-2], conv.speakers[-2:]


def enroll(encoder, people: list[str], band: str) -> list[Candidate]:
    """Enrolled from each person's own clip, recorded the way they are heard: a phone caller's
    reference as it comes down the line."""
    clips = {name: enrollment_clip(name) for name in people}
    if band == "phone":
        clips = {name: phone_band(clip) for name, clip in clips.items()}
    return [Candidate(speaker_id=f"id-{name}", label=name.title(), embedding=encoder.embed(clip)) for name, clip in clips.items()]


def stream_finals(conv: Conversation) -> list[list[Turn]]:
    """The turns as stream finals: two turns of different people of 1.5 s or more, one after the
    other, in one final (a final the stream splits; shorter turns are too short for its windows
    to tell apart), any other turn a final of its own."""
    finals, index = [], 0
    while index < len(conv.turns):
        a, b = conv.turns[index], conv.turns[index + 1] if index + 1 < len(conv.turns) else None
        if b and a.speaker != b.speaker and min(a.end - a.start, b.end - b.start) >= 1.5 and b.start >= a.end:
            finals.append([a, b])
        else:
            finals.append([a])
        index += len(finals[-1])
    return finals


@dataclass(frozen=True)
class Streamed:
    conv: Conversation
    enrolled: list[str]
    strangers: list[str]
    finals: list[list[Turn]]
    labels: dict[Turn, str]  # each turn and the label of most of its words
    anon_threshold: float


def stream_session(conv: Conversation, encoder, candidates: list[Candidate]) -> tuple[dict[Turn, str], float]:
    """Feed the conversation to one session's tracker the way the stream worker does: each final
    with the audio the worker holds when it is cut (half a second past its end), its word times,
    a short final embedded with the audio after it."""
    tracker = SpeakerTracker()
    labels = {}
    for turns in stream_finals(conv):
        start, end = turns[0].start, max(turn.end for turn in turns)
        words = [word for turn in turns for word in turn_words(turn)]
        owners = [turn for turn in turns for _ in turn_words(turn)]
        held = min(conv.duration_s, end + 0.5)
        pieces = attribute_final(
            conv.samples[: int(held * 16000)],
            start=start,
            end=end,
            text=" ".join(turn.text or "" for turn in turns),
            words=words,
            embed_until=max(end, min(start + STREAM_EMBED_SECONDS, held)),
            encoder=encoder,
            tracker=tracker,
            candidates=candidates,
        )
        spoken = [piece.speaker_label for piece in pieces for _ in piece.text.split()]
        assert len(spoken) == len(owners), pieces  # every word comes back, once
        for turn in turns:
            counts = Counter(label for owner, label in zip(owners, spoken, strict=True) if owner is turn)
            labels[turn] = counts.most_common(1)[0][0]
    assert tracker.anon_threshold is not None
    return labels, tracker.anon_threshold


@pytest.fixture(scope="module")
def streamed(encoder):
    """Each conversation of three or four people with text, in either band, streamed once for the
    module (embedding is the slow part)."""

    @cache
    def run(band: str) -> list[Streamed]:
        out = []
        for conv in conversations(band=band):
            if len(conv.speakers) < 3:
                continue
            enrolled, strangers = enrolled_and_strangers(conv)
            labels, threshold = stream_session(conv, encoder, enroll(encoder, enrolled, band))
            out.append(Streamed(conv, enrolled, strangers, stream_finals(conv), labels, threshold))
        return out

    return run


def figures(sessions: list[Streamed]) -> dict[str, int]:
    """Named: enrolled turns under their name. Misnamed: strangers' turns under an enrolled name.
    Steady: strangers with one label for all their turns. Apart: sessions whose strangers have
    labels of their own. Split: finals of two people whose two turns came back under two labels."""
    out = Counter()
    for session in sessions:
        names = {name: name.title() for name in session.enrolled}
        by_stranger: dict[str, set[str]] = {name: set() for name in session.strangers}
        for turn, label in session.labels.items():
            if turn.speaker in names:
                out["enrolled_turns"] += 1
                out["named"] += label == names[turn.speaker]
            else:
                out["stranger_turns"] += 1
                out["misnamed"] += label in names.values()
                by_stranger[turn.speaker].add(label)
        out["strangers"] += len(by_stranger)
        steady = [labels for labels in by_stranger.values() if len(labels) == 1]
        out["steady"] += len(steady)
        out["apart"] += len(steady) == len(by_stranger) and len(set.union(*steady)) == len(steady)
        out["sessions"] += 1
        pairs = [turns for turns in session.finals if len(turns) == 2]
        out["two_person_finals"] += len(pairs)
        out["split"] += sum(session.labels[first] != session.labels[second] for first, second in pairs)
    return dict(out)


@pytest.mark.parametrize("band", ["wideband", "phone"])
def test_enrolled_real_people_are_named_in_a_stream_and_strangers_keep_their_labels(streamed, band):
    """Five sessions of three or four real people, all but two enrolled: the enrolled are named, and
    each of the two others keeps one SPEAKER_n of their own for the whole session. Measured with
    the defaults, wideband / phone: named 22/27 and 21/27 turns, no stranger misnamed, 10/10
    strangers steady, both strangers apart in 4/5 and 5/5 sessions (on the phone line 1/5 at the
    wideband threshold the tracker used before it read the band), 5/7 and 6/7 finals of two people
    split between them."""
    sessions = streamed(band)
    found = figures(sessions)
    assert found["sessions"] == 5
    assert found["named"] >= 0.7 * found["enrolled_turns"], found
    assert found["misnamed"] <= 1, found
    assert found["steady"] >= found["strangers"] - 1, found
    assert found["apart"] >= found["sessions"] - 1, found
    assert found["two_person_finals"] >= 5, found
    assert found["split"] >= found["two_person_finals"] / 2, found
    for session in sessions:
        strangers = {label for turn, label in session.labels.items() if turn.speaker in session.strangers}
        assert all(label.startswith("SPEAKER_") for label in strangers), session.labels
    if band == "phone":  # each session read its band from its first final
        assert {session.anon_threshold for session in sessions} == {settings.SCAIECHO_SPEAKER_CLUSTER_THRESHOLD_NARROWBAND}


def test_an_enrolled_real_person_is_named_over_a_phone_line(encoder):
    """Batch over a phone line (cut at the narrowband threshold), the reference recorded over the
    line as well: the reader is named, the two others are two SPEAKER_n. Over all ten phone-band
    conversations and each choice of one or two enrolled people, a phone-band reference named 141
    of 158 enrolled turns, a wideband one alone 112 (the next test: enrollment now keeps both)."""
    conv = next(c for c in conversations(band="phone") if c.speakers == ["cards", "dhd", "librivox"])
    [enrolled] = enroll(encoder, ["librivox"], "phone")
    segments = diarize_recording(conv.samples, turn_segments(conv), encoder=encoder, candidates=[enrolled])
    names = {speaker: label for speaker, label, _ in turn_majorities(conv, segments)}
    assert names["librivox"] == "Librivox", names
    assert names["cards"] != names["dhd"], names
    assert all(label.startswith("SPEAKER_") for speaker, label in names.items() if speaker != "librivox"), names
    assert {s.speaker_id for s in segments if s.speaker_label == "Librivox"} == {"id-librivox"}
    assert_one_label_per_person(conv, segments, mostly_share=0.85, turn_share=0.6)


# --- Enrolled from a wideband clip, heard over a phone line ---------------------------------------


class Remembering:
    """The encoder, remembering what it embedded: the same audio is diarized against two sets of
    references, and only the matching differs."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.seen: dict[bytes, np.ndarray] = {}

    def embed(self, audio: np.ndarray) -> np.ndarray:
        key = hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).digest()
        if key not in self.seen:
            self.seen[key] = self.encoder.embed(audio)
        return self.seen[key]


def test_people_enrolled_from_wideband_clips_are_named_over_a_phone_line(encoder):
    """The reader and the cards speaker enrolled as enrollment stores them (their wideband clip's
    embedding and its phone-band copy's), heard in a phone-band conversation with a stranger: both
    named in batch, and in a stream every turn of 1.5 s or more (the cards speaker's others are
    shorter), the stranger never. With the wideband references alone the cards speaker (0.22 alike
    to their own reference on the line) went unnamed in both, and the stream named 2 of the 7
    turns. Over the ten phone-band conversations, each choice of one or two enrolled people, turns
    of 1.5 s or more: batch 152 -> 161 of 161 named, stream 122 -> 155, no stranger's turn more
    misnamed (batch 0, stream 5 of 146 either way)."""
    conv = next(c for c in conversations(band="phone") if c.speakers == ["cards", "dhd", "librivox"])
    memo = Remembering(encoder)
    clips = {name: enrollment_clip(name) for name in ("cards", "librivox")}
    both = [
        Candidate(f"id-{name}", name.title(), encoder.embed(clip), phone_embedding=encoder.embed(phone_band(clip)))
        for name, clip in clips.items()
    ]
    wideband_only = [replace(candidate, phone_embedding=None) for candidate in both]

    def batch(candidates: list[Candidate]) -> tuple[list[Segment], dict[str, str]]:
        segments = diarize_recording(conv.samples, turn_segments(conv), encoder=memo, candidates=candidates)
        return segments, {speaker: label for speaker, label, _ in turn_majorities(conv, segments)}

    segments, names = batch(both)
    assert (names["cards"], names["librivox"]) == ("Cards", "Librivox"), names
    assert names["dhd"].startswith("SPEAKER_"), names
    assert {s.speaker_id for s in segments if s.speaker_label == "Cards"} == {"id-cards"}
    assert_one_label_per_person(conv, segments, mostly_share=0.85, turn_share=0.6)
    assert batch(wideband_only)[1]["cards"].startswith("SPEAKER_")  # what the phone-band reference is for

    def stream(candidates: list[Candidate]) -> dict[Turn, str]:
        return stream_session(conv, memo, candidates)[0]

    labels = stream(both)
    enrolled = [turn for turn in conv.turns if turn.speaker != "dhd"]
    assert all(labels[t] == t.speaker.title() for t in enrolled if t.end - t.start >= 1.49), labels
    assert sum(labels[t] == t.speaker.title() for t in enrolled) >= 5, labels
    assert all(label.startswith("SPEAKER_") for t, label in labels.items() if t.speaker == "dhd"), labels
    before = stream(wideband_only)
    assert sum(before[t] == t.speaker.title() for t in enrolled) < sum(labels[t] == t.speaker.title() for t in enrolled)
