"""Biometric data at rest: encrypted with the configured keys, rotatable, never readable without them."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.fernet import Fernet

from speakers import crypto
from speech.embedding import EMBEDDING_DIM, embedding_from_bytes, embedding_to_bytes

VOICE = b"RIFF....WAVEfmt the reference recording"


@pytest.fixture
def keys(settings) -> list[str]:
    settings.SCAIECHO_BIOMETRIC_KEYS = [Fernet.generate_key().decode(), Fernet.generate_key().decode()]
    return settings.SCAIECHO_BIOMETRIC_KEYS


def test_data_round_trips_and_is_not_stored_in_the_clear(keys: list[str]) -> None:
    token = crypto.encrypt(VOICE)
    assert VOICE not in token
    assert b"reference" not in token
    assert crypto.decrypt(token) == VOICE
    assert crypto.encrypt(VOICE) != token  # a fresh IV each time: equal inputs are not recognisable


def test_the_first_key_encrypts(keys: list[str]) -> None:
    assert Fernet(keys[0].encode()).decrypt(crypto.encrypt(VOICE)) == VOICE


def test_rotation_keeps_old_data_readable(settings, keys: list[str]) -> None:
    # Given data written under the old key
    settings.SCAIECHO_BIOMETRIC_KEYS = [keys[1]]
    old = crypto.encrypt(VOICE)
    # When a new key is put first, then the old data still decrypts
    settings.SCAIECHO_BIOMETRIC_KEYS = [keys[0], keys[1]]
    assert crypto.decrypt(old) == VOICE
    # And once re-encrypted, the old key can be dropped
    renewed = crypto.rotate(old)
    settings.SCAIECHO_BIOMETRIC_KEYS = [keys[0]]
    assert crypto.decrypt(renewed) == VOICE
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(old)


def test_a_wrong_key_or_altered_data_is_a_clear_error(settings, keys: list[str]) -> None:
    token = crypto.encrypt(VOICE)
    altered = token[:-5] + bytes([token[-5] ^ 1]) + token[-4:]
    with pytest.raises(crypto.DecryptionError, match="SCAIECHO_BIOMETRIC_KEYS"):
        crypto.decrypt(altered)
    settings.SCAIECHO_BIOMETRIC_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(crypto.DecryptionError, match="could not be decrypted"):
        crypto.decrypt(token)


def test_a_malformed_key_is_reported_without_echoing_it(settings) -> None:
    settings.SCAIECHO_BIOMETRIC_KEYS = ["not-a-fernet-key-but-secret"]
    with pytest.raises(crypto.BiometricKeyError) as excinfo:
        crypto.encrypt(VOICE)
    assert "not-a-fernet-key-but-secret" not in str(excinfo.value)


def test_development_derives_a_stable_key_from_secret_key(settings) -> None:
    settings.SCAIECHO_BIOMETRIC_KEYS = []
    settings.SCAIECHO_PRODUCTION = False
    settings.SECRET_KEY = "development-secret-one"
    token = crypto.encrypt(VOICE)
    assert crypto.decrypt(token) == VOICE
    assert Fernet(crypto.development_key("development-secret-one")).decrypt(token) == VOICE
    # Another SECRET_KEY is another key.
    settings.SECRET_KEY = "development-secret-two"
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(token)


def test_production_without_keys_refuses_to_encrypt(settings) -> None:
    settings.SCAIECHO_BIOMETRIC_KEYS = []
    settings.SCAIECHO_PRODUCTION = True
    with pytest.raises(crypto.BiometricKeyError, match="SCAIECHO_BIOMETRIC_KEYS"):
        crypto.encrypt(VOICE)


def test_an_embedding_survives_storage(keys: list[str]) -> None:
    vector = np.random.default_rng(1).standard_normal(EMBEDDING_DIM).astype(np.float32)
    stored = crypto.encrypt(embedding_to_bytes(vector))
    restored = embedding_from_bytes(crypto.decrypt(stored))
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(restored, vector)
    assert embedding_to_bytes(vector)[:4] == vector[:1].astype("<f4").tobytes()  # little-endian on disk
    with pytest.raises(ValueError, match="768"):
        embedding_from_bytes(b"\0" * 10)
