"""The speech backends as a worker process uses them: one Whisper model per process, loaded once."""

from __future__ import annotations

import threading

from django.conf import settings

from transcription.backends.relay import RelayClient
from transcription.backends.whisper import WhisperEngine

_engine: WhisperEngine | None = None
_engine_lock = threading.Lock()


def whisper_engine() -> WhisperEngine:
    """This process's engine. Called only in workers: the web process never loads a model."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = WhisperEngine(
                model_name=settings.SCAIECHO_WHISPER_MODEL,
                device=settings.SCAIECHO_WHISPER_DEVICE or None,
                cpu_threads=settings.SCAIECHO_WHISPER_CPU_THREADS,
                cache_dir=settings.SCAIECHO_WHISPER_CACHE_DIR,
            )
        return _engine


def relay_client() -> RelayClient:
    return RelayClient(
        base_url=settings.SCAIECHO_RELAY_BASE_URL,
        api_key=settings.SCAIECHO_RELAY_API_KEY,
        model=settings.SCAIECHO_RELAY_MODEL,
        timeout_s=settings.SCAIECHO_RELAY_TIMEOUT_SECONDS,
    )
