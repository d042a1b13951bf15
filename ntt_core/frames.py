"""The models' input frames made from RGB uint8 images, with the authors' resampling (see README,
"Faithfulness"): Pillow's bicubic for SAM2's square frame, torch bicubic without antialiasing or
clamping for DINOv2's inputs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[1, 3, H, W]`` float32 in [0, 1]."""
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255.0)


def square_frame(image: np.ndarray, side: int) -> torch.Tensor:
    """SAM2's input frame: ``[H, W, 3]`` uint8 -> ``[1, 3, side, side]`` float32 in [0, 1], resized by
    Pillow's bicubic filter on the uint8 image (the aspect ratio is not kept), as the authors'
    loader (Meta's ``sam2/utils/misc.py``) does."""
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((side, side), Image.BICUBIC)
    return image_tensor(np.asarray(resized))


def bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, *size]`` by torch bicubic, without antialiasing or clamping (values
    slightly outside [0, 1] stay), as the authors resize DINOv2's inputs."""
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False)
