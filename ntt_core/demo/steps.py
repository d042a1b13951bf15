"""The method's steps in the demo: tag references in the ground truth, build the memory bank,
segment the other samples (through the plugin's operators, or with the stand-in models through
the library functions the operators call), evaluate through the evaluation operator."""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..input_rules import check_seed, is_crowd
from ..settings import Settings
from . import BANK_KEY, EVAL_KEY, GT_FIELD, PRED_FIELD, DemoError
from .plugin_link import operator

OFFLINE_SETTINGS = Settings(points_per_side=16)  # every generated shape gets a prompt inside it


def tag_references(dataset, classes: Sequence[str], shots: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Tag ``shots`` ground-truth instances per class, from distinct samples, as references.

    The paper's rule first (not crowd, box at least 32 px, 10 px from the borders; see
    :func:`ntt_core.coco.is_valid_reference`), in an order shuffled by ``seed``; smaller non-crowd
    instances fill in where a class has too few. Returns (sample id, label id) per class.
    """
    from ..coco import is_valid_reference
    from ..fiftyone.references import DEFAULT_REFERENCE_TAG

    check_seed(seed)
    candidates = {name: [] for name in classes}
    for sample_id, width, height, labels in zip(
        *dataset.values(["id", "metadata.width", "metadata.height", f"{GT_FIELD}.detections"])
    ):
        if not (labels and width and height):  # no labels, or an image whose size could not be read
            continue
        for label in labels:
            if label.label not in candidates or is_crowd(label):
                continue
            x, y, w, h = label.bounding_box
            box = {"bbox": [x * width, y * height, w * width, h * height]}
            valid = is_valid_reference(box, {"width": width, "height": height})
            candidates[label.label].append((not valid, sample_id, label.id))
    generator = random.Random(seed)
    chosen = {}
    for name, found in candidates.items():
        generator.shuffle(found)
        found.sort(key=lambda candidate: candidate[0])  # stable: the valid ones first, shuffled within
        picked, used = [], set()
        for _, sample_id, label_id in found:
            if sample_id not in used:
                picked.append((sample_id, label_id))
                used.add(sample_id)
            if len(picked) == shots:
                break
        if not picked:
            raise DemoError(f"class '{name}' has no usable instance in the loaded samples: raise --max-samples")
        if len(picked) < shots:
            print(
                f"ntt: warning: class '{name}': {len(picked)} reference(s) from distinct images, {shots} asked",
                file=sys.stderr,
            )
        chosen[name] = picked
    label_ids = [label_id for picked in chosen.values() for _, label_id in picked]
    dataset.select_labels(ids=label_ids, fields=GT_FIELD).tag_labels(DEFAULT_REFERENCE_TAG, label_fields=GT_FIELD)
    return chosen


@dataclass
class OperatorSteps:
    """Build and segment through the plugin's operators, the way the App runs them."""

    sam2: str | None
    dinov2: str | None
    device: str
    settings: Settings

    @property
    def sam2_name(self) -> str:
        from ..models import DEFAULT_SAM2

        return self.sam2 or DEFAULT_SAM2

    @property
    def dinov2_name(self) -> str:
        from ..models import DEFAULT_DINOV2

        return self.dinov2 or DEFAULT_DINOV2

    def load(self):
        """Load the models into the models module's per-process cache, which the operators read (the
        call matches theirs); returns the device they run on."""
        from ..models import load_models

        segmenter, _ = load_models(self.sam2, self.dinov2, device=self.device)
        return segmenter.device

    def _models(self) -> dict:
        return dict(sam2=self.sam2 or "", dinov2=self.dinov2 or "", device=self.device)

    def build(self, dataset, classes: Sequence[str]) -> dict:
        return operator("build_memory_bank")(
            dataset, GT_FIELD, bank_key=BANK_KEY, classes=list(classes), **self._models()
        )["report"]

    def segment(self, targets) -> dict:
        s = self.settings
        return operator("segment_by_reference")(
            targets,
            BANK_KEY,
            pred_field=PRED_FIELD,
            points_per_side=s.points_per_side,
            sam_iou_threshold=s.sam_iou_threshold,
            max_detections=s.max_detections,
            score_threshold=s.score_threshold,
            **self._models(),
        )["report"]


class StandInSteps:
    """Build and segment with the stand-in models, through the library functions the operators call."""

    def __init__(self, settings: Settings) -> None:
        from ..standins import ColourStatsEncoder, ConnectedRegionSegmenter

        self.settings = settings
        self.segmenter = ConnectedRegionSegmenter(input_size=192, mask_size=96)
        self.encoder = ColourStatsEncoder(input_size=112, grid_size=14)

    def build(self, dataset, classes: Sequence[str]) -> dict:
        from ..fiftyone.building import build_dataset_memory_bank

        return build_dataset_memory_bank(
            dataset, BANK_KEY, GT_FIELD, self.segmenter, self.encoder, classes=classes, settings=self.settings
        )

    def segment(self, targets) -> dict:
        from ..fiftyone.predictions import segment_by_reference

        return segment_by_reference(targets, BANK_KEY, PRED_FIELD, self.segmenter, self.encoder, settings=self.settings)


def evaluate(dataset) -> dict:
    """The evaluation operator: FiftyOne's COCO evaluation with masks, plus pycocotools."""
    return operator("evaluate_by_reference")(dataset, PRED_FIELD, eval_key=EVAL_KEY, gt_field=GT_FIELD)["report"]
