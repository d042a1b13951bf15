"""Candidate masks from SAM2: a grid of point prompts, best-of-three selection, IoU filtering, box NMS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from .models import PromptSegmenter
from .prompt_decoder import choose_outputs
from .stages import stage


@dataclass
class Candidates:
    """Candidate masks of one image at SAM2's low resolution."""

    logits: torch.Tensor  # [N, m, m] float32 mask logits
    sam_iou: torch.Tensor  # [N] float32 predicted IoU of the chosen output


def point_grid(points_per_side: int, frame: int, device: torch.device | None = None) -> torch.Tensor:
    """``[n * n, 2]`` (x, y) prompts: linspace(0, frame - 1, n) + 0.5 on each axis, row by row.

    The +0.5 is the method's; SAM2's prompt encoder adds its own +0.5 pixel-centre shift on top.
    """
    axis = torch.linspace(0, frame - 1, points_per_side, device=device) + 0.5
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def propose(
    segmenter: PromptSegmenter,
    features: object,
    batch_size: int,
    points: torch.Tensor,
    prompt_batch_size: int,
    iou_threshold: float,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Candidates]:
    """Decode every point prompt for each image of the batch; keep, per prompt, the one of SAM2's three
    outputs with the highest predicted IoU, and only if that IoU exceeds ``iou_threshold``
    (:func:`best_of_three`, computed by the segmenter so that it can skip what is dropped).

    points ``[P, 2]`` in frame pixels -> one :class:`Candidates` per image (all prompts decoded,
    including a last partial batch). ``on_batch(done, total)`` is called after each prompt batch with the
    prompts decoded so far (progress; an exception it raises stops the loop there).
    """
    kept_logits: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    kept_iou: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    for start in range(0, points.shape[0], prompt_batch_size):
        chunk = points[start : start + prompt_batch_size][None].expand(batch_size, -1, -1)
        with stage("prompt_decoding", items=chunk.shape[0] * chunk.shape[1]):
            chosen = segmenter.segment_best_points(features, chunk, iou_threshold)
        for image, (logits, iou) in enumerate(chosen):
            kept_logits[image].append(logits)
            kept_iou[image].append(iou)
        if on_batch is not None:
            on_batch(min(start + prompt_batch_size, points.shape[0]), points.shape[0])
    return [Candidates(torch.cat(logits), torch.cat(iou)) for logits, iou in zip(kept_logits, kept_iou)]


def best_of_three(
    logits: torch.Tensor, iou: torch.Tensor, iou_threshold: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The method's choice among SAM2's three outputs of each prompt, for segmenters that compute
    them all: logits ``[B, P, 3, m, m]``, predicted IoUs ``[B, P, 3]`` -> per image, the logits
    ``[n, m, m]`` and IoU ``[n]`` of the output with the highest predicted IoU, for the n prompts
    where that IoU exceeds ``iou_threshold``, in prompt order."""
    best_iou, best, keep = choose_outputs(iou, iou_threshold)
    index = best[:, :, None, None, None].expand(-1, -1, 1, *logits.shape[-2:])
    best_logits = logits.gather(2, index)[:, :, 0]  # [B, P, m, m]
    return [(chosen[passed], ious[passed]) for chosen, ious, passed in zip(best_logits, best_iou, keep)]


def class_nms(
    boxes: torch.Tensor, sam_iou: torch.Tensor, labels: torch.Tensor, iou_threshold: float, keep: int
) -> torch.Tensor:
    """Box NMS within each predicted class, ranked by SAM2's predicted IoU; the first ``keep`` indices
    of the survivors, in decreasing predicted-IoU order."""
    return batched_nms(boxes.float(), sam_iou.float(), labels, iou_threshold)[:keep]
