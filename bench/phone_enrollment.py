"""Speakers enrolled from wideband clips, heard over a phone line: named turns with the wideband
reference alone (speakers enrolled before the phone-band one was stored) and with both.

    .venv/bin/python -m bench.phone_enrollment [phone] [wideband]

Self-contained (the project's venv and the Debian packages of ``tests/conversations.py``); no
database or server. Over the ten conversations of each band (with and without transcripts; an
untranscribed turn gets placeholder words), each choice of one or two of their people who have
enrollment audio, it diarizes the recording in batch and streams it the way the stream worker does
(``tests/speakers/test_diarization_real.stream_session``), and prints, for turns of 1.5 s or more
(each under the label of most of its words), the enrolled people's turns named and the turns given
another person's name, then the same for every turn. Embeddings are computed once per audio and
reused across choices (about 8 minutes for both bands on 2 cores).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from collections import Counter
from dataclasses import replace

import numpy as np

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")

# The people of tests/conversations.py who have audio no conversation contains.
ENROLLABLE = ("asterisk", "librivox", "alsa", "dhd", "cards", "ve9qrp", "vk5qi")
MIN_TURN_SECONDS = 1.5


class Remembering:
    """The speaker model, embedding each distinct audio once."""

    def __init__(self) -> None:
        from speech.embedding import SpeakerEncoder

        self.model = SpeakerEncoder(cpu_threads=1)
        self.model.load()
        self.seen: dict[bytes, np.ndarray] = {}

    def embed(self, audio: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(audio, dtype=np.float32)
        key = hashlib.sha256(samples.tobytes()).digest()
        if key not in self.seen:
            self.seen[key] = self.model.embed(samples)
        return self.seen[key]


def count(turn_labels: list[tuple[object, str]], chosen: tuple[str, ...], out: Counter, mode: str) -> None:
    names = {name: name.title() for name in chosen}
    for turn, label in turn_labels:
        long = turn.end - turn.start >= MIN_TURN_SECONDS  # type: ignore[attr-defined]
        speaker = turn.speaker  # type: ignore[attr-defined]
        wrong = label in names.values() and label != names.get(speaker)
        for scope in ("long", "all") if long else ("all",):
            out[mode, scope, "wrong"] += wrong
            if speaker in names:
                out[mode, scope, "enrolled"] += 1
                out[mode, scope, "named"] += label == names[speaker]
            else:
                out[mode, scope, "strangers"] += 1


def main(argv: list[str] | None = None) -> int:
    import django

    django.setup()
    from speakers.diarization import diarize_recording
    from speakers.selectors import Candidate
    from speech import clustering
    from speech.audio import phone_band
    from tests.conversations import Conversation, conversations, enrollment_clip
    from tests.speakers.test_diarization_real import stream_session, turn_segments, word_labels

    bands = (argv if argv is not None else sys.argv[1:]) or ["phone", "wideband"]
    encoder = Remembering()
    clips = {name: enrollment_clip(name) for name in ENROLLABLE}
    references = {name: (encoder.embed(clip), encoder.embed(phone_band(clip))) for name, clip in clips.items()}
    for band in bands:
        found: Counter = Counter()
        for conv in conversations(band=band, with_text=False):
            turns = [
                turn
                if turn.text
                else replace(turn, text=" ".join(["w"] * max(1, round((turn.end - turn.start) / 0.35))))
                for turn in conv.turns
            ]
            conv = Conversation(conv.name, conv.samples, turns, conv.band, conv.overlaps)
            regions = clustering.speech_regions(conv.samples)
            present = [name for name in conv.speakers if name in ENROLLABLE]
            for chosen in itertools.chain.from_iterable(itertools.combinations(present, k) for k in (1, 2)):
                for refs in ("wideband", "both"):
                    candidates = [
                        Candidate(f"id-{name}", name.title(), references[name][0])
                        if refs == "wideband"
                        else Candidate(f"id-{name}", name.title(), *references[name])
                        for name in chosen
                    ]
                    segments = diarize_recording(
                        conv.samples, turn_segments(conv), encoder=encoder, candidates=candidates, regions=regions
                    )
                    labelled = word_labels(segments)
                    majority = [
                        (turn, Counter(lab for t, lab in labelled if turn.start <= t <= turn.end).most_common(1)[0][0])
                        for turn in conv.turns
                    ]
                    count(majority, chosen, found, f"{refs}/batch")
                    count(list(stream_session(conv, encoder, candidates)[0].items()), chosen, found, f"{refs}/stream")
        print(f"{band}: 10 conversations, each choice of 1 or 2 enrolled from wideband clips")
        for refs in ("wideband", "both"):
            cells = []
            for mode in ("batch", "stream"):
                for scope in ("long", "all"):
                    key = (f"{refs}/{mode}", scope)
                    cells.append(
                        f"{mode} {scope} named {found[(*key, 'named')]}/{found[(*key, 'enrolled')]}"
                        f" wrong {found[(*key, 'wrong')]}"
                    )
            print(f"  references {refs:8s} " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
