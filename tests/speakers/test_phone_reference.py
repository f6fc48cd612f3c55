"""The phone-band reference stored beside a speaker's embedding: read with it for diarization,
optional for speakers enrolled before it existed, and destroyed with it by erasure.

Rows are written here the way enrollment writes them (encrypted vectors), without running the
models; naming real voices over a phone line is tests/speakers/test_diarization_real.py's part.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from speakers import crypto
from speakers.diarization import SpeakerTracker
from speakers.models import ErasureAudit, Speaker, SpeakerEmbedding
from speakers.selectors import speaker_candidates
from speakers.services import speaker_erase
from speech.embedding import EMBEDDING_DIM, MODEL_NAME, embedding_to_bytes
from tenants.context import ActorContext
from tests.factories import TenantFactory

pytestmark = pytest.mark.django_db


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(EMBEDDING_DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def ready_speaker(tenant, name: str, voice: np.ndarray, phone: np.ndarray | None) -> Speaker:
    speaker = Speaker.objects.create(
        tenant=tenant, display_name=name, language_primary="en", status=Speaker.Status.READY
    )
    vector = embedding_to_bytes(voice)
    fields = {"ciphertext": crypto.encrypt(vector), "sha256": hashlib.sha256(vector).hexdigest()}
    if phone is not None:
        phone_vector = embedding_to_bytes(phone)
        fields |= {
            "phone_ciphertext": crypto.encrypt(phone_vector),
            "phone_sha256": hashlib.sha256(phone_vector).hexdigest(),
        }
    SpeakerEmbedding.objects.create(speaker=speaker, model_name=MODEL_NAME, dims=EMBEDDING_DIM, **fields)
    return speaker


def test_a_caller_is_named_by_the_phone_reference_and_an_older_speaker_by_their_own():
    # Given a speaker with both references and one enrolled before the phone-band one existed
    tenant = TenantFactory()
    wide, phone, older = unit(1), unit(2), unit(3)
    ready_speaker(tenant, "Caller", wide, phone)
    ready_speaker(tenant, "Older", older, None)
    candidates = {c.label: c for c in speaker_candidates(tenant_id=tenant.pk)}
    assert candidates["Older"].phone_embedding is None
    assert np.allclose(candidates["Caller"].phone_embedding, phone)
    tracker = SpeakerTracker(match_threshold=0.4, anon_threshold=0.3)
    # When each is heard: the caller as their phone-band reference, the older speaker as enrolled
    # Then both are named; a voice like neither is not
    assert tracker.attribute(phone, list(candidates.values())).label == "Caller"
    assert tracker.attribute(older, list(candidates.values())).label == "Older"
    assert tracker.attribute(unit(4), list(candidates.values())).speaker_id is None


def test_erasure_destroys_the_phone_reference_with_the_embedding():
    tenant = TenantFactory()
    caller = ready_speaker(tenant, "Caller", unit(1), unit(2))
    older = ready_speaker(tenant, "Older", unit(3), None)
    row = SpeakerEmbedding.objects.get(speaker=caller)
    ctx = ActorContext(user=None, tenant=tenant)

    speaker_erase(ctx=ctx, speaker_id=caller.pk, via="api")
    speaker_erase(ctx=ctx, speaker_id=older.pk, via="api")

    assert not SpeakerEmbedding.objects.filter(speaker__in=[caller, older]).exists()
    assert speaker_candidates(tenant_id=tenant.pk) == []
    destroyed = {item["item"]: item for item in ErasureAudit.objects.get(speaker_id=caller.pk).destroyed}
    assert destroyed["embedding"]["sha256"] == row.sha256
    assert destroyed["phone_embedding"]["sha256"] == row.phone_sha256 != row.sha256
    # A speaker who never had one: nothing claimed destroyed that did not exist.
    assert [item["item"] for item in ErasureAudit.objects.get(speaker_id=older.pk).destroyed] == ["embedding"]
