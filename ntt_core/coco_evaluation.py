"""COCO evaluation of results with pycocotools: bbox and segm AP/AR over chosen categories, the
results checked against the ground truth first."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco import CocoFormatError, annotation_mask, check_box, load_coco, read_json

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")
_STAT_INDEX = (0, 1, 2, 3, 4, 5, 8)  # positions of METRIC_NAMES in COCOeval.stats (AR = AR@100)
IOU_TYPES = ("bbox", "segm")


def evaluate(
    ground_truth: str | Path | dict, results: str | Path | list, categories: Sequence[int] | None = None
) -> dict:
    """pycocotools COCOeval, bbox and segm, up to 100 detections per image.

    Returns ``{"bbox": {...}, "segm": {...}, "categories": [...], "notes": [...]}``, each metrics
    dict holding AP, AP50, AP75, APs, APm, APl and AR (AR@100) as floats in [0, 1]; -1 marks a
    metric without ground truth (pycocotools' convention). ``categories`` restricts the evaluation
    to those category ids (nAP). Segm detections are scored without their bbox, so the area ranges
    use mask areas (as detectron2 and mmdetection do). No results at all gives zeros and a note.
    """
    gt_name = str(ground_truth) if not isinstance(ground_truth, dict) else "ground truth"
    truth = load_coco(ground_truth)
    res_name = str(results) if not isinstance(results, list) else "results"
    detections = read_json(results) if not isinstance(results, list) else results
    known = [category["id"] for category in truth["categories"]]
    chosen = known if categories is None else list(categories)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise CocoFormatError(f"{gt_name}: category id(s) {unknown} not in the ground truth")
    _check_results(detections, truth, res_name)
    report = {"categories": chosen, "notes": []}
    if not detections:
        report["notes"].append("no results: every metric is 0")
        report.update({t: dict.fromkeys(METRIC_NAMES, 0.0) for t in IOU_TYPES})
        return report

    truth_api = _coco_api(_with_areas(truth))
    with_masks = ["segmentation" in d for d in detections]
    for iou_type in IOU_TYPES:
        if iou_type == "segm":
            if not any(with_masks):
                report["notes"].append("segm skipped: the results have no segmentation")
                continue
            if not all(with_masks):
                raise CocoFormatError(f"{res_name}: some results have a segmentation and some do not")
            if any("segmentation" not in a for a in truth["annotations"] if a["category_id"] in chosen):
                report["notes"].append("segm skipped: some ground-truth annotations have no segmentation")
                continue
        report[iou_type] = _run_cocoeval(truth_api, _results_for(detections, iou_type), iou_type, chosen)
    return report


def _check_results(detections, truth: dict, name: str) -> None:
    if not isinstance(detections, list) or not all(isinstance(d, dict) for d in detections):
        raise CocoFormatError(f"{name}: results must be a list of objects")
    sizes = {image["id"]: [image["height"], image["width"]] for image in truth["images"]}
    category_ids = {category["id"] for category in truth["categories"]}
    for index, detection in enumerate(detections):
        where = f"{name}: result #{index}"
        missing = [k for k in ("image_id", "category_id", "score") if k not in detection]
        if missing or not ({"bbox", "segmentation"} & set(detection)):
            raise CocoFormatError(f"{where} lacks {', '.join(missing) or 'bbox and segmentation'}")
        if detection["image_id"] not in sizes:
            raise CocoFormatError(
                f"{where} is for image id {detection['image_id']!r}, which is not in the ground truth"
            )
        if detection["category_id"] not in category_ids:
            raise CocoFormatError(
                f"{where} has category id {detection['category_id']!r}, which is not in the ground truth"
            )
        if "bbox" in detection:
            check_box(detection["bbox"], where)
        segmentation = detection.get("segmentation")
        if segmentation is not None and (
            not isinstance(segmentation, dict) or list(segmentation.get("size", [])) != sizes[detection["image_id"]]
        ):
            raise CocoFormatError(
                f"{where}: segmentation must be an RLE dict of the image's size {sizes[detection['image_id']]}"
            )


def _with_areas(truth: dict) -> dict:
    """A copy of the ground truth where every annotation has ``area`` and ``iscrowd``."""
    heights = {image["id"]: (image["height"], image["width"]) for image in truth["images"]}
    annotations = []
    for annotation in truth["annotations"]:
        annotation = dict(annotation)
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation:
            mask = annotation_mask(annotation, *heights[annotation["image_id"]])
            annotation["area"] = (
                float(mask.sum()) if mask is not None else float(annotation["bbox"][2] * annotation["bbox"][3])
            )
        annotations.append(annotation)
    return {**truth, "annotations": annotations}


def _results_for(detections: list[dict], iou_type: str) -> list[dict]:
    """Fresh copies for ``loadRes`` (which writes into them): bbox results keep the box (taken from
    the mask when absent); segm results drop it so areas come from the masks."""
    chosen = []
    for detection in detections:
        entry = {k: detection[k] for k in ("image_id", "category_id", "score")}
        if iou_type == "bbox":
            box = detection.get("bbox")
            entry["bbox"] = (
                list(box) if box is not None else [float(v) for v in mask_utils.toBbox(detection["segmentation"])]
            )
        else:
            entry["segmentation"] = dict(detection["segmentation"])
        chosen.append(entry)
    return chosen


def _coco_api(data: dict) -> COCO:
    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _run_cocoeval(truth: COCO, detections: list[dict], iou_type: str, categories: list) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(truth, truth.loadRes(detections), iou_type)
        evaluator.params.catIds = list(categories)
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for name, i in zip(METRIC_NAMES, _STAT_INDEX)}
