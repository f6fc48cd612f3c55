"""``create_api_key``: issue a key, creating the tenant, user and membership when missing.

Only the key is printed on stdout, so ``KEY=$(python manage.py create_api_key ...)`` works.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from scaiecho_site import errors
from tenants.context import system_actor
from tenants.models import Role
from tenants.services import api_key_create, membership_ensure


class Command(BaseCommand):
    help = "Create an API key for USER in TENANT with ROLE; prints only the key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="Tenant slug (created when missing).")
        parser.add_argument("--user", required=True, help="Username (created when missing).")
        parser.add_argument("--role", required=True, choices=Role.values)
        parser.add_argument("--name", default="", help="A label for the key.")

    def handle(self, *args: Any, **options: Any) -> None:
        ctx = system_actor(label="manage.py create_api_key")
        try:
            membership = membership_ensure(
                tenant_slug=options["tenant"], username=options["user"], role=options["role"], ctx=ctx
            )
        except errors.ValidationError as exc:
            raise CommandError(exc.message) from exc
        _key, secret = api_key_create(membership=membership, name=options["name"], ctx=ctx)
        self.stdout.write(secret)
