"""Batched inference across callers: concurrent ``transcribe`` calls decoded in one pass.

A GPU decodes a batch of windows in about the time of one, so a worker that serves many jobs or
live sessions at once should hand the device their windows together. :class:`BatchingEngine` wraps
an engine that can batch (``transcribe_batch``): calls from many threads queue up, and one thread
takes whatever has arrived within ``max_wait_s`` (up to ``max_batch`` windows with the same
options) and decodes it as one batch. Each caller gets exactly the result of its own window.

On a CPU a batch costs about the sum of its windows, so there the engines are used directly;
workers wrap their engine only on CUDA (or where ``bench/batch`` shows batching faster). Nothing
here imports Django.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from speech.engines.base import Engine, TranscribeOptions, TranscriptionResult, WindowPlan

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    samples: np.ndarray
    options: TranscribeOptions
    future: Future[TranscriptionResult] = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the batcher did: how many batches, of how many windows in all."""

    batches: int = 0
    windows: int = 0
    sizes: list[int] = field(default_factory=list)


class BatchingEngine(Engine):
    """``inner`` behind a queue: windows from concurrent callers are decoded in batches."""

    def __init__(self, inner: Engine, *, max_batch: int = 16, max_wait_s: float = 0.01) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.inner = inner
        self.name = f"batched-{inner.name}"
        self.device = inner.device
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: list[_Request] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="scaiecho-batcher", daemon=True)
        self._thread.start()

    @property
    def supports_prefix(self) -> bool:
        return self.inner.supports_prefix

    def load(self) -> None:
        self.inner.load()

    def warm_up(self) -> None:
        self.inner.warm_up()

    def stream_decoder(self) -> Engine:
        inner_decoder = self.inner.stream_decoder()
        if inner_decoder is self.inner:
            return self
        return BatchingEngine(inner_decoder, max_batch=self.max_batch, max_wait_s=self.max_wait_s)

    def transcribe(self, samples: np.ndarray, *, options: TranscribeOptions) -> TranscriptionResult:
        """A whole recording: its windows join the queue beside other callers' windows (several
        jobs decode in one pass), then the inner engine's plan joins them on its time line."""
        plan = self.inner.plan_windows(samples, options=options)
        if plan is None:
            return self.transcribe_batch([samples], options=options)[0]
        return plan.join(self.transcribe_batch(plan.windows, options=plan.options) if plan.windows else [])

    def plan_windows(self, samples: np.ndarray, *, options: TranscribeOptions) -> WindowPlan | None:
        return self.inner.plan_windows(samples, options=options)

    def transcribe_batch(
        self, windows: Sequence[np.ndarray], *, options: TranscribeOptions
    ) -> list[TranscriptionResult]:
        requests = [_Request(samples=np.asarray(window, dtype=np.float32), options=options) for window in windows]
        with self._ready:
            if self._closed:
                raise RuntimeError("The batching engine is closed.")
            self._queue.extend(requests)
            self._ready.notify()
        return [request.future.result() for request in requests]

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=5)

    def _take(self) -> list[_Request] | None:
        """The next batch: the oldest request and the queued ones with the same options."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return None
            # Give concurrent callers a moment to join, unless the batch is full already.
            if len(self._queue) < self.max_batch and self.max_wait_s > 0:
                self._ready.wait_for(lambda: len(self._queue) >= self.max_batch or self._closed, self.max_wait_s)
            options = self._queue[0].options
            batch = [request for request in self._queue if request.options == options][: self.max_batch]
            taken = {id(request) for request in batch}
            self._queue = [request for request in self._queue if id(request) not in taken]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                results = self.inner.transcribe_batch([r.samples for r in batch], options=batch[0].options)
            except BaseException as exc:  # every caller of the batch sees the error
                for request in batch:
                    request.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.windows += len(batch)
            self.stats.sizes.append(len(batch))
            for request, result in zip(batch, results, strict=True):
                request.future.set_result(result)
