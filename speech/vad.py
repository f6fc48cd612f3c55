"""Voice activity detection: Silero VAD, the model packaged in the ``silero-vad`` wheel (no download).

One model per process; each stream keeps its own recurrent state (:class:`Vad`). Nothing here
imports Django.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import numpy as np

VAD_FRAME = 512  # silero-vad's frame at 16 kHz: 32 ms
_VAD_CONTEXT = 64  # samples of the previous frame silero prepends to each frame


@cache
def load_vad() -> Any:
    """The packaged silero-vad JIT model, loaded once per process (no download)."""
    from silero_vad import load_silero_vad

    model = load_silero_vad()
    model.eval()
    return model


_vad_lock = threading.Lock()


class Vad:
    """Speech probabilities for consecutive 512-sample frames of one stream.

    The silero model is shared by the process; the recurrent state and the 64-sample context that
    silero's own wrapper keeps inside the (shared) module are kept here instead, per stream, by
    calling its inner 16 kHz network directly.
    """

    def __init__(self) -> None:
        self._net = load_vad()._model
        self.reset()

    def reset(self) -> None:
        import torch  # here, not at the top: start-up checks import this module and need no torch

        self._state = torch.zeros(2, 1, 128)
        self._context = torch.zeros(1, _VAD_CONTEXT)

    def probability(self, frame: np.ndarray) -> float:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32)).reshape(1, VAD_FRAME)
        x = torch.cat([self._context, x], dim=1)
        with _vad_lock, torch.inference_mode():
            out, self._state = self._net(x, self._state)
        self._context = x[:, -_VAD_CONTEXT:]
        return float(out.item())
