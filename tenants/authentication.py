"""Bearer API-key authentication for DRF views."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from tenants.models import ApiKey
from tenants.selectors import api_key_by_hash
from tenants.services import API_KEY_PREFIX, api_key_hash, api_key_touch


def api_key_from_token(token: str) -> ApiKey | None:
    """The active key for a raw token, or ``None``. Shared by HTTP and WebSocket authentication."""
    if not token.startswith(API_KEY_PREFIX) or len(token) < len(API_KEY_PREFIX) + 32:
        return None
    key = api_key_by_hash(key_hash=api_key_hash(token))
    if key is not None:
        api_key_touch(key=key)
    return key


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer sgk_...``. No header → the view answers AUTH_TOKEN_MISSING."""

    def authenticate(self, request: Any) -> tuple[Any, ApiKey] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer sgk_...'.")
        key = api_key_from_token(token.strip())
        if key is None:
            raise exceptions.AuthenticationFailed("The API key is not valid or has been revoked.")
        return key.membership.user, key

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="scaiecho"'
