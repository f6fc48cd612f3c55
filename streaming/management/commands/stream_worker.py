"""``python manage.py stream_worker``: a live-transcription worker (Backend A streaming).

Run as many as the hardware allows, each with its own model; web processes spread new sessions
across the live ones. Needs ``REDIS_URL`` (a shared channel layer); with the embedded in-memory
layer the web process runs its own stream worker instead.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from scaiecho_site.checks import enforce_startup_checks
from streaming.worker import StreamWorker


class Command(BaseCommand):
    help = "Run a stream worker: one Whisper model serving live WebSocket sessions."

    def handle(self, *args: Any, **options: Any) -> None:
        enforce_startup_checks()
        if "InMemoryChannelLayer" in settings.CHANNEL_LAYERS["default"]["BACKEND"]:
            raise CommandError("A separate stream worker needs REDIS_URL (a shared channel layer).")
        asyncio.run(self.serve())

    async def serve(self) -> None:
        worker = StreamWorker()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stopping.set)
        channel = await worker.start()
        self.stdout.write(f"stream worker {channel} ready (model {settings.SCAIECHO_WHISPER_MODEL})")
        self.stdout.flush()
        await worker.run()
