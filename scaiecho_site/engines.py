"""This process's speech models, built once from the settings.

The speech layer (:mod:`speech`) knows nothing of Django: its engines and its speaker encoder take
plain arguments. This module reads the settings and keeps one instance of each per process, for the
batch task, consent verification and the stream worker alike. Only worker processes call it: the
web process never loads a model.
"""

from __future__ import annotations

import threading

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from speech.batching import BatchingEngine
from speech.embedding import SpeakerEncoder
from speech.engines.base import Engine
from speech.engines.relay import RelayClient

_lock = threading.Lock()
_engine: Engine | None = None
_encoder: SpeakerEncoder | None = None


ENGINES = ("ctranslate2", "openai-whisper")


def build_engine() -> Engine:
    """A new Backend A engine as the settings describe it (not loaded yet).

    ``SCAIECHO_WHISPER_ENGINE`` picks the implementation. On CUDA the engine is wrapped in a
    :class:`~speech.batching.BatchingEngine`, so that concurrent callers in this worker (several
    jobs' windows, several stream sessions' spans) share one batched pass on the device; on a CPU a
    batch costs about the sum of its windows, so callers use the engine directly.
    """
    choice = settings.SCAIECHO_WHISPER_ENGINE
    device = settings.SCAIECHO_WHISPER_DEVICE or None
    engine: Engine
    # Each implementation is imported only when chosen: a CTranslate2 worker need not import
    # openai-whisper's model code, nor an openai-whisper worker faster-whisper.
    if choice == "ctranslate2":
        from speech.engines.ctranslate2 import CTranslate2Engine

        engine = CTranslate2Engine(
            model_name=settings.SCAIECHO_WHISPER_MODEL,
            device=device,
            compute_type=settings.SCAIECHO_WHISPER_COMPUTE_TYPE or None,
            cpu_threads=settings.SCAIECHO_WHISPER_CPU_THREADS,
            cache_dir=settings.SCAIECHO_WHISPER_CACHE_DIR,
            batch_size=settings.SCAIECHO_WHISPER_BATCH_SIZE,
        )
    elif choice == "openai-whisper":
        from speech.engines.whisper import WhisperEngine

        engine = WhisperEngine(
            model_name=settings.SCAIECHO_WHISPER_MODEL,
            device=device,
            cpu_threads=settings.SCAIECHO_WHISPER_CPU_THREADS,
            cache_dir=settings.SCAIECHO_WHISPER_CACHE_DIR,
        )
    else:
        raise ImproperlyConfigured(
            f"SCAIECHO_WHISPER_ENGINE={choice!r} is not an engine; use one of: {', '.join(ENGINES)}."
        )
    if engine.device.startswith("cuda"):
        return BatchingEngine(
            engine,
            max_batch=settings.SCAIECHO_GPU_MAX_BATCH,
            max_wait_s=settings.SCAIECHO_GPU_BATCH_WAIT_MS / 1000,
        )
    return engine


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
        max_response_bytes=settings.SCAIECHO_RELAY_MAX_RESPONSE_BYTES,
    )


def engine_for_backend(backend: str) -> Engine:
    """The engine behind a resolved backend: ``"A"`` our own Whisper, ``"B"`` the relay."""
    return whisper_engine() if backend == "A" else relay_client()
