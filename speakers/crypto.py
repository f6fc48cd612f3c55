"""Encryption at rest for biometric data (voice embeddings, reference and consent recordings).

Fernet (AES-128-CBC + HMAC-SHA256, with a timestamp) through ``MultiFernet``, so keys rotate: the
first key of ``SCAIECHO_BIOMETRIC_KEYS`` encrypts, every key decrypts. To rotate, put a new key
first, keep the old ones until every stored token has been re-encrypted (:func:`rotate`), then drop
them. Generate a key with
``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``.

With no keys configured, a development process (``SCAIECHO_PRODUCTION`` false) derives one key
from ``SECRET_KEY`` with HKDF-SHA256, so a fresh checkout works without setup. That key changes
with ``SECRET_KEY`` and is as secret as it: production must configure real keys, which the system
checks enforce at start-up; here a production process without keys refuses to encrypt at all.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

# Fixed so that a given SECRET_KEY always derives the same development key (data written in one
# development run decrypts in the next); the info string keeps this key apart from any other key
# someone might derive from SECRET_KEY.
_DEV_KDF_INFO = b"scaiecho biometric development key v1"


class BiometricKeyError(Exception):
    """No usable key is configured, or a key in ``SCAIECHO_BIOMETRIC_KEYS`` is malformed."""


class DecryptionError(Exception):
    """A token does not decrypt with any configured key (wrong key, or altered data)."""


def development_key(secret_key: str) -> bytes:
    """The Fernet key a development process derives from ``secret_key``."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DEV_KDF_INFO).derive(secret_key.encode())
    return base64.urlsafe_b64encode(derived)


def _keys() -> list[bytes]:
    configured = [
        str(key).strip() for key in settings.SCAIECHO_BIOMETRIC_KEYS if str(key).strip()
    ]
    if configured:
        return [key.encode() for key in configured]
    if settings.SCAIECHO_PRODUCTION:
        raise BiometricKeyError(
            "SCAIECHO_BIOMETRIC_KEYS is empty: a production process needs at least one Fernet key to "
            "store voice profiles."
        )
    return [development_key(settings.SECRET_KEY)]


def _fernet() -> MultiFernet:
    # Built per call (cheap next to the work around it) so that a settings change, e.g. a test's
    # override or a rotation, applies at once.
    try:
        return MultiFernet([Fernet(key) for key in _keys()])
    except ValueError as exc:  # a key that is not 32 url-safe base64 bytes; never echo the key
        raise BiometricKeyError(
            "A key in SCAIECHO_BIOMETRIC_KEYS is not a valid Fernet key (32 url-safe base64-encoded bytes)."
        ) from exc


def encrypt(data: bytes) -> bytes:
    """Encrypt ``data`` with the first configured key."""
    return _fernet().encrypt(bytes(data))


def decrypt(token: bytes) -> bytes:
    """Decrypt ``token`` with whichever configured key made it; :class:`DecryptionError` if none did."""
    try:
        return _fernet().decrypt(bytes(token))
    except InvalidToken as exc:
        raise DecryptionError(
            "Biometric data could not be decrypted with any key in SCAIECHO_BIOMETRIC_KEYS "
            "(the key that encrypted it is missing, or the data was altered)."
        ) from exc


def rotate(token: bytes) -> bytes:
    """Re-encrypt ``token`` under the first key (after a rotation), keeping its content."""
    try:
        return _fernet().rotate(bytes(token))
    except InvalidToken as exc:
        raise DecryptionError("Biometric data could not be decrypted for re-encryption.") from exc
