"""Webhook destinations and signing secrets (contract section 8, Standard Webhooks).

A destination is an ``http``/``https`` URL no longer than ``SCAIECHO_WEBHOOK_MAX_URL_LENGTH`` whose
host is, or resolves only to, public addresses: private, loopback, link-local, unspecified,
multicast and reserved ones are refused (the service would otherwise call into its own network
for whoever names it), unless ``SCAIECHO_WEBHOOK_ALLOW_PRIVATE`` is on. The check runs when a URL is
given and again before each delivery attempt, since DNS may have changed in between; the attempt
then connects to the addresses that check found (:func:`pinned_target`), so that a name that
resolves to a public address for the check and to a private one a moment later (DNS rebinding)
cannot steer the call. The URL's host still goes out as ``Host`` and, for https, as the TLS server
name the certificate is verified against.

A tenant's signing secret is ``whsec_`` and the base64 of 32 random bytes, as Standard Webhooks
libraries take it; it is kept encrypted with ``SCAIECHO_WEBHOOK_SECRET_KEYS``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from scaiecho_site.crypto import WEBHOOK_SECRET_KEYS

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


@dataclass(frozen=True)
class Destination:
    """A checked destination: ``problem`` says why the URL may not receive webhooks (``None``: it
    may), and ``addresses`` are what its host resolved to when checked, in the resolver's order
    (empty with ``SCAIECHO_WEBHOOK_ALLOW_PRIVATE``, where nothing is checked or pinned)."""

    problem: str | None
    addresses: tuple[str, ...] = ()


def destination_check(url: str) -> Destination:
    """Check ``url`` as a webhook destination. Resolves the host (DNS) unless private ones are allowed."""
    if len(url) > settings.SCAIECHO_WEBHOOK_MAX_URL_LENGTH:
        return Destination(f"Must be at most {settings.SCAIECHO_WEBHOOK_MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return Destination("Not a valid URL.")
    if parts.scheme not in ("http", "https"):
        return Destination("Must be an http or https URL.")
    host = parts.hostname
    if not host:
        return Destination("The URL has no host.")
    if parts.username is not None or parts.password is not None:
        return Destination("Credentials in the URL are not accepted; authenticate with the signature.")
    if settings.SCAIECHO_WEBHOOK_ALLOW_PRIVATE:
        return Destination(None)
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return Destination(f"The host {host!r} does not resolve.")
    addresses: list[str] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            return Destination(
                f"The host {host!r} is a private, loopback or otherwise non-public address; webhooks go to public addresses only.",
            )
        if str(address) not in addresses:
            addresses.append(str(address))
    return Destination(None, tuple(addresses))


def destination_problem(url: str) -> str | None:
    """Why ``url`` may not receive webhooks, or ``None`` when it may. Resolves the host (DNS)."""
    return destination_check(url).problem


def pinned_target(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """How to call ``url`` at ``address`` (one its host resolved to when checked) without resolving
    it again: the URL with the address for its host, the ``Host`` header the URL would send, and
    for https httpx's ``sni_hostname`` extension, so that TLS names and verifies the URL's host."""
    parts = urlsplit(url)
    ip = ipaddress.ip_address(address)
    literal = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    target = parts._replace(netloc=netloc).geturl()
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    return target, {"host": parts.netloc}, extensions


def secret_generate() -> str:
    """A new signing secret, as Standard Webhooks libraries take it."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_seal(secret: str) -> bytes:
    return WEBHOOK_SECRET_KEYS.encrypt(secret.encode())


def secret_open(token: bytes) -> str:
    return WEBHOOK_SECRET_KEYS.decrypt(bytes(token)).decode()


def signature(*, secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256 of
    ``{id}.{timestamp}.{body}`` under the secret's key bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
