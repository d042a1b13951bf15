"""Box and mask geometry between the image and its annotations: relative boxes to pixel boxes,
masks stored for a box to full-image masks."""

from __future__ import annotations

import numpy as np
from PIL import Image


def pixel_box(bounding_box, image_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Relative ``[x, y, w, h]`` -> integer end-exclusive (x0, y0, x1, y1) clipped to the image,
    or None when missing, malformed, empty or outside."""
    height, width = image_size
    try:
        x, y, w, h = (float(v) for v in bounding_box)
    except (TypeError, ValueError):
        return None
    if not np.isfinite([x, y, w, h]).all():
        return None
    x0, y0 = max(round(x * width), 0), max(round(y * height), 0)
    x1, y1 = min(round((x + w) * width), width), min(round((y + h) * height), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def fit_mask(crop: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """An instance mask stored for ``box`` (any size: resized nearest to the box) -> ``[y1 - y0, x1 - x0]`` bool."""
    x0, y0, x1, y1 = box
    crop = np.asarray(crop)
    if crop.ndim == 3:
        crop = crop[..., 0]
    if crop.shape != (y1 - y0, x1 - x0):
        crop = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((x1 - x0, y1 - y0), Image.NEAREST))
    return crop > 0


def place_mask(crop: np.ndarray, box: tuple[int, int, int, int], image_size: tuple[int, int]) -> np.ndarray:
    """An instance mask cropped to ``box`` (see :func:`fit_mask`) -> ``[H, W]`` bool."""
    x0, y0, x1, y1 = box
    full = np.zeros(image_size, dtype=bool)
    full[y0:y1, x0:x1] = fit_mask(crop, box)
    return full
