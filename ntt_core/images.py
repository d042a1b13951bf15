"""Reading images into RGB uint8 arrays, whatever their mode, bit depth or EXIF orientation.

Nothing here imports torch (the FiftyOne side reads images through this module while the App lists and
resolves forms); the models' input frames are in :mod:`ntt_core.frames`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import NttError


class ImageError(NttError):
    """An image that cannot be read or used; the message names the file and the reason."""


def load_image(path: str | Path, exif_orientation: bool = True) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB, upright according to its EXIF tag (as FiftyOne's
    metadata and the App show it) unless ``exif_orientation`` is False (the stored pixels, as the
    authors' COCO loader reads them)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            return as_rgb_array(image, name=str(path))
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"{path}: too large to decode safely ({error}); if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageError(f"{path}: unreadable or corrupt image ({error})") from None


def as_rgb_array(image: Image.Image | np.ndarray, name: str = "image") -> np.ndarray:
    """Convert a PIL image or an array (gray, RGB, RGBA; uint8, uint16 or float) to ``[H, W, 3]`` uint8."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            array = array / 65535.0 if image.mode.startswith("I;16") else array / max(array.max(), 1.0)
            image = Image.fromarray(np.round(array * 255.0).astype(np.uint8))
        elif image.mode == "F":
            image = Image.fromarray(np.clip(np.asarray(image) * 255.0, 0, 255).astype(np.uint8))
        array = np.asarray(image.convert("RGB"))
    else:
        array = _array_to_uint8(np.asarray(image), name)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        elif array.ndim == 3 and array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        elif array.ndim == 3 and array.shape[2] == 4:
            array = array[:, :, :3]
        if array.ndim != 3 or array.shape[2] != 3:
            raise ImageError(f"{name}: expected an image of shape [H, W] or [H, W, 1|3|4], got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: image has no pixels (shape {array.shape})")
    return np.ascontiguousarray(array)


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: image holds NaN or infinite values")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
    raise ImageError(f"{name}: unsupported pixel type {array.dtype}")
