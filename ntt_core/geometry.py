"""Box and mask geometry: boxes of masks (one, or ``[N, H, W]`` on the device), the authors'
square reference crop, relative boxes to pixel boxes, masks stored for a box to full-image masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
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


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight end-exclusive box (x0, y0, x1, y1) of the non-zero pixels, or None if there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` bool -> ``[N, 4]`` float (x0, y0, x1, y1) with inclusive max coordinates, as
    ``torchvision.ops.masks_to_boxes``; zeros for empty masks."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [N, H], [N, W]
    height, width = masks.shape[-2:]
    y0 = rows.float().argmax(dim=1)
    y1 = height - 1 - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = width - 1 - cols.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return boxes * rows.any(dim=1, keepdim=True)


def reference_crop_box(
    box: Sequence[float], image_size: tuple[int, int], context_ratio: float
) -> tuple[int, int, int, int]:
    """The authors' reference crop: a square around the box centre, side max(w, h) x (1 + context_ratio),
    clipped to the image, every edge rounded down: the corners ``int()``-ed, then
    ``int(mid - side / 2)`` and ``int(mid + side / 2)``. Returns integer (x0, y0, x1, y1),
    end-exclusive; never empty (theirs is empty, and fails, for a box under one pixel)."""
    height, width = image_size
    x0, y0, x1, y1 = (int(float(v)) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + context_ratio)
    mid_x, mid_y = (x0 + x1) * 0.5, (y0 + y1) * 0.5
    left, top = max(0, int(mid_x - side * 0.5)), max(0, int(mid_y - side * 0.5))
    right, bottom = min(width, int(mid_x + side * 0.5)), min(height, int(mid_y + side * 0.5))
    left, top = min(left, width - 1), min(top, height - 1)
    return left, top, max(right, left + 1), max(bottom, top + 1)
