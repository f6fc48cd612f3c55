"""Short-lived caption tokens: a signed API key id, so a caption page can be opened from a link
without pasting the key itself, and so the page never puts the key in a WebSocket URL (it trades
the key for a token over POST first). ``sct_`` + a ``TimestampSigner`` value; the key is looked up
again on every use, so a revoked key's tokens stop working at once. No token lives longer than
``SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS``, whatever it was issued with."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core import signing
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions

from tenants.authentication import ApiKeyAuthentication, auth_failures_refuse
from tenants.models import ApiKey
from tenants.ratelimit import request_client_address

CAPTION_TOKEN_PREFIX = "sct_"
_SALT = "scaiecho.streaming.caption-token"


def _signer() -> signing.TimestampSigner:
    return signing.TimestampSigner(salt=_SALT)


def caption_token_ttl(ttl_seconds: int | None = None) -> int:
    """The lifetime a token gets: ``ttl_seconds`` or the default, never past the maximum."""
    ttl = settings.SCAIECHO_CAPTION_TOKEN_TTL_SECONDS if ttl_seconds is None else int(ttl_seconds)
    return max(0, min(ttl, settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS))


def caption_token_issue(*, api_key_id: uuid.UUID | str, ttl_seconds: int | None = None) -> str:
    """A token for ``api_key_id`` valid for ``ttl_seconds`` (default
    ``SCAIECHO_CAPTION_TOKEN_TTL_SECONDS``, capped at the maximum; the lifetime travels in the token)."""
    value = f"{uuid.UUID(str(api_key_id))}:{caption_token_ttl(ttl_seconds)}"
    return CAPTION_TOKEN_PREFIX + _signer().sign(value)


def caption_token_key(token: str) -> ApiKey | None:
    """The active key a caption token stands for, or ``None`` (malformed, expired, revoked)."""
    if not token.startswith(CAPTION_TOKEN_PREFIX):
        return None
    signed = token[len(CAPTION_TOKEN_PREFIX) :]
    try:
        key_id, _, ttl = _signer().unsign(signed).rpartition(":")
        # The cap applies at use too: a token minted under a longer maximum stops at today's.
        _signer().unsign(signed, max_age=min(int(ttl), settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS))
        key_uuid = uuid.UUID(key_id)
    except (signing.BadSignature, ValueError):  # SignatureExpired is a BadSignature
        return None
    return (
        ApiKey.objects.select_related("membership__tenant", "membership__user")
        .filter(pk=key_uuid, revoked_at__isnull=True)
        .first()
    )


class CaptionTokenAuthentication(ApiKeyAuthentication):
    """``Authorization: Bearer sct_...`` (a caption token) or ``Bearer sgk_...`` (a key): what a
    caption page opened from a link holds instead of a key. Failures count per address as a key's do."""

    def authenticate(self, request: Any) -> tuple[Any, ApiKey] | None:
        scheme, _, token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith(CAPTION_TOKEN_PREFIX):
            return super().authenticate(request)
        address = request_client_address(request.META)
        auth_failures_refuse(address=address)
        key = caption_token_key(token)
        if key is None:
            self.failed(address)
            raise exceptions.AuthenticationFailed("The caption token is not valid or has expired.")
        return key.membership.user, key


class CaptionTokenAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "streaming.tokens.CaptionTokenAuthentication"
    name = "CaptionToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "sgk_<key> or sct_<caption token>"}
