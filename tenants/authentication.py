"""Bearer API-key authentication for DRF views."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from scaiecho_site import errors
from tenants.models import ApiKey
from tenants.ratelimit import auth_failure_record, auth_failures_retry_after, request_client_address
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


def auth_failures_refuse(*, address: str | None) -> None:
    """Raise ``RATE_LIMITED`` when ``address`` has failed authentication too often of late.

    Checked before the key is looked at, so a blocked address learns nothing, not even that a
    key it guessed was right, and costs no database read.
    """
    if not address:
        return
    retry_after = auth_failures_retry_after(address=address)
    if retry_after is not None:
        raise errors.RateLimited(
            "Too many failed authentication attempts from this address. Retry after the indicated number of seconds.",
            retry_after=retry_after,
        )


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer sgk_...``. No header → the view answers AUTH_TOKEN_MISSING.

    Failed attempts are counted per client address (``SCAIECHO_AUTH_FAILURES_PER_ADDRESS``).
    """

    def authenticate(self, request: Any) -> tuple[Any, ApiKey] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        address = request_client_address(request.META)
        auth_failures_refuse(address=address)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.failed(address)
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer sgk_...'.")
        key = api_key_from_token(token.strip())
        if key is None:
            self.failed(address)
            raise exceptions.AuthenticationFailed("The API key is not valid or has been revoked.")
        return key.membership.user, key

    @staticmethod
    def failed(address: str | None) -> None:
        if address:
            auth_failure_record(address=address)

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="scaiecho"'
