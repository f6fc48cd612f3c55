"""The Celery application. Workers start with ``celery -A scaiecho_site worker``."""

import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")

app = Celery("scaiecho_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def refuse_misconfigured_worker(**_kwargs: object) -> None:
    """A production worker refuses to start with the settings the web process would refuse."""
    from scaiecho_site.checks import enforce_startup_checks

    enforce_startup_checks()
