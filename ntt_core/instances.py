"""Predicted instances of one image, with masks stored cropped to their boxes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Instances:
    """The instances found in one image, best first.

    Masks are kept cropped to their integer boxes, so a huge image never holds ``N`` full-size
    masks: ``masks[i]`` covers ``boxes[i]`` = (x0, y0, x1, y1), end-exclusive pixel bounds, the
    mask's exact pixel extent (as FiftyOne stores a mask: cropped to its box). The COCO results
    box the authors write is one pixel smaller (see :func:`ntt_core.coco.result_box`).
    """

    image_size: tuple[int, int]  # (height, width)
    boxes: np.ndarray  # [N, 4] int64, x0, y0, x1, y1 (end-exclusive)
    masks: list[np.ndarray]  # N bool arrays, [y1 - y0, x1 - x0]
    labels: np.ndarray  # [N] int64, index into class_names
    class_names: list[str]
    scores: np.ndarray  # [N] float32, final score: semantic score x merge factor
    semantic_scores: np.ndarray  # [N] float32, cosine to the class prototype (clamped at 0)
    sam_iou: np.ndarray  # [N] float32, SAM2's predicted IoU
    merge_factors: np.ndarray  # [N] float32, sqrt(1 - IoS) from semantic-aware soft merging
    reference_ids: list[str] = field(default_factory=list)  # best-matching reference per instance

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def empty(cls, image_size: tuple[int, int], class_names: list[str]) -> Instances:
        zeros = np.zeros(0, dtype=np.float32)
        return cls(
            image_size=tuple(image_size),
            boxes=np.zeros((0, 4), dtype=np.int64),
            masks=[],
            labels=np.zeros(0, dtype=np.int64),
            class_names=list(class_names),
            scores=zeros,
            semantic_scores=zeros.copy(),
            sam_iou=zeros.copy(),
            merge_factors=zeros.copy(),
            reference_ids=[],
        )

    @property
    def labels_as_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels]

    def full_mask(self, index: int) -> np.ndarray:
        """Mask ``index`` at the full image size, ``[H, W]`` bool."""
        full = np.zeros(self.image_size, dtype=bool)
        x0, y0, x1, y1 = self.boxes[index]
        full[y0:y1, x0:x1] = self.masks[index]
        return full

    def filter(self, keep: np.ndarray) -> Instances:
        """The instances where ``keep`` (a bool mask or an index array) selects."""
        index = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=np.int64)
        return Instances(
            image_size=self.image_size,
            boxes=self.boxes[index],
            masks=[self.masks[i] for i in index],
            labels=self.labels[index],
            class_names=self.class_names,
            scores=self.scores[index],
            semantic_scores=self.semantic_scores[index],
            sam_iou=self.sam_iou[index],
            merge_factors=self.merge_factors[index],
            reference_ids=[self.reference_ids[i] for i in index] if self.reference_ids else [],
        )
