"""The Celery application. Workers start with ``celery -A scaiecho_site worker``."""

import os
import sys

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")

app = Celery("scaiecho_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def refuse_misconfigured_worker(**_kwargs: object) -> None:
    """A production worker refuses to start with the settings the web process would refuse."""
    from django.core.management.base import SystemCheckError

    from scaiecho_site.checks import enforce_startup_checks

    try:
        enforce_startup_checks()
    except SystemCheckError as exc:
        # Celery logs and swallows exceptions from signal handlers; SystemExit gets through.
        sys.stderr.write(f"ScaiEcho worker refuses to start:\n{exc}\n")
        raise SystemExit(1) from exc
