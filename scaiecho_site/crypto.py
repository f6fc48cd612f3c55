"""Encryption at rest for secrets the service must read back (not hash), with rotating keys.

:class:`KeyRing` is Fernet (AES-128-CBC + HMAC-SHA256) through ``MultiFernet`` over the keys of one
setting (comma-separated, newest first): the first key encrypts, every key decrypts, so keys
rotate by putting a new one first. With the setting empty, a development process derives one key
from ``SECRET_KEY`` with HKDF-SHA256 (its ``purpose`` keeps keys of different uses apart), so a
fresh checkout works without setup; a production process refuses to encrypt or decrypt, and the
system checks stop it at start-up before that can happen. ``speakers.crypto`` is the key ring of
biometric data (purpose ``"biometric"``).
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


class KeyConfigError(Exception):
    """No usable key is configured, or a configured key is malformed."""


class DecryptionError(Exception):
    """A token does not decrypt with any configured key (wrong key, or altered data)."""


class KeyRing:
    """The keys of setting ``setting``, for data of one ``purpose`` (which names the derived key)."""

    def __init__(self, *, setting: str, purpose: str) -> None:
        self.setting = setting
        self.purpose = purpose

    def development_key(self, secret_key: str) -> bytes:
        info = f"scaiecho {self.purpose} development key v1".encode()
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret_key.encode())
        return base64.urlsafe_b64encode(derived)

    def _fernet(self) -> MultiFernet:
        # Built per call (cheap next to the work around it): a settings change applies at once.
        configured = [str(key).strip() for key in getattr(settings, self.setting) if str(key).strip()]
        if not configured:
            if settings.SCAIECHO_PRODUCTION:
                raise KeyConfigError(f"{self.setting} is empty: a production process needs at least one Fernet key.")
            return MultiFernet([Fernet(self.development_key(settings.SECRET_KEY))])
        try:
            return MultiFernet([Fernet(key.encode()) for key in configured])
        except ValueError as exc:  # never echo the key
            raise KeyConfigError(
                f"A key in {self.setting} is not a valid Fernet key (32 url-safe base64-encoded bytes)."
            ) from exc

    def encrypt(self, data: bytes) -> bytes:
        """Encrypt ``data`` with the first configured key."""
        return self._fernet().encrypt(bytes(data))

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt ``token`` under the first key (after a rotation), keeping its content."""
        try:
            return self._fernet().rotate(bytes(token))
        except InvalidToken as exc:
            raise DecryptionError(f"Data could not be decrypted for re-encryption with any key in {self.setting}.") from exc

    def decrypt(self, token: bytes) -> bytes:
        """Decrypt ``token`` with whichever configured key made it; :class:`DecryptionError` if none did."""
        try:
            return self._fernet().decrypt(bytes(token))
        except InvalidToken as exc:
            raise DecryptionError(
                f"Data could not be decrypted with any key in {self.setting} "
                "(the key that encrypted it is missing, or the data was altered)."
            ) from exc


# The keys that encrypt the tenants' webhook signing secrets (``tenants.webhooks``); checked at
# start-up by ``scaiecho_site.checks`` (scaiecho.E020, E021).
WEBHOOK_SECRET_KEYS = KeyRing(setting="SCAIECHO_WEBHOOK_SECRET_KEYS", purpose="webhook secret")
