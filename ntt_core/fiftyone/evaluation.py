"""Evaluation of a prediction field: FiftyOne's COCO evaluator plus pycocotools bbox/segm figures
on the same samples and predictions, stored on the evaluation as custom metrics."""

from __future__ import annotations

from collections.abc import Sequence

import fiftyone.core.utils as fou
from fiftyone import ViewField as F
from PIL import Image

from .. import coco, coco_evaluation
from ..images import ImageError
from ..input_rules import is_crowd
from .fields import FiftyOneAdapterError, check_detections_field, check_key, image_collection
from .predictions import prediction_record

# imports torch: loaded at first use, so that forms resolve in the App without it
geometry = fou.lazy_import("ntt_core.geometry")

#: pycocotools figures stored on an evaluation as custom metrics (key -> (iou type, metric)).
DEFAULT_EVAL_KEY = "eval_ntt"
PYCOCOTOOLS_METRICS = {"pycocotools_segm_AP": ("segm", "AP"), "pycocotools_bbox_AP": ("bbox", "AP")}


def evaluate(
    samples,
    pred_field: str,
    eval_key: str,
    gt_field: str | None = None,
    classes: Sequence[str] | None = None,
    exclude_references: bool = True,
    use_masks: bool = True,
    overwrite: bool = False,
) -> dict:
    """FiftyOne COCO evaluation (``compute_mAP=True``, masks) plus pycocotools bbox/segm figures
    for the same samples and predictions, stored on the evaluation as custom metrics.

    Ground truth defaults to the bank's field and ``classes`` to the bank's classes (ground-truth
    labels of other classes are left out, as in the paper's protocol). Samples holding the bank's
    references are excluded unless ``exclude_references=False``. Returns a report with
    ``mAP`` (FiftyOne), ``pycocotools`` and ``notes``.
    """
    samples, note = image_collection(samples)
    dataset = samples._root_dataset
    check_detections_field(samples, pred_field, "prediction field")
    record = prediction_record(dataset, pred_field) or {}
    gt_field = gt_field or record.get("gt_field")
    if not gt_field:
        raise FiftyOneAdapterError(
            f"'{pred_field}' has no prediction record naming its ground truth: give the ground-truth field"
        )
    check_detections_field(samples, gt_field, "ground-truth field")
    if gt_field == pred_field:
        raise FiftyOneAdapterError("the prediction and ground-truth fields must differ")
    if check_eval_key(dataset, eval_key, overwrite):
        dataset.delete_evaluation(eval_key)

    notes = [note] if note else []
    references = record.get("reference_sample_ids", [])
    view = samples
    if exclude_references and references:
        view = samples.exclude(references)
        notes.append(
            f"{len(samples) - len(view)} sample(s) holding references excluded: scoring references against themselves inflates the numbers"
        )
    elif exclude_references:
        notes.append("no reference samples known for this field: none excluded")
    classes = list(classes or record.get("classes") or samples.distinct(f"{pred_field}.detections.label"))
    view = view.filter_labels(gt_field, F("label").is_in(classes), only_matches=False)
    view = view.filter_labels(pred_field, F("label").is_in(classes), only_matches=False)
    if len(view) == 0:
        raise FiftyOneAdapterError("no sample left to evaluate (the view is empty once reference samples are excluded)")
    absent = sorted(set(classes) - set(view.distinct(f"{gt_field}.detections.label")))
    if len(absent) == len(set(classes)):
        raise FiftyOneAdapterError(
            f"none of the class(es) {', '.join(map(repr, absent))} has ground truth in '{gt_field}' among the "
            "evaluated samples: AP is undefined; evaluate against a field and samples that annotate them"
        )
    if absent:
        notes.append(f"class(es) {', '.join(map(repr, absent))} have no ground truth in the evaluated samples")
    if use_masks and _has_box_only(view, gt_field):
        use_masks = False
        notes.append(f"some '{gt_field}' labels have no mask: FiftyOne's evaluation uses boxes")
    figures = pycocotools_figures(view, pred_field, gt_field, classes)  # before anything is written
    notes += figures["notes"]
    results = coco_evaluation_with_figures(view, pred_field, gt_field, eval_key, use_masks, classes, figures)
    return {
        "eval_key": eval_key,
        "gt_field": gt_field,
        "samples": len(view),
        "classes": classes,
        "mAP": float(results.mAP()),
        "use_masks": use_masks,
        "pycocotools": {t: figures.get(t) for t in ("bbox", "segm")},
        "notes": notes,
    }


def coco_evaluation_with_figures(view, pred_field, gt_field, eval_key, use_masks, classes, figures: dict):
    """FiftyOne's COCO evaluation (masks or boxes, mAP) with the pycocotools ``figures`` kept on it as
    custom metrics (the App lists them); returns its results."""
    results = view.evaluate_detections(
        pred_field,
        gt_field=gt_field,
        eval_key=eval_key,
        method="coco",
        use_masks=use_masks,
        compute_mAP=True,
        classes=classes,
    )
    results.custom_metrics = {
        name: {
            "key": name,
            "value": figures.get(iou_type, {}).get(metric),
            "label": f"pycocotools {iou_type} AP",
            "lower_is_better": False,
            "stats": figures.get(iou_type),
        }
        for name, (iou_type, metric) in PYCOCOTOOLS_METRICS.items()
    }
    results.save()
    return results


def check_eval_key(dataset, eval_key: str, overwrite: bool = False) -> bool:
    """Raise unless ``eval_key`` may name a new evaluation; returns whether one exists (to replace)."""
    dataset = dataset._root_dataset
    check_key(eval_key, "evaluation key")
    if eval_key in dataset.list_evaluations():
        if not overwrite:
            raise FiftyOneAdapterError(
                f"evaluation '{eval_key}' already exists: choose another key or allow overwriting it"
            )
        return True
    if dataset.has_run(eval_key) or eval_key in dataset.list_brain_runs():
        raise FiftyOneAdapterError(f"key '{eval_key}' is taken by another run")
    if dataset.has_field(eval_key) or any(dataset.has_field(f"{eval_key}_{k}") for k in ("tp", "fp", "fn")):
        raise FiftyOneAdapterError(f"evaluation key '{eval_key}' would clash with an existing field")
    return False


def _has_box_only(view, gt_field: str) -> bool:
    without = view.filter_labels(gt_field, (F("mask") == None) & (F("mask_path") == None), only_matches=True)  # noqa: E711
    return len(without) > 0


def pycocotools_figures(view, pred_field: str, gt_field: str, classes: Sequence[str]) -> dict:
    """pycocotools bbox and segm metrics of ``pred_field`` against ``gt_field`` on ``view``
    (see :func:`ntt_core.coco_evaluation.evaluate`); images whose size cannot be read are left out, with a note."""
    category = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations, results, unreadable = [], [], [], []
    for image_id, (path, truth, predicted) in enumerate(zip(*view.values(["filepath", gt_field, pred_field])), start=1):
        try:
            size = _image_size(path)
        except ImageError:
            unreadable.append(path)
            continue
        images.append({"id": image_id, "file_name": path, "height": size[0], "width": size[1]})
        for label in truth.detections if truth else []:
            entry = _coco_entry(label, size)
            if entry is not None and label.label in category:
                crowd = int(is_crowd(label))  # COCO imports keep it
                entry.update(
                    id=len(annotations) + 1, image_id=image_id, category_id=category[label.label], iscrowd=crowd
                )
                annotations.append(entry)
        for label in predicted.detections if predicted else []:
            entry = _coco_entry(label, size, prediction=True)
            if entry is not None and label.label in category:
                entry.update(image_id=image_id, category_id=category[label.label], score=float(label.confidence or 0.0))
                results.append(entry)
    truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in category.items()],
    }
    report = coco_evaluation.evaluate(truth, results)
    if unreadable:
        report["notes"].append(
            f"{len(unreadable)} unreadable image(s) left out of the pycocotools figures: {', '.join(unreadable[:3])}"
        )
    return report


def _coco_entry(label, size: tuple[int, int], prediction: bool = False) -> dict | None:
    """A COCO annotation (or, for a ``prediction``, a result with the authors' inclusive box: see
    :func:`ntt_core.coco.result_box`) from a ``fo.Detection``; None if its box is unusable."""
    box = geometry.pixel_box(label.bounding_box, size)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    entry = {"bbox": coco.result_box(box) if prediction else [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
    crop = label.get_mask()
    if crop is not None:
        entry["segmentation"] = coco.encode_crop(geometry.fit_mask(crop, box), box, size)
    return entry


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image as :func:`~ntt_core.images.load_image` reads it (EXIF-upright),
    from its header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                width, height = height, width
    except (OSError, SyntaxError) as error:
        raise ImageError(f"{path}: unreadable image ({error})") from None
    return height, width
