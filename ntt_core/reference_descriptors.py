"""Describing reference instances (stage 1 of the method): each instance's crop resized to the
encoder's input, its mask pooled over the encoder's patch features into one descriptor."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .box_prompts import box_mask_crops
from .frames import bicubic, image_tensor
from .geometry import mask_box, reference_crop_box
from .images import as_rgb_array, load_image
from .models import FeatureEncoder, PromptSegmenter
from .references import ReferenceImage, ReferenceInstance, skipped_instance
from .settings import Settings


def describe_crops(
    encoder: FeatureEncoder, crops: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-weighted mean patch features.

    crops ``[N, 3, S, S]`` in [0, 1] and soft masks ``[N, S, S]`` at the encoder's input size ->
    descriptors ``[N, C]`` and mask weight sums ``[N]`` (0 means an empty mask).
    """
    features = encoder.encode(crops).float()  # [N, C, g, g]
    grid = features.shape[-1]
    # PyTorch's legacy 'nearest' takes source pixel floor(i * S / g): the top-left pixel of each patch.
    weights = F.interpolate(masks[:, None].float(), size=(grid, grid), mode="nearest")[:, 0].to(features.device)
    totals = weights.flatten(1).sum(1)  # [N]
    sums = torch.einsum("nchw,nhw->nc", features, weights)
    return (sums / totals.clamp(min=1e-12).unsqueeze(1)).cpu(), totals.cpu()


@dataclass
class DescribedReferences:
    """Descriptors of usable reference instances, in input order, and the instances skipped."""

    descriptors: torch.Tensor  # [N, C] float32, mask-weighted mean patch features (not normalised)
    instances: list[ReferenceInstance]  # [N]
    image_ids: list[str]  # [N]
    skipped: list[dict]  # {"reference_id", "class_name", "reason"}


def describe_references(
    references: Iterable[ReferenceImage],
    encoder: FeatureEncoder,
    segmenter: PromptSegmenter | None = None,
    settings: Settings | None = None,
    progress: Callable[[int], None] | None = None,
) -> DescribedReferences:
    """Describe every usable reference instance with the encoder (stage 1 of the method).

    Box-only references get their mask from the segmenter's box prompt. Instances that cannot
    be used (empty mask, no mask and no box, box outside the image, empty at the patch grid) are
    skipped with the reason. ``progress`` is called with the number of reference images done.
    """
    settings = settings or Settings()
    size = encoder.input_size
    crops, masks, meta, skipped = [], [], [], []
    for done, reference in enumerate(references, start=1):
        image = (
            load_image(reference.image, reference.exif_orientation)
            if isinstance(reference.image, (str, Path))
            else as_rgb_array(reference.image)
        )
        height, width = image.shape[:2]
        for instance in reference.instances:
            reason = _unusable(instance, (height, width), segmenter)
            if reason:
                skipped.append(skipped_instance(instance, reason))
                continue
            mask = None if instance.mask is None else np.asarray(instance.mask)
            box = mask_box(mask > 0) if instance.box is None else instance.box
            window = reference_crop_box(box, (height, width), settings.context_ratio)
            x0, y0, x1, y1 = window
            if mask is None:  # box-only: SAM2's mask of the box, computed over the crop alone
                mask_crop = box_mask_crops(segmenter, image, [instance.box], [window])[0]
            else:
                mask_crop = mask[y0:y1, x0:x1]
            crops.append(bicubic(image_tensor(image[y0:y1, x0:x1]), (size, size))[0])  # only the crop in float
            crop_mask = torch.from_numpy(mask_crop.astype(np.float32))[None, None]
            masks.append(F.interpolate(crop_mask, size=(size, size), mode="bilinear", align_corners=False)[0, 0])
            meta.append((instance, str(reference.image_id)))
        if progress is not None:
            progress(done)

    descriptors, totals = [], []
    for start in range(0, len(crops), 16):
        d, t = describe_crops(encoder, torch.stack(crops[start : start + 16]), torch.stack(masks[start : start + 16]))
        descriptors.append(d)
        totals.append(t)
    totals = torch.cat(totals) if totals else torch.zeros(0)
    kept = []
    for row, (instance, _) in enumerate(meta):
        if totals[row] <= 0:
            skipped.append(skipped_instance(instance, "mask is empty at the encoder's patch grid"))
        else:
            kept.append(row)
    descriptors = torch.cat(descriptors)[kept].float() if kept else torch.zeros(0, 0)
    return DescribedReferences(
        descriptors=descriptors,
        instances=[meta[row][0] for row in kept],
        image_ids=[meta[row][1] for row in kept],
        skipped=skipped,
    )


def _unusable(instance: ReferenceInstance, image_size: tuple[int, int], segmenter: PromptSegmenter | None) -> str:
    """Why the instance cannot be used in an image of ``image_size`` (height, width), or ""."""
    height, width = image_size
    if instance.mask is not None:
        mask = np.asarray(instance.mask)
        if mask.shape != (height, width):
            return f"mask shape {mask.shape} differs from the image size {(height, width)}"
        if not np.isfinite(mask).all() or not (mask > 0).any():
            return "mask is empty"
        return ""
    if instance.box is None:
        return "neither a mask nor a box"
    x0, y0, x1, y1 = (float(v) for v in instance.box)
    if not (x1 > x0 and y1 > y0) or x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return f"box {list(instance.box)} is empty or outside the {width}x{height} image"
    if segmenter is None:
        return "box-only reference but no segmenter was given to turn the box into a mask"
    return ""
