"""Short-lived caption tokens: a signed API key id, so a caption page can be opened from a link
without pasting the key itself. ``sct_`` + a ``TimestampSigner`` value; the key is looked up
again on every use, so a revoked key's tokens stop working at once."""

from __future__ import annotations

import uuid

from django.core import signing

from tenants.models import ApiKey

CAPTION_TOKEN_PREFIX = "sct_"
_SALT = "scaiecho.streaming.caption-token"


def _signer() -> signing.TimestampSigner:
    return signing.TimestampSigner(salt=_SALT)


def caption_token_issue(*, api_key_id: uuid.UUID | str, ttl_seconds: int = 600) -> str:
    """A token for ``api_key_id`` valid for ``ttl_seconds`` (the lifetime travels in the token)."""
    value = f"{uuid.UUID(str(api_key_id))}:{int(ttl_seconds)}"
    return CAPTION_TOKEN_PREFIX + _signer().sign(value)


def caption_token_key(token: str) -> ApiKey | None:
    """The active key a caption token stands for, or ``None`` (malformed, expired, revoked)."""
    if not token.startswith(CAPTION_TOKEN_PREFIX):
        return None
    signed = token[len(CAPTION_TOKEN_PREFIX) :]
    try:
        key_id, _, ttl = _signer().unsign(signed).rpartition(":")
        _signer().unsign(signed, max_age=int(ttl))
        key_uuid = uuid.UUID(key_id)
    except (signing.BadSignature, ValueError):  # SignatureExpired is a BadSignature
        return None
    return (
        ApiKey.objects.select_related("membership__tenant", "membership__user")
        .filter(pk=key_uuid, revoked_at__isnull=True)
        .first()
    )
