"""An on-disk cache of each image's bank-independent results, so that a bank edit re-runs only scoring,
NMS, soft merging and top-k.

An entry holds what the predictor's finishing step reads (:class:`DescribedCandidates`): the
non-empty candidates that passed SAM2's IoU filter, their predicted IoUs and their L2-normalised
mask-pooled DINOv2 descriptors. The logits are stored compactly but exactly: only each candidate's
low-resolution box grown by the margin that full-resolution upsampling reads for the image's size;
every other pixel comes back as ``OUTSIDE`` (negative, as it was: outside its box a mask logit is
<= 0), which gives the same masks, boxes, areas and intersections bit for bit
(see :func:`reading_margin`).

Entries are safetensors files named by a key over everything that changes them (:func:`context_key`
and the image's content); written to a temporary file and renamed into place, so processes sharing
a folder never read half an entry; checked against a digest of their contents when read (a damaged
one is recomputed with a warning); evicted least-recently-used beyond ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .geometry import mask_boxes
from .input_rules import InputError
from .merging import taps
from .settings import Settings

#: Layout of an entry; a file of another schema is never read (its key differs) and ages out.
SCHEMA = 1
#: Version of the code that computes candidates and descriptors (frames, SAM2 encoder and prompt
#: decoding, the IoU filter, DINOv2 features, pooling). Bump it whenever that code changes:
#: tests/test_candidate_cache.py fails until its recorded source digest is updated with it.
PIPELINE_VERSION = 4
#: Default size limit of a cache folder.
DEFAULT_MAX_BYTES = 4 * 2**30
#: The logit stored for pixels no result reads (outside a candidate's box and margin).
OUTSIDE = -1.0
SUFFIX = ".safetensors"
#: Prefix of entries being written; one older than ``ABANDONED_S`` seconds was left by a process that died.
PART = ".part-"
ABANDONED_S = 3600


def default_folder() -> Path:
    """``$NTT_CACHE_DIR`` if set, else ``ntt/candidates`` in the user's cache folder (``$XDG_CACHE_HOME``
    or ``~/.cache``)."""
    if os.environ.get("NTT_CACHE_DIR"):
        return Path(os.environ["NTT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ntt" / "candidates"


class CacheWarning(UserWarning):
    """The cache could not be used for an image or at all; the run goes on without it."""


@dataclass
class DescribedCandidates:
    """One image's bank-independent results: its non-empty candidates that passed SAM2's IoU filter."""

    logits: torch.Tensor  # [N, m, m] mask logits, in the decoder's dtype
    sam_iou: torch.Tensor  # [N] predicted IoU
    descriptors: torch.Tensor  # [N, C] L2-normalised mask-pooled DINOv2 features


def reading_margin(mask_size: int, image_size: tuple[int, int]) -> int:
    """Low-resolution pixels beyond a candidate's box that its full-resolution mask at ``image_size``
    depends on: a full-resolution pixel is in the mask's window when one of its taps reaches into the
    box (merging.window_bounds), and its taps span at most ``last - first + 1`` source pixels; pixels
    outside the window only read logits outside the box, all <= 0, so they stay out of the mask."""
    cpu = torch.device("cpu")
    return max(int((t.last - t.first).max()) for t in (taps(mask_size, side, cpu) for side in image_size))


_model_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_digest(model) -> str:
    """A digest over every weight of a loaded model (``model.model``, a torch module: names, dtypes,
    shapes and values), computed once per module; for a model without one (the stand-ins, whose
    ``fingerprint`` covers all their parameters), its class, id and fingerprint."""
    module = getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        return f"{type(model).__name__}:{getattr(model, 'model_id', '')}:{model.fingerprint}"
    if module not in _model_digests:
        _model_digests[module] = _digest(module.state_dict())
    return _model_digests[module]


def context_key(segmenter, encoder, settings: Settings) -> str:
    """The part of every key shared by a predictor's images: schema, pipeline version, both models'
    weights, the candidate settings, input sizes, device types and dtypes. Settings that change only
    memory and speed (``Settings.MEMORY_ONLY``) and those of the bank-dependent steps are not in it."""
    parts = {
        "schema": SCHEMA,
        "pipeline": PIPELINE_VERSION,
        "segmenter": model_digest(segmenter),
        "encoder": model_digest(encoder),
        "points_per_side": settings.points_per_side,
        "sam_iou_threshold": settings.sam_iou_threshold,
        "add_no_memory_embedding": bool(getattr(segmenter, "add_no_memory_embedding", False)),
        "frame": segmenter.input_size,
        "mask_size": segmenter.mask_size,
        "encoder_input": encoder.input_size,
        "grid": encoder.grid_size,
        "devices": [segmenter.device.type, encoder.device.type],
        "dtypes": [str(getattr(model, "dtype", torch.float32)) for model in (segmenter, encoder)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def image_key(context: str, image: np.ndarray) -> str:
    """The key of ``image`` (``[H, W, 3]`` uint8, as the predictor reads it) under ``context``."""
    digest = hashlib.sha256(f"{context}:{image.shape}:".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class CandidateCache:
    """A folder of :class:`DescribedCandidates` entries, at most ``max_bytes`` in all (least recently
    used first out). Shared safely by processes; an unwritable or full folder turns writing off with
    one warning, a damaged entry is recomputed with one."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InputError(f"cache size limit must be a positive number of bytes, got {max_bytes!r}")
        self.folder, self.max_bytes = Path(folder).expanduser(), max_bytes
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"cache folder {self.folder} is a file, not a folder; give a folder path")
        self.writable = True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self._stop_writing(error)

    def load(self, key: str, image_size: tuple[int, int], device: torch.device) -> DescribedCandidates | None:
        """The entry of ``key`` on ``device`` if there is a sound one that holds enough margin for masks
        at ``image_size``; None otherwise (a damaged entry also warns)."""
        path = self._path(key)
        try:
            with open(path, "rb") as file:  # the entry as it was when opened, even if replaced or evicted meanwhile
                opened, data = os.fstat(file.fileno()), file.read()
        except (FileNotFoundError, NotADirectoryError):  # not stored, or the folder is gone
            return None
        except OSError as error:
            return self._damaged(path, None, f"unreadable ({error})")
        try:
            tensors, metadata = _read_entry(data)
        except (SafetensorError, ValueError, RuntimeError) as error:
            return self._damaged(path, opened, f"unreadable ({error})")
        if metadata.get("schema") != str(SCHEMA) or metadata.get("key") != key:
            return None
        if metadata.get("digest") != _digest(tensors):
            return self._damaged(path, opened, "its contents do not match their digest")
        try:
            found = _unpack(tensors, int(metadata["mask_size"]))
        except (KeyError, ValueError, RuntimeError, IndexError) as error:
            return self._damaged(path, opened, f"inconsistent ({error})")
        if int(metadata["margin"]) < reading_margin(found.logits.shape[-1], image_size):
            return None  # stored for a larger image: masks this small read further (recomputed, stored again)
        _touch(path)
        return DescribedCandidates(*(t.to(device) for t in (found.logits, found.sam_iou, found.descriptors)))

    def store(self, key: str, candidates: DescribedCandidates, image_size: tuple[int, int]) -> None:
        """Write the entry of ``key`` atomically (with the margin masks at ``image_size`` need), then evict."""
        if not self.writable:
            return
        mask_size = candidates.logits.shape[-1]
        margin = reading_margin(mask_size, image_size)
        tensors = _pack(candidates, margin)
        metadata = {
            "schema": str(SCHEMA),
            "key": key,
            "mask_size": str(mask_size),
            "margin": str(margin),
            "digest": _digest(tensors),
        }
        if sum(t.numel() * t.element_size() for t in tensors.values()) > self.max_bytes:
            return  # larger than the whole cache
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=PART, suffix=SUFFIX)
        try:
            os.close(handle)
            save_file(tensors, temporary, metadata)
            os.replace(temporary, self._path(key))
        except OSError as error:
            Path(temporary).unlink(missing_ok=True)
            self._stop_writing(error)
            return
        self.evict()

    def size_bytes(self) -> int:
        """Bytes held by the folder's entries."""
        return sum(size for _, size, _ in self._entries())

    def evict(self) -> None:
        """Remove abandoned partial writes, then least recently used entries until the folder holds
        at most ``max_bytes``."""
        entries = sorted(self._entries(), key=lambda entry: entry[2])
        total = sum(size for _, size, _ in entries)
        for path, size, last_use in entries:
            if total <= self.max_bytes and last_use > 0:
                break
            path.unlink(missing_ok=True)  # another process may have removed it already
            total -= size

    def clear(self) -> int:
        """Remove every entry; returns the bytes freed."""
        freed = 0
        for path, size, _ in self._entries():
            path.unlink(missing_ok=True)
            freed += size
        return freed

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last use) of each entry, of any schema, and of each abandoned partial write
        (last use 0); writes under way are not listed."""
        entries = []
        try:
            with os.scandir(self.folder) as scan:
                for item in scan:
                    if not item.name.endswith(SUFFIX):
                        continue
                    try:
                        stat = item.stat()
                    except FileNotFoundError:
                        continue
                    if not item.name.startswith(PART):
                        entries.append((Path(item.path), stat.st_size, stat.st_mtime))
                    elif time.time() - stat.st_mtime > ABANDONED_S:
                        entries.append((Path(item.path), stat.st_size, 0.0))
        except FileNotFoundError:
            pass
        return entries

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def _damaged(self, path: Path, opened: os.stat_result | None, why: str) -> None:
        """Warn, and remove the damaged entry unless another process has replaced it since it was ``opened``."""
        warnings.warn(f"candidate cache entry {path} is damaged: {why}; recomputing it", CacheWarning, stacklevel=3)
        try:
            now = os.stat(path)
            if opened is None or (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                path.unlink()
        except OSError:
            pass  # gone already, or a read-only folder: it is recomputed either way
        return None

    def _stop_writing(self, error: OSError) -> None:
        self.writable = False
        warnings.warn(
            f"candidate cache folder {self.folder} cannot be written ({error}); going on without storing results",
            CacheWarning,
            stacklevel=3,
        )


def open_cache(choice: CandidateCache | str | os.PathLike | bool | None = True) -> CandidateCache | None:
    """The cache a caller asks for: True the default folder (:func:`default_folder`), None or False
    none, a folder path that folder, a :class:`CandidateCache` itself."""
    if choice is None or choice is False:
        return None
    if isinstance(choice, CandidateCache):
        return choice
    return CandidateCache(default_folder() if choice is True else choice)


def _pack(candidates: DescribedCandidates, margin: int) -> dict[str, torch.Tensor]:
    """Each candidate's logits inside its low-resolution box grown by ``margin`` (flattened, in
    candidate then row-major order), the regions ``[N, 4]`` (x0, y0, x1, y1 inclusive), IoUs, descriptors."""
    logits = candidates.logits.detach().cpu()
    boxes = mask_boxes(logits > 0).long()
    regions = torch.cat(
        [(boxes[:, :2] - margin).clamp(min=0), (boxes[:, 2:] + margin).clamp(max=logits.shape[-1] - 1)], 1
    )
    return {
        "values": logits[_inside(regions, logits.shape[-1])].contiguous(),
        "regions": regions.to(torch.int32),
        "sam_iou": candidates.sam_iou.detach().cpu().contiguous(),
        "descriptors": candidates.descriptors.detach().cpu().contiguous(),
    }


def _unpack(tensors: dict[str, torch.Tensor], mask_size: int) -> DescribedCandidates:
    """The inverse of :func:`_pack` (``OUTSIDE`` beyond the regions); a ValueError if the parts disagree."""
    values, regions = tensors["values"], tensors["regions"].long()
    sam_iou, descriptors = tensors["sam_iou"], tensors["descriptors"]
    count = regions.shape[0]
    if regions.dim() != 2 or regions.shape[1] != 4 or sam_iou.shape != (count,) or descriptors.shape[0] != count:
        raise ValueError("the candidates' parts have different counts")
    if count and (regions.min() < 0 or regions.max() >= mask_size or (regions[:, 2:] < regions[:, :2]).any()):
        raise ValueError("a region lies outside the masks")
    inside = _inside(regions, mask_size)
    if values.dim() != 1 or values.numel() != int(inside.sum()):
        raise ValueError("the stored logits do not fill their regions")
    logits = torch.full((count, mask_size, mask_size), OUTSIDE, dtype=values.dtype)
    logits[inside] = values
    return DescribedCandidates(logits, sam_iou, descriptors)


def _inside(regions: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, size, size]`` bool: the pixels of each inclusive region (x0, y0, x1, y1) ``[N, 4]``."""
    axis = torch.arange(size)
    rows = (axis >= regions[:, 1:2]) & (axis <= regions[:, 3:4])  # [N, size]
    cols = (axis >= regions[:, 0:1]) & (axis <= regions[:, 2:3])
    return rows[:, :, None] & cols[:, None, :]


def _read_entry(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file's bytes (a ValueError or SafetensorError if malformed)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("its metadata is not a table")
    return load(data), metadata


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (any device), by name."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _touch(path: Path) -> None:
    """Mark an entry as just used (its modification time orders eviction)."""
    try:
        os.utime(path)
    except OSError:
        pass  # evicted by another process meanwhile, or a read-only folder: nothing to order
