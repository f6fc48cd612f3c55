"""What a Celery worker process does besides running tasks.

- The main process announces the worker (a heartbeat row with a TTL) so that the policy resolver
  knows Backend A is available, retires it on a clean shutdown, and sweeps jobs whose worker
  vanished.
- Each pool process loads the Whisper model once, at start, so the first job does not pay for it.

A worker that consumes only the webhook queue (``SCAIECHO_WEBHOOK_QUEUE``) is announced as a
webhook worker, so that operators see whether one is running: it does not count as Backend A,
sweeps nothing and loads no model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import current_app
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger("scaiecho.worker")

_stop = threading.Event()
_worker_id: str | None = None


def _beat(worker_id: str, *, speech: bool) -> None:
    from speakers.services import enrollments_sweep
    from transcription.models import SpeechWorker
    from transcription.services import jobs_sweep, worker_claimant, worker_heartbeat

    interval = max(1.0, settings.SCAIECHO_WORKER_HEARTBEAT_TTL_SECONDS / 3)
    while not _stop.is_set():
        try:
            close_old_connections()
            worker_heartbeat(
                worker_id=worker_id,
                kind=SpeechWorker.Kind.BATCH if speech else SpeechWorker.Kind.WEBHOOK,
                hostname=worker_id.partition("@")[2],
                model_name=settings.SCAIECHO_WHISPER_MODEL if speech else "",
                device=(settings.SCAIECHO_WHISPER_DEVICE or "auto") if speech else "",
            )
            if speech:
                jobs_sweep(me=worker_claimant(node=worker_id))
                enrollments_sweep()
        except Exception:  # a database hiccup must not kill the heartbeat
            logger.exception("worker heartbeat failed")
        _stop.wait(interval)


def serves_speech(app: Any) -> bool:
    """Whether this worker consumes a queue other than the webhook queue."""
    return set(app.amqp.queues.consume_from) != {settings.SCAIECHO_WEBHOOK_QUEUE}


@worker_ready.connect
def announce_worker(sender: Any = None, **_kwargs: Any) -> None:
    global _worker_id
    _worker_id = sender.hostname
    speech = serves_speech(sender.app)
    threading.Thread(target=_beat, args=(_worker_id,), kwargs={"speech": speech}, name="scaiecho-heartbeat", daemon=True).start()
    logger.info("%s worker %s announced", "speech" if speech else "webhook (no speech work, no model)", _worker_id)


@worker_shutdown.connect
def retire_worker(**_kwargs: Any) -> None:
    _stop.set()
    if _worker_id:
        from transcription.services import worker_retire

        close_old_connections()
        worker_retire(worker_id=_worker_id)


@worker_process_init.connect
def preload_model(**_kwargs: Any) -> None:
    if not settings.SCAIECHO_WHISPER_PRELOAD or not serves_speech(current_app):
        return
    from scaiecho_site.engines import whisper_engine

    try:
        whisper_engine().load()
    except Exception:  # the job that needs it reports the error; relay-only work still runs
        logger.exception("could not load the Whisper model %s", settings.SCAIECHO_WHISPER_MODEL)
