"""``python manage.py caption_link --key-id UUID``: a link that opens the caption page signed in
with a short-lived token for that API key (the key itself never appears in the link)."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from streaming.tokens import caption_token_issue
from tenants.models import ApiKey


class Command(BaseCommand):
    help = "Print a /captions/ link carrying a short-lived caption token for an API key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--key-id", required=True, help="The API key's id (UUID).")
        parser.add_argument(
            "--ttl",
            type=int,
            default=None,
            help="Seconds the token stays valid (default SCAIECHO_CAPTION_TOKEN_TTL_SECONDS, at most SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS).",
        )
        parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="Where the site is served.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            key_id = uuid.UUID(options["key_id"])
        except ValueError as exc:
            raise CommandError("--key-id must be a UUID.") from exc
        ttl = settings.SCAIECHO_CAPTION_TOKEN_TTL_SECONDS if options["ttl"] is None else options["ttl"]
        if not 0 < ttl <= settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS:
            raise CommandError(
                f"--ttl must be between 1 and {settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS} seconds "
                "(SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS)."
            )
        if not ApiKey.objects.filter(pk=key_id, revoked_at__isnull=True).exists():
            raise CommandError(f"No active API key with id {key_id}.")
        token = caption_token_issue(api_key_id=key_id, ttl_seconds=ttl)
        self.stdout.write(f"{options['base_url'].rstrip('/')}/captions/#token={token}")
