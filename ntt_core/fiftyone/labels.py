"""Labels: the predictor's ``Instances`` as ``fo.Detections``, and masks for box-only detections
from SAM2 box prompts."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.core.fields as fof
import fiftyone.core.utils as fou
import numpy as np

from ..images import ImageError, load_image
from ..instances import Instances
from .fields import (
    FiftyOneAdapterError,
    Progress,
    check_detections_field,
    check_output_field,
    images_to_process,
    protected_fields,
)

# these import torch: loaded at first use, so that forms resolve in the App without it
geometry = fou.lazy_import("ntt_core.geometry")
box_prompts = fou.lazy_import("ntt_core.box_prompts")

#: What :func:`instances_to_detections` writes on each detection besides FiftyOne's own ``confidence``:
#: declared on the prediction field (:func:`declare_prediction_attributes`) so that the App's sidebar filters them.
PREDICTION_ATTRIBUTES = {
    "reference_id": fof.StringField,
    "sam_iou": fof.FloatField,
    "semantic_score": fof.FloatField,
    "merge_factor": fof.FloatField,
}


def instances_to_detections(instances: Instances) -> fo.Detections:
    """``Instances`` -> ``fo.Detections`` with masks cropped to relative ``[x, y, w, h]`` boxes and
    the attributes ``reference_id``, ``sam_iou``, ``semantic_score``, ``merge_factor``.
    Instances with an empty mask are left out."""
    height, width = instances.image_size
    detections = []
    for i in range(len(instances)):
        x0, y0, x1, y1 = (int(v) for v in instances.boxes[i])
        mask = np.asarray(instances.masks[i], dtype=bool)
        if x1 <= x0 or y1 <= y0 or not mask.any():
            continue
        detections.append(
            fo.Detection(
                label=instances.class_names[int(instances.labels[i])],
                bounding_box=[x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height],
                mask=mask,
                confidence=float(instances.scores[i]),
                reference_id=instances.reference_ids[i] if instances.reference_ids else None,
                sam_iou=float(instances.sam_iou[i]),
                semantic_score=float(instances.semantic_scores[i]),
                merge_factor=float(instances.merge_factors[i]),
            )
        )
    return fo.Detections(detections=detections)


def declare_prediction_attributes(dataset, field_name: str) -> None:
    """Declare :data:`PREDICTION_ATTRIBUTES` in the schema of the Detections field ``field_name``
    (those already declared are left as they are)."""
    dataset = dataset._root_dataset
    for name, kind in PREDICTION_ATTRIBUTES.items():
        path = f"{field_name}.detections.{name}"
        if not dataset.has_field(path):
            dataset.add_sample_field(path, kind)


def check_in_place(dataset, field_name: str) -> None:
    """Raise if ``field_name`` may not get its masks in place: it is ground truth (:func:`.fields.protected_fields`)."""
    if field_name in protected_fields(dataset):
        raise FiftyOneAdapterError(f"'{field_name}' is a ground-truth field: write the masks to a new field instead")


def boxes_to_masks(
    samples,
    in_field: str,
    segmenter,
    out_field: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Fill the masks of box-only detections of ``in_field`` with SAM2 box prompts.

    Writes a copy of every detection (new label ids; masks already present are kept) to
    ``out_field``; ``out_field=None`` or equal to ``in_field`` writes in place, which is refused
    for ground-truth fields. Returns ``{"field", "filled", "kept", "failed", "samples"}``.
    """
    samples, _ = images_to_process(samples)
    dataset = samples._root_dataset
    check_detections_field(samples, in_field, "input field")
    in_place = out_field in (None, in_field)
    out_field = in_field if in_place else out_field
    if in_place:
        check_in_place(dataset, in_field)
    elif check_output_field(dataset, out_field, overwrite=overwrite):
        dataset.clear_sample_field(out_field)
    else:
        dataset.add_sample_field(out_field, fof.EmbeddedDocumentField, embedded_doc_type=fo.Detections)

    ids, paths, labels = samples.exists(in_field).values(["id", "filepath", in_field])
    report = {"field": out_field, "filled": 0, "kept": 0, "failed": [], "samples": 0}
    for done, (sample_id, path, detections) in enumerate(zip(ids, paths, labels), start=1):
        copies = [det.copy() if not in_place else det for det in detections.detections]
        todo = [det for det in copies if not det.has_mask]
        report["kept"] += len(copies) - len(todo)
        if todo:
            try:
                image = load_image(path)
            except ImageError as error:
                report["failed"].append({"sample_id": sample_id, "reason": str(error)})
                continue
            _fill_masks(todo, image, segmenter, report)
        dataset.set_values(out_field, {sample_id: fo.Detections(detections=copies)}, key_field="id")
        report["samples"] += 1
        if progress is not None:
            progress(done, len(ids))
    return report


def _fill_masks(detections: list, image: np.ndarray, segmenter, report: dict) -> None:
    size = image.shape[:2]
    boxes = [geometry.pixel_box(det.bounding_box, size) for det in detections]
    usable = [(det, box) for det, box in zip(detections, boxes) if box is not None]
    for det, box in zip(detections, boxes):
        if box is None:
            report["failed"].append(
                {"label_id": det.id, "reason": f"bounding box {det.bounding_box!r} is empty or outside the image"}
            )
    if not usable:
        return
    crops = box_prompts.box_mask_crops(segmenter, image, [box for _, box in usable])
    for (det, _), crop in zip(usable, crops):
        if crop.any():
            det.mask = crop
            report["filled"] += 1
        else:
            report["failed"].append({"label_id": det.id, "reason": "SAM2 returned an empty mask inside the box"})
