"""This process's speech models, built once from the settings.

The speech layer (:mod:`speech`) knows nothing of Django: its engines and its speaker encoder take
plain arguments. This module reads the settings and keeps one instance of each per process, for the
batch task, consent verification and the stream worker alike. Only worker processes call it: the
web process never loads a model.
"""

from __future__ import annotations

import threading

from django.conf import settings

from speech.embedding import SpeakerEncoder
from speech.engines.base import Engine
from speech.engines.relay import RelayClient
from speech.engines.whisper import WhisperEngine

_lock = threading.Lock()
_engine: Engine | None = None
_encoder: SpeakerEncoder | None = None


def build_engine() -> Engine:
    """A new Backend A engine as the settings describe it (not loaded yet)."""
    return WhisperEngine(
        model_name=settings.SCAIECHO_WHISPER_MODEL,
        device=settings.SCAIECHO_WHISPER_DEVICE or None,
        cpu_threads=settings.SCAIECHO_WHISPER_CPU_THREADS,
        cache_dir=settings.SCAIECHO_WHISPER_CACHE_DIR,
    )


def whisper_engine() -> Engine:
    """This process's Backend A engine (loaded on first use or by the worker's preload)."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = build_engine()
        return _engine


def speaker_encoder() -> SpeakerEncoder:
    """This process's speaker encoder (loaded on first use)."""
    global _encoder
    with _lock:
        if _encoder is None:
            # torch's thread count is process-wide: the same setting as the Whisper engine's.
            _encoder = SpeakerEncoder(
                folder=settings.SCAIECHO_SPEAKER_MODEL_DIR or None,
                cpu_threads=settings.SCAIECHO_WHISPER_CPU_THREADS,
            )
        return _encoder


def relay_client() -> RelayClient:
    """Backend B as configured now (cheap: it holds no connection)."""
    return RelayClient(
        base_url=settings.SCAIECHO_RELAY_BASE_URL,
        api_key=settings.SCAIECHO_RELAY_API_KEY,
        model=settings.SCAIECHO_RELAY_MODEL,
        timeout_s=settings.SCAIECHO_RELAY_TIMEOUT_SECONDS,
    )


def engine_for_backend(backend: str) -> Engine:
    """The engine behind a resolved backend: ``"A"`` our own Whisper, ``"B"`` the relay."""
    return whisper_engine() if backend == "A" else relay_client()
