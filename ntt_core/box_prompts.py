"""SAM2 box prompts: boxes in image pixels to masks (reference instances given by a box, the
App's boxes-to-masks), each cut to a window so no full-size mask is made."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .frames import square_frame
from .merging import crop_masks
from .models import PromptSegmenter


def _box_logits(segmenter: PromptSegmenter, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """SAM2 box prompts (x0, y0, x1, y1 in image pixels) -> low-resolution mask logits ``[N, m, m]`` float32."""
    height, width = image.shape[:2]
    frame = segmenter.input_size
    features = segmenter.embed(square_frame(image, frame).to(segmenter.device))
    scale = torch.tensor([frame / width, frame / height, frame / width, frame / height])
    prompts = torch.as_tensor(np.asarray(boxes, dtype=np.float32)) * scale
    logits, _ = segmenter.segment_boxes(features, prompts[None])  # [1, N, m, m]
    return logits[0].float()


def box_mask_crops(
    segmenter: PromptSegmenter,
    image: np.ndarray,
    boxes: Sequence[Sequence[float]],
    windows: Sequence[tuple[int, int, int, int]] | None = None,
) -> list[np.ndarray]:
    """SAM2 box prompts (x0, y0, x1, y1 in image pixels) -> each full-resolution mask
    (``F.interpolate(bilinear, antialias=True) > 0`` of its logits) cut to its window, integer
    end-exclusive (default: its own box), ``[y1 - y0, x1 - x0]`` bool, without any full-size mask."""
    logits = _box_logits(segmenter, image, boxes)
    windows = boxes if windows is None else windows
    bounds = torch.as_tensor(np.asarray(windows, dtype=np.int64).reshape(-1, 4), device=logits.device)
    return crop_masks(logits, bounds, image.shape[:2])
