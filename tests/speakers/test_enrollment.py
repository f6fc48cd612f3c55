"""Enrollment end to end: the API, a real Celery worker with the real ECAPA and Whisper models,
consent verification on espeak-ng voices, erasure of a ready speaker, and diarized batch jobs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from speakers import crypto
from speakers.models import ConsentEvent, ConsentRecord, ErasureAudit, Speaker, SpeakerEmbedding
from speakers.services import STORAGE_PREFIX
from speech.audio import decode_audio, wav_bytes
from speech.embedding import EMBEDDING_DIM, embedding_from_bytes
from tenants.models import Role, TenantPolicy
from tests.factories import KeyFactory
from tests.speakers.voices import (
    ALICE,
    BORIS,
    CARL,
    CONSENT_TEXT,
    SPEAKERS_URL,
    Voice,
    enroll,
    enroll_ready,
    say,
    wait_enrolled,
)
from tests.voices import word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TRANSCRIBE_URL = "/v1/modules/scaiecho/transcribe"
STRANGER = Voice("Stranger", "en-029+Andy")  # enrolled by nobody


def keys_in(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in keys_in(item)}
    if isinstance(value, list):
        return {key for item in value for key in keys_in(item)}
    return set()


def assert_no_embedding_in(body: dict, speaker_id: str) -> None:
    """No key names an embedding, and none of the stored vector's numbers appear in the body."""
    assert not {key for key in keys_in(body) if "embedding" in key or "vector" in key}
    row = SpeakerEmbedding.objects.filter(speaker_id=speaker_id).first()
    if row is not None:
        text = json.dumps(body)
        for ciphertext in (row.ciphertext, row.phone_ciphertext):
            vector = embedding_from_bytes(crypto.decrypt(bytes(ciphertext)))
            assert not any(f"{value:.6f}"[:8] in text for value in vector[:16])


@pytest.fixture
def enroller():
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    return key


def test_enrollment_verifies_the_consent_and_becomes_ready(api, speech_worker, enroller):
    created = enroll(api, enroller, ALICE)
    assert created.status_code == 202, created.content
    speaker_id = created.json()["data"]["id"]
    speaker = wait_enrolled(speaker_id)
    assert speaker.status == "ready", (speaker.status_reasons, speaker.verification)
    body = api.get(f"{SPEAKERS_URL}/{speaker_id}", headers=enroller.headers).json()
    data = body["data"]
    assert data["status"] == "ready"
    assert data["enrollment"] == {"stage": "done", "attempts": 1}
    assert data["verification"]["consent_wer"] <= 0.35
    assert data["verification"]["voice_similarity"] >= 0.4
    assert data["verified_at"] is not None
    assert_no_embedding_in(body, speaker_id)
    assert_no_embedding_in(api.get(SPEAKERS_URL, headers=enroller.headers).json(), speaker_id)
    kinds = list(ConsentEvent.objects.filter(speaker_id=speaker_id).values_list("kind", flat=True))
    assert kinds == ["captured", "verified"]
    verified = ConsentEvent.objects.get(speaker_id=speaker_id, kind="verified")
    assert verified.details["voice_similarity"] == data["verification"]["voice_similarity"]
    row = SpeakerEmbedding.objects.get(speaker_id=speaker_id)
    vector = embedding_from_bytes(crypto.decrypt(bytes(row.ciphertext)))
    assert vector.shape == (EMBEDDING_DIM,)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-3
    assert vector.astype("<f4").tobytes() not in bytes(row.ciphertext)  # encrypted at rest
    # The reference through a phone line, stored the same way: another vector of the same voice.
    phone = embedding_from_bytes(crypto.decrypt(bytes(row.phone_ciphertext)))
    assert abs(float(np.linalg.norm(phone)) - 1) < 1e-3
    assert phone.astype("<f4").tobytes() not in bytes(row.phone_ciphertext)
    assert row.phone_sha256 == hashlib.sha256(phone.astype("<f4").tobytes()).hexdigest() != row.sha256
    assert float(vector @ phone) < 0.99  # not a copy
    assert word_error_rate(CONSENT_TEXT, ConsentRecord.objects.get(speaker_id=speaker_id).consent_transcript) <= 0.25


def test_consent_that_says_other_words_is_rejected(api, speech_worker, enroller):
    created = enroll(api, enroller, ALICE, consent_words="The weather will be sunny tomorrow with a light breeze from the west.")
    speaker = wait_enrolled(created.json()["data"]["id"])
    assert speaker.status == "failed"
    assert speaker.status_reasons == ["consent_words_mismatch"]
    assert speaker.verification["consent_wer"] > 0.35
    assert not SpeakerEmbedding.objects.filter(speaker=speaker).exists()
    rejected = ConsentEvent.objects.get(speaker_id=speaker.pk, kind="rejected")
    assert rejected.details["fail_reasons"] == ["consent_words_mismatch"]


def test_consent_in_another_voice_is_rejected(api, speech_worker, enroller):
    created = enroll(api, enroller, BORIS, consent_voice=ALICE)
    speaker = wait_enrolled(created.json()["data"]["id"])
    assert speaker.status == "failed"
    assert speaker.status_reasons == ["consent_voice_mismatch"]
    assert speaker.verification["voice_similarity"] < 0.4
    assert not SpeakerEmbedding.objects.filter(speaker=speaker).exists()


def test_a_tenant_requiring_review_holds_verified_enrollments(api, speech_worker, enroller):
    TenantPolicy.objects.filter(tenant=enroller.tenant).update(speaker_review_required=True)
    speaker = wait_enrolled(enroll(api, enroller, CARL).json()["data"]["id"])
    assert speaker.status == "pending_review"
    assert SpeakerEmbedding.objects.filter(speaker=speaker).exists()


def test_erasure_destroys_both_embeddings_and_both_recordings(api, speech_worker, enroller):
    speaker_id = enroll_ready(api, enroller, ALICE)
    consent = ConsentRecord.objects.get(speaker_id=speaker_id)
    embedding = SpeakerEmbedding.objects.get(speaker_id=speaker_id)
    files = [consent.reference_path, consent.consent_path]
    assert all(default_storage.exists(name) for name in files)
    response = api.delete(f"{SPEAKERS_URL}/{speaker_id}", headers=enroller.headers)
    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "erased"
    assert not SpeakerEmbedding.objects.filter(speaker_id=speaker_id).exists()
    assert not any(default_storage.exists(name) for name in files)
    audit = ErasureAudit.objects.get(speaker_id=speaker_id)
    destroyed = {item["item"]: item for item in audit.destroyed}
    assert destroyed["embedding"]["sha256"] == embedding.sha256
    assert destroyed["phone_embedding"]["sha256"] == embedding.phone_sha256 != ""
    assert destroyed["reference_recording"]["sha256"] == consent.reference_sha256
    assert destroyed["consent_recording"]["existed"] is True
    assert audit.actor_id == enroller.membership.user_id
    speaker = Speaker.objects.get(pk=speaker_id)
    assert (speaker.status, speaker.display_name) == ("erased", "")
    # Nothing about the speaker is cached anywhere: diarization reads candidates fresh each time.
    cache = redis.Redis.from_url(settings.REDIS_URL)
    assert list(cache.scan_iter(match=f"*{speaker_id}*")) == []
    assert not list(Path(settings.MEDIA_ROOT, STORAGE_PREFIX).glob(f"{speaker_id}/*"))


# --- Diarized batch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    voice: Voice
    text: str
    start: float = 0.0
    end: float = 0.0


CONVERSATION = [
    Turn(ALICE, "Good morning everyone, shall we begin with the budget?"),
    Turn(BORIS, "Yes, the numbers for the third quarter are finally ready."),
    Turn(CARL, "I have read them and the travel costs look far too high."),
    Turn(STRANGER, "Sorry I am late, the train was stuck outside the station."),
    Turn(ALICE, "No problem, we only just started talking about travel."),
    Turn(STRANGER, "Then let me say that my team has already cut its travel."),
]


def conversation(turns: list[Turn] = CONVERSATION, *, pause: float = 1.0) -> tuple[bytes, list[Turn]]:
    """The turns one after another with pauses, as 16 kHz WAV, and each turn's place in it."""
    pieces, placed, clock = [np.zeros(int(0.5 * 16000), dtype=np.float32)], [], 0.5
    for turn in turns:
        samples = decode_audio(say(turn.voice, turn.text)).samples
        placed.append(Turn(turn.voice, turn.text, clock, clock + samples.size / 16000))
        pieces += [samples, np.zeros(int(pause * 16000), dtype=np.float32)]
        clock += samples.size / 16000 + pause
    return wav_bytes(np.concatenate(pieces)), placed


def labels_per_turn(segments: list[dict], turns: list[Turn]) -> list[set[str]]:
    """The speaker labels of the segments whose middle falls inside each turn."""
    found: list[set[str]] = []
    for turn in turns:
        inside = [s for s in segments if turn.start - 0.3 <= (s["start"] + s["end"]) / 2 <= turn.end + 0.3]
        assert inside, f"no segment for {turn.text!r} in {segments}"
        found.append({s["speaker_label"] for s in inside})
    return found


def test_diarized_batch_attributes_each_turn_to_the_right_speaker(api, speech_worker, enroller):
    ids = {voice.name: enroll_ready(api, enroller, voice) for voice in (ALICE, BORIS, CARL)}
    wav, turns = conversation()
    form = {"file": SimpleUploadedFile("meeting.wav", wav), "diarize": "true", "language_hint": "en"}
    response = api.post(TRANSCRIBE_URL, form, format="multipart", headers=enroller.headers)
    assert response.status_code == 200, response.content
    segments = response.json()["data"]["segments"]
    found = labels_per_turn(segments, turns)
    stranger_labels = found[3] | found[5]
    assert len(stranger_labels) == 1, found
    [stranger] = stranger_labels
    assert stranger.startswith("SPEAKER_")
    assert found == [{"Alice"}, {"Boris"}, {"Carl"}, {stranger}, {"Alice"}, {stranger}]
    by_label = {s["speaker_label"]: s["speaker_id"] for s in segments}
    assert by_label["Alice"] == ids["Alice"]
    assert by_label["Boris"] == ids["Boris"]
    assert by_label[stranger] is None
    assert all("words" not in s for s in segments)  # asked for no word timestamps

    # speaker_ids limits the candidates: Boris is not among them, so his turn is anonymous.
    form = {"file": SimpleUploadedFile("m.wav", wav), "diarize": "true", "speaker_ids": f"{ids['Alice']},{ids['Carl']}"}
    limited = labels_per_turn(api.post(TRANSCRIBE_URL, form, format="multipart", headers=enroller.headers).json()["data"]["segments"], turns)
    assert limited[0] == {"Alice"}
    assert limited[2] == {"Carl"}
    assert next(iter(limited[1])).startswith("SPEAKER_")

    # Once erased, Boris is never matched again.
    assert api.delete(f"{SPEAKERS_URL}/{ids['Boris']}", headers=enroller.headers).status_code == 200
    form = {"file": SimpleUploadedFile("m.wav", wav), "diarize": "true", "force_async": "true"}
    job_id = api.post(TRANSCRIBE_URL, form, format="multipart", headers=enroller.headers).json()["data"]["job_id"]
    from tests.transcription.test_batch_api import poll

    job = poll(api, enroller, job_id)
    assert job["status"] == "completed", job
    after = labels_per_turn(job["segments"], turns)
    assert after[0] == {"Alice"}
    assert after[2] == {"Carl"}
    assert "Boris" not in set().union(*after)
    assert next(iter(after[1])).startswith("SPEAKER_")


def test_openai_sdk_gets_diarized_json(daphne_server, speech_worker, enroller, api):
    import openai

    enroll_ready(api, enroller, ALICE)
    enroll_ready(api, enroller, BORIS)
    wav, turns = conversation(CONVERSATION[:2])
    client = openai.OpenAI(base_url=f"{daphne_server.url}/oai/v1", api_key=enroller.secret, max_retries=0, timeout=120)
    result = client.audio.transcriptions.create(model="whisper-1", file=("meeting.wav", wav), response_format="diarized_json")
    speakers = [segment.speaker for segment in result.segments]
    assert [label for index, label in enumerate(speakers) if index == 0 or speakers[index - 1] != label] == ["Alice", "Boris"]
    assert word_error_rate(" ".join(turn.text for turn in turns), result.text) <= 0.2

