"""The speakers app's system checks (registered in ``SpeakersConfig.ready``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from scaiecho_site.checks import PRODUCTION_TAG
from speakers.crypto import BiometricKeyError, encrypt


@checks.register(PRODUCTION_TAG)
def biometric_keys_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Configured biometric keys must be usable, in any mode: a bad key would fail at first use."""
    if not settings.SCAIECHO_BIOMETRIC_KEYS:
        return []
    try:
        encrypt(b"check")
    except BiometricKeyError as exc:
        return [checks.Error(str(exc), hint="Generate one with Fernet.generate_key().", id="scaiecho.E005")]
    return []
