"""The Celery application. Workers start with ``celery -A scaiecho_site worker``."""

import logging
import os
import sys
from typing import Any

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")

logger = logging.getLogger("scaiecho.queue")

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


def enqueue_or_raise(task: Any, *args: Any, **options: Any) -> None:
    """Send ``task`` to the broker, or raise ``QueueUnavailable`` (503) when the broker cannot take
    it: down, unreachable, or a full disk for the embedded one. Celery has already retried the
    publish briefly (its publish retry policy) by then."""
    from scaiecho_site.errors import QueueUnavailable

    try:
        task.apply_async(args=args, **options)
    except Exception as exc:  # kombu OperationalError, redis/amqp connection errors, OSError
        logger.error("could not enqueue %s%r: %s", task.name, args, exc.__class__.__name__)
        raise QueueUnavailable() from exc
