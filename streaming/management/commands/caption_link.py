"""``python manage.py caption_link --key-id UUID``: a link that opens the caption page signed in
with a short-lived token for that API key (the key itself never appears in the link)."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from streaming.tokens import caption_token_issue
from tenants.models import ApiKey


class Command(BaseCommand):
    help = "Print a /captions/ link carrying a short-lived caption token for an API key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--key-id", required=True, help="The API key's id (UUID).")
        parser.add_argument("--ttl", type=int, default=600, help="Seconds the token stays valid (default 600).")
        parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="Where the site is served.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            key_id = uuid.UUID(options["key_id"])
        except ValueError as exc:
            raise CommandError("--key-id must be a UUID.") from exc
        if options["ttl"] <= 0:
            raise CommandError("--ttl must be a positive number of seconds.")
        if not ApiKey.objects.filter(pk=key_id, revoked_at__isnull=True).exists():
            raise CommandError(f"No active API key with id {key_id}.")
        token = caption_token_issue(api_key_id=key_id, ttl_seconds=options["ttl"])
        self.stdout.write(f"{options['base_url'].rstrip('/')}/captions/#token={token}")
