"""System checks that keep a production process from starting half-configured.

The ids are stable: operators and tests match on them. ``manage.py check`` reports them, and
``asgi.py`` and ``celery.py`` run them at start-up so that ``daphne`` and ``celery worker`` refuse
to start too (those commands do not run Django's checks themselves).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

PRODUCTION_TAG = "scaiecho_production"


@checks.register(PRODUCTION_TAG)
def production_settings_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if not settings.SCAIECHO_PRODUCTION:
        return []
    errors: list[checks.CheckMessage] = []
    if not settings.SCAIECHO_SECRET_KEY_FROM_ENV:
        errors.append(
            checks.Error(
                "SECRET_KEY is not set.",
                hint="Production mode needs a long random SECRET_KEY in the environment.",
                id="scaiecho.E001",
            )
        )
    if not settings.SCAIECHO_ALLOWED_HOSTS_FROM_ENV or "*" in settings.ALLOWED_HOSTS:
        errors.append(
            checks.Error(
                "ALLOWED_HOSTS is not set explicitly.",
                hint="Production mode needs ALLOWED_HOSTS, a comma-separated list without '*'.",
                id="scaiecho.E002",
            )
        )
    engine = settings.DATABASES["default"]["ENGINE"]
    if "sqlite" in engine:
        errors.append(
            checks.Error(
                "Production mode is running on the embedded SQLite database.",
                hint="Set DATABASE_URL to a PostgreSQL database.",
                id="scaiecho.E003",
            )
        )
    if not settings.SCAIECHO_BIOMETRIC_KEYS:
        errors.append(
            checks.Error(
                "SCAIECHO_BIOMETRIC_KEYS is not set.",
                hint=(
                    "Production mode needs a key that encrypts voice embeddings and consent recordings at rest: "
                    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
                ),
                id="scaiecho.E004",
            )
        )
    return errors


def enforce_startup_checks() -> None:
    """Raise ``SystemCheckError`` when any start-up check fails (used by non-manage.py entries)."""
    from django.core.management.base import SystemCheckError

    failures = [m for m in checks.run_checks(tags=[PRODUCTION_TAG]) if m.is_serious()]
    if failures:
        raise SystemCheckError("\n".join(f"{m.id}: {m.msg} {m.hint or ''}" for m in failures))
