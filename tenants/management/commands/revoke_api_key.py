"""``revoke_api_key``: revoke one key, named by its id, a unique id prefix, or the key itself."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.context import system_actor
from tenants.selectors import api_keys_matching
from tenants.services import api_key_revoke


class Command(BaseCommand):
    help = "Revoke an API key given its id, a unique prefix of its id (6+ characters), or the full key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("reference", metavar="KEY_PREFIX_OR_ID")

    def handle(self, *args: Any, **options: Any) -> None:
        matches = api_keys_matching(reference=options["reference"].strip())
        if not matches:
            raise CommandError("No API key matches that id, prefix or key.")
        if len(matches) > 1:
            raise CommandError("That prefix matches more than one key; give more characters.")
        key = api_key_revoke(key=matches[0], ctx=system_actor(tenant=matches[0].membership.tenant, label="manage.py revoke_api_key"))
        self.stdout.write(f"Revoked API key {key.pk} ({key}) at {key.revoked_at:%Y-%m-%dT%H:%M:%SZ}.")
