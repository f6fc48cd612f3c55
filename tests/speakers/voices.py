"""Speakers for the tests: clearly distinct espeak-ng voices, and enrollment through the API."""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.core.files.uploadedfile import SimpleUploadedFile

from speakers.models import Speaker
from tests.voices import synth_speech

SPEAKERS_URL = "/v1/modules/scaiecho/speakers"
CONSENT_TEXT = "I agree that my voice may be used to recognise me in meeting transcripts."
PURPOSE = "Attribute speech in the team's meeting transcripts to the people who spoke."
REFERENCE_TEXT = (
    "The quick brown fox jumps over the lazy dog. We walked along the river until the sun went down, "
    "and then we talked about the plans for the garden."
)


@dataclass(frozen=True)
class Voice:
    name: str
    espeak: str


# Clearly different speakers (models.md): male, female and a Scottish voice; a fourth for "unknown".
ALICE = Voice("Alice", "en+f3")
BORIS = Voice("Boris", "en-gb-scotland+david")
CARL = Voice("Carl", "en-us")
STRANGER = Voice("Stranger", "en-us+Annie")


def say(voice: Voice, text: str) -> bytes:
    return synth_speech(text, voice=voice.espeak)


def enrollment_form(
    voice: Voice, *, consent_voice: Voice | None = None, consent_words: str | None = None, **overrides: object
) -> dict[str, object]:
    form: dict[str, object] = {
        "display_name": voice.name,
        "language_primary": "en",
        "description": f"{voice.name} from the test team",
        "consent_user_full_name": f"{voice.name} Example",
        "consent_stated_purpose": PURPOSE,
        "consent_text": CONSENT_TEXT,
        "reference": SimpleUploadedFile("reference.wav", say(voice, REFERENCE_TEXT)),
        "consent": SimpleUploadedFile("consent.wav", say(consent_voice or voice, consent_words or CONSENT_TEXT)),
    }
    form.update(overrides)
    return {key: value for key, value in form.items() if value is not None}


def enroll(api, key, voice: Voice, **kwargs: object):
    return api.post(SPEAKERS_URL, enrollment_form(voice, **kwargs), format="multipart", headers=key.headers)


def wait_enrolled(speaker_id: str, *, timeout: float = 120) -> Speaker:
    """Wait until the worker has decided (the status leaves ``pending``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        speaker = Speaker.objects.get(pk=speaker_id)
        if speaker.status != Speaker.Status.PENDING:
            return speaker
        time.sleep(0.2)
    raise AssertionError(f"enrollment of {speaker_id} still pending after {timeout} s")


def enroll_ready(api, key, voice: Voice) -> str:
    response = enroll(api, key, voice)
    assert response.status_code == 202, response.content
    speaker = wait_enrolled(response.json()["data"]["id"])
    assert speaker.status == Speaker.Status.READY, (speaker.status, speaker.status_reasons, speaker.verification)
    return str(speaker.pk)
