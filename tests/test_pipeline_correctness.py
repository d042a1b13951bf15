"""End to end on synthetic scenes: the real memory bank, predictor, COCO export and pycocotools
evaluation, with the deterministic stand-in models (ntt_core.standins) instead of SAM2 and DINOv2.

The stand-ins find every shape exactly and tell the classes apart, so any loss of AP comes from
the pipeline: coordinates and resizing (images of two aspect ratios, a non-square frame-to-image
mapping), mask upsampling, feature pooling, scoring, NMS and the COCO export.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntt_core.coco import instances_to_coco_results
from ntt_core.coco_evaluation import evaluate
from ntt_core.memory_bank import build_memory_bank
from ntt_core.predictor import Predictor
from ntt_core.references import ReferenceImage, ReferenceInstance
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter
from ntt_core.synthetic import IMAGES_DIR, make_dataset, reference_images, write_coco_folder

CLASSES = ("disc", "square", "triangle")
DISTRACTOR = "star"
SETTINGS = Settings(points_per_side=16)  # the method's logic, a smaller prompt grid


def make_models() -> tuple[ConnectedRegionSegmenter, ColourStatsEncoder]:
    return ConnectedRegionSegmenter(input_size=192, mask_size=96), ColourStatsEncoder(input_size=112, grid_size=14)


def make_targets():
    """Landscape and portrait images, so a swapped height and width cannot go unnoticed, with
    unannotated stars among the shapes: a class the bank does not know must score low."""
    shapes = (*CLASSES, DISTRACTOR)
    landscape = make_dataset(4, seed=200, size=(144, 192), classes=shapes)
    return landscape + make_dataset(3, seed=300, size=(176, 128), classes=shapes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(2)
    segmenter, encoder = make_models()
    references = make_dataset(3, seed=100, size=(144, 192), classes=CLASSES)
    bank = build_memory_bank(reference_images(references), encoder, settings=SETTINGS, classes=CLASSES)
    targets = make_targets()
    folder = tmp_path_factory.mktemp("targets")
    truth = write_coco_folder(targets, folder, classes=CLASSES)
    paths = [folder / IMAGES_DIR / f"{i:06d}.png" for i in range(len(targets))]
    predictions = Predictor(segmenter, encoder, bank, SETTINGS).predict_paths(paths)
    return targets, predictions, truth


def test_synthetic_scenes_are_segmented_almost_perfectly(run):
    targets, predictions, truth = run
    category_ids = {name: i + 1 for i, name in enumerate(CLASSES)}
    results = [r for i, p in enumerate(predictions) for r in instances_to_coco_results(p, i + 1, category_ids)]
    report = evaluate(truth, results)
    assert report["segm"]["AP"] >= 0.9, report
    # The results carry the authors' inclusive boxes, one pixel narrower and shorter than the
    # generated ground truth's pixel extents: the geometry is checked on the extents (w + 1, h + 1).
    extents = [{**r, "bbox": [*r["bbox"][:2], r["bbox"][2] + 1, r["bbox"][3] + 1]} for r in results]
    assert evaluate(truth, extents)["bbox"]["AP"] >= 0.85, report
    assert report["bbox"]["AP"] < evaluate(truth, extents)["bbox"]["AP"]  # the convention costs box AP on small shapes


def test_every_instance_is_found_with_its_class(run):
    targets, predictions, _ = run
    for scene, found in zip(targets, predictions):
        assert found.image_size == scene.image.shape[:2]
        annotated = [i for i, name in enumerate(scene.class_names) if name != DISTRACTOR]
        confident = np.flatnonzero(found.scores > 0.4)
        assert len(confident) == len(annotated)  # one confident prediction per instance, none on stars
        for index in confident:
            mask = found.full_mask(index)
            ious = [(mask & scene.masks[i]).sum() / (mask | scene.masks[i]).sum() for i in annotated]
            best = int(np.argmax(ious))
            assert ious[best] > 0.9
            assert found.labels_as_names[index] == scene.class_names[annotated[best]]


def test_no_two_predictions_of_a_class_overlap_beyond_the_nms_threshold(run):
    _, predictions, _ = run
    for found in predictions:
        boxes = found.boxes.astype(np.float64)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for i in range(len(found)):
            for j in range(i + 1, len(found)):
                if found.labels[i] != found.labels[j]:
                    continue
                width = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
                height = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
                overlap = max(width, 0.0) * max(height, 0.0)
                assert overlap / (areas[i] + areas[j] - overlap) <= SETTINGS.nms_iou_threshold + 0.05


def test_box_only_references_describe_the_same_instances():
    """Boxes turned into masks by the segmenter's box prompts (non-square images, so the frame
    scales x and y differently) give the descriptors the exact masks give."""
    segmenter, encoder = make_models()
    scenes = make_dataset(1, seed=100, size=(144, 192), classes=CLASSES)
    masked = build_memory_bank(reference_images(scenes), encoder, settings=SETTINGS)
    boxed = [
        ReferenceImage(
            scene.image,
            [ReferenceInstance(name, box=box.tolist()) for name, box in zip(scene.class_names, scene.boxes)],
        )
        for scene in scenes
    ]
    from_boxes = build_memory_bank(boxed, encoder, segmenter=segmenter, settings=SETTINGS)
    assert from_boxes.classes == masked.classes
    cosine = torch.nn.functional.cosine_similarity(from_boxes.descriptors, masked.descriptors, dim=1)
    assert cosine.min() > 0.99
