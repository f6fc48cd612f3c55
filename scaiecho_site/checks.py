"""System checks that keep a production process from starting half-configured.

The ids are stable: operators and tests match on them. ``manage.py check`` reports them, and
``asgi.py`` and ``celery.py`` run them at start-up so that ``daphne`` and ``celery worker`` refuse
to start too (those commands do not run Django's checks themselves).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from django.conf import settings
from django.core import checks

from scaiecho_site.crypto import WEBHOOK_SECRET_KEYS, KeyConfigError

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
    if not settings.SCAIECHO_WEBHOOK_SECRET_KEYS:
        errors.append(
            checks.Error(
                "SCAIECHO_WEBHOOK_SECRET_KEYS is not set.",
                hint=(
                    "Production mode needs a key that encrypts the tenants' webhook signing secrets at rest: "
                    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
                ),
                id="scaiecho.E020",
            )
        )
    if settings.DEBUG:
        errors.append(
            checks.Error(
                "DEBUG is on in production mode.",
                hint="DEBUG shows settings and stack traces to anyone who triggers an error; unset DEBUG or set DEBUG=false.",
                id="scaiecho.E010",
            )
        )
    return errors


@checks.register(PRODUCTION_TAG)
def security_settings_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Checked in any mode: a bad proxy list, token lifetime or webhook secret key would otherwise fail at the first request."""
    errors: list[checks.CheckMessage] = []
    address_lists = (
        ("SCAIECHO_TRUSTED_PROXIES", "10.0.0.5,10.1.0.0/16", "scaiecho.E011"),
        ("SCAIECHO_METRICS_ALLOWED_ADDRESSES", "127.0.0.1,10.2.0.0/16", "scaiecho.E013"),
    )
    for name, example, check_id in address_lists:
        for entry in getattr(settings, name):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                errors.append(
                    checks.Error(
                        f"{name} holds {entry!r}, which is not an address or CIDR range.",
                        hint=f"Use comma-separated addresses or ranges, e.g. {example}.",
                        id=check_id,
                    )
                )
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder is not None and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        errors.append(
            checks.Error(
                f"PROMETHEUS_MULTIPROC_DIR is {folder!r}, which is not a writable folder.",
                hint="Create it (empty it when the service starts), or unset it for per-process metrics.",
                id="scaiecho.E014",
            )
        )
    if settings.SCAIECHO_WEBHOOK_SECRET_KEYS:
        try:
            WEBHOOK_SECRET_KEYS.encrypt(b"check")
        except KeyConfigError as exc:
            errors.append(checks.Error(str(exc), hint="Generate one with Fernet.generate_key().", id="scaiecho.E021"))
    ttl, cap = settings.SCAIECHO_CAPTION_TOKEN_TTL_SECONDS, settings.SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS
    if not 0 < ttl <= cap:
        errors.append(
            checks.Error(
                f"SCAIECHO_CAPTION_TOKEN_TTL_SECONDS is {ttl}, SCAIECHO_CAPTION_TOKEN_MAX_TTL_SECONDS {cap}.",
                hint="The default lifetime must be positive and at most the maximum.",
                id="scaiecho.E012",
            )
        )
    if settings.SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT < 1:
        errors.append(
            checks.Error(
                f"SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT is {settings.SCAIECHO_WEBHOOK_MAX_INFLIGHT_PER_TENANT}.",
                hint="At least 1, or no webhook is ever delivered.",
                id="scaiecho.E022",
            )
        )
    return errors


WHISPER_ENGINES = ("ctranslate2", "openai-whisper")
CTRANSLATE2_COMPUTE_TYPES = ("", "default", "auto", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


# (setting, lowest, highest, hint) of the stream decoding settings in seconds.
STREAM_SECONDS_RANGES = (
    ("SCAIECHO_STREAM_CONTEXT_SECONDS", 0, 10, "Use 0 (no context) to 10 seconds, e.g. 3."),
    ("SCAIECHO_STREAM_COMMIT_SECONDS", 0.5, 30, "Use 0.5 to 30 seconds, e.g. 5 (2 for sooner finals)."),
)


@checks.register(PRODUCTION_TAG)
def speech_engine_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The engine settings are checked in any mode: a typo would otherwise fail at the first job."""
    errors: list[checks.CheckMessage] = []
    if settings.SCAIECHO_WHISPER_ENGINE not in WHISPER_ENGINES:
        errors.append(
            checks.Error(
                f"SCAIECHO_WHISPER_ENGINE is {settings.SCAIECHO_WHISPER_ENGINE!r}.",
                hint=f"Use one of: {', '.join(WHISPER_ENGINES)}.",
                id="scaiecho.E006",
            )
        )
    if settings.SCAIECHO_WHISPER_COMPUTE_TYPE not in CTRANSLATE2_COMPUTE_TYPES:
        errors.append(
            checks.Error(
                f"SCAIECHO_WHISPER_COMPUTE_TYPE is {settings.SCAIECHO_WHISPER_COMPUTE_TYPE!r}.",
                hint=f"Leave it empty (int8 on the CPU, float16 on CUDA) or use one of: {', '.join(CTRANSLATE2_COMPUTE_TYPES[1:])}.",
                id="scaiecho.E006",
            )
        )
    if settings.SCAIECHO_WHISPER_BATCH_SIZE < 1 or settings.SCAIECHO_GPU_MAX_BATCH < 1:
        errors.append(
            checks.Error(
                "SCAIECHO_WHISPER_BATCH_SIZE and SCAIECHO_GPU_MAX_BATCH must be at least 1.",
                id="scaiecho.E006",
            )
        )
    for name in ("SCAIECHO_WHISPER_BEAM_SIZE", "SCAIECHO_STREAM_BEAM_SIZE"):
        if getattr(settings, name) < 1:
            errors.append(
                checks.Error(
                    f"{name} is {getattr(settings, name)}.",
                    hint="Use 1 (greedy) or a beam width above 1, e.g. 5.",
                    id="scaiecho.E006",
                )
            )
    for name, low, high, hint in STREAM_SECONDS_RANGES:
        if not low <= getattr(settings, name) <= high:
            errors.append(checks.Error(f"{name} is {getattr(settings, name)}.", hint=hint, id="scaiecho.E006"))
    return errors


def enforce_startup_checks() -> None:
    """Raise ``SystemCheckError`` when any start-up check fails (used by non-manage.py entries)."""
    from django.core.management.base import SystemCheckError

    failures = [m for m in checks.run_checks(tags=[PRODUCTION_TAG]) if m.is_serious()]
    if failures:
        raise SystemCheckError("\n".join(f"{m.id}: {m.msg} {m.hint or ''}" for m in failures))
