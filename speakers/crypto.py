"""Encryption at rest for biometric data (voice embeddings, reference and consent recordings).

The key ring of ``SCAIECHO_BIOMETRIC_KEYS`` (:class:`scaiecho_site.crypto.KeyRing`: Fernet through
``MultiFernet``), so keys rotate: the first key encrypts, every key decrypts. To rotate, put a new
key first, keep the old ones until every stored token has been re-encrypted (:func:`rotate`), then
drop them. Generate a key with
``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``.

With no keys configured, a development process (``SCAIECHO_PRODUCTION`` false) derives one key
from ``SECRET_KEY`` with HKDF-SHA256, so a fresh checkout works without setup. That key changes
with ``SECRET_KEY`` and is as secret as it: production must configure real keys, which the system
checks enforce at start-up; here a production process without keys refuses to encrypt at all.
"""

from __future__ import annotations

from scaiecho_site.crypto import DecryptionError, KeyConfigError, KeyRing

__all__ = ["BiometricKeyError", "DecryptionError", "decrypt", "development_key", "encrypt", "rotate"]

BiometricKeyError = KeyConfigError  # no usable key in SCAIECHO_BIOMETRIC_KEYS, or a malformed one

BIOMETRIC_KEYS = KeyRing(setting="SCAIECHO_BIOMETRIC_KEYS", purpose="biometric")

encrypt = BIOMETRIC_KEYS.encrypt
decrypt = BIOMETRIC_KEYS.decrypt
rotate = BIOMETRIC_KEYS.rotate
development_key = BIOMETRIC_KEYS.development_key
