"""References out of a dataset's ground truth: the view that holds them, their counts, and
``fo.Detection`` -> :class:`~ntt_core.references.ReferenceInstance`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import fiftyone.core.utils as fou
from fiftyone import ViewField as F

from ..images import ImageError, load_image
from ..input_rules import CROWD_REASON, check_count, is_crowd
from ..references import ReferenceImage, ReferenceInstance
from .fields import FiftyOneAdapterError, check_detections_field, image_collection

# imports torch: loaded at first use, so that forms resolve in the App without it
geometry = fou.lazy_import("ntt_core.geometry")

REFERENCE_MODES = ("label_tag", "sample_tag", "label_ids")
DEFAULT_REFERENCE_TAG = "reference"


@dataclass
class ReferenceSelection:
    """References found in a dataset: images for :func:`ntt_core.memory_bank.build_memory_bank`,
    label ids that could not be used (with the reason) and references per class."""

    images: list = field(default_factory=list)  # [ReferenceImage]
    skipped: list[dict] = field(default_factory=list)  # {"reference_id", "class_name", "reason"}
    counts: dict[str, int] = field(default_factory=dict)


class ClassesNotFoundError(FiftyOneAdapterError):
    """Classes were asked for that have no reference."""


def chosen_classes(classes) -> list[str] | None:
    """The class names asked for, empty entries (a blank row of the App's list) left out; None for all."""
    names = [name.strip() for name in classes or [] if name and name.strip()]
    return names or None


def reference_view(
    samples, gt_field: str, mode: str = "label_tag", tag: str = DEFAULT_REFERENCE_TAG, label_ids=None, classes=None
):
    """The samples holding references, with only the reference labels left in ``gt_field``.

    ``mode``: ``label_tag`` (labels tagged ``tag``), ``sample_tag`` (every label of the chosen
    classes in samples tagged ``tag``) or ``label_ids`` (explicit label ids, e.g. the App's
    selection). ``classes`` keeps those classes only. Only image collections (patches: their
    images) can hold references.
    """
    samples, _ = image_collection(samples)
    check_detections_field(samples, gt_field, "ground-truth field")
    if mode == "label_tag":
        view = samples.select_labels(tags=tag, fields=gt_field, omit_empty=True)
    elif mode == "sample_tag":
        view = samples.match_tags(tag).filter_labels(gt_field, F("label").exists(), only_matches=True)
    elif mode == "label_ids":
        if not label_ids:
            raise FiftyOneAdapterError("no labels selected: select reference instances in the App first")
        view = samples.select_labels(ids=list(label_ids), fields=gt_field, omit_empty=True)
    else:
        raise FiftyOneAdapterError(f"reference mode {mode!r} is unknown; use one of {', '.join(REFERENCE_MODES)}")
    classes = chosen_classes(classes)
    if classes:
        view = view.filter_labels(gt_field, F("label").is_in(classes), only_matches=True)
    return view


def count_references(
    samples, gt_field: str, mode: str = "label_tag", tag: str = DEFAULT_REFERENCE_TAG, label_ids=None, classes=None
) -> dict[str, int]:
    """References per class that :func:`collect_references` would consider (before any cap);
    raises when there is none, or none for a requested class."""
    view = reference_view(samples, gt_field, mode=mode, tag=tag, label_ids=label_ids, classes=classes)
    counts = view.count_values(f"{gt_field}.detections.label")
    check_reference_counts(counts, gt_field, mode, tag, classes)
    return counts


def collect_references(
    samples,
    gt_field: str,
    mode: str = "label_tag",
    tag: str = DEFAULT_REFERENCE_TAG,
    label_ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
) -> ReferenceSelection:
    """Reference instances of ``samples`` (see :func:`reference_view`) as reference images.

    Masks (``Detection.mask`` or ``mask_path``, cropped to the box) are placed in the full image;
    labels without a mask become box references. ``reference_id`` is the label id and
    ``image_id`` the sample id. ``max_per_class`` keeps the first that many per class in
    dataset order. Unusable labels (crowd ones among them) are skipped with the reason; no reference at all, or a
    requested class without any, is an error.
    """
    if max_per_class is not None:
        check_count(max_per_class, "max_per_class")
    view = reference_view(samples, gt_field, mode=mode, tag=tag, label_ids=label_ids, classes=classes)
    selection = ReferenceSelection()
    for sample_id, filepath, labels in zip(*view.values(["id", "filepath", gt_field])):
        chosen = []
        for label in labels.detections:
            if is_crowd(label):  # never a reference, on every path
                selection.skipped.append(_skip(label, CROWD_REASON))
                continue
            if max_per_class is not None and selection.counts.get(label.label, 0) >= max_per_class:
                continue
            chosen.append(label)
            selection.counts[label.label] = selection.counts.get(label.label, 0) + 1
        if not chosen:
            continue
        try:
            image = load_image(filepath)
        except ImageError as error:
            selection.skipped += [_skip(label, str(error)) for label in chosen]
            continue
        instances = []
        for label in chosen:
            instance, reason = reference_instance(label, image.shape[:2])
            if instance is None:
                selection.skipped.append(_skip(label, reason))
            else:
                instances.append(instance)
        if instances:
            selection.images.append(ReferenceImage(image=image, instances=instances, image_id=sample_id))
    if not selection.counts and selection.skipped:
        reasons = "; ".join(f"{s['reference_id']} ({s['class_name']}): {s['reason']}" for s in selection.skipped)
        raise FiftyOneAdapterError(f"no usable reference in '{gt_field}': {reasons}")
    check_reference_counts(selection.counts, gt_field, mode, tag, classes)
    return selection


def check_reference_counts(counts: dict[str, int], gt_field: str, mode: str, tag: str, classes) -> None:
    """Raise when ``counts`` (references per class) is empty or lacks a requested class
    (:class:`ClassesNotFoundError`)."""
    classes = chosen_classes(classes)
    if not counts:
        where = {
            "label_tag": f"no label of '{gt_field}' is tagged '{tag}'",
            "sample_tag": f"no sample tagged '{tag}' has labels in '{gt_field}'",
            "label_ids": f"none of the selected labels is in '{gt_field}'",
        }[mode]
        of = f" among classes {', '.join(map(repr, classes))}" if classes else ""
        kind = ClassesNotFoundError if classes else FiftyOneAdapterError  # with classes chosen, they are the cause
        raise kind(f"no reference found: {where}{of}")
    missing = [name for name in classes or [] if name not in counts]
    if missing:
        raise ClassesNotFoundError(f"no reference for class(es) {', '.join(map(repr, missing))} in '{gt_field}'")


def _skip(label, reason: str) -> dict:
    return {"reference_id": label.id, "class_name": label.label, "reason": reason}


def reference_instance(label, image_size: tuple[int, int]):
    """A ``ReferenceInstance`` from a ``fo.Detection``, or None and the reason it is unusable."""
    box = geometry.pixel_box(label.bounding_box, image_size)
    if box is None:
        return None, f"bounding box {label.bounding_box!r} is missing, empty or outside the image"
    try:
        crop = label.get_mask()
    except Exception as error:  # a mask_path that cannot be read
        return None, f"instance mask unreadable ({error})"
    mask = None if crop is None else geometry.place_mask(crop, box, image_size)
    # The crop follows the annotation's own box, in pixels (as the authors crop around the COCO
    # bbox), rounded to 1e-6 px so that a box imported from pixels comes back exactly.
    height, width = image_size
    x, y, w, h = (float(v) for v in label.bounding_box)
    corners = tuple(round(v, 6) for v in (x * width, y * height, (x + w) * width, (y + h) * height))
    return ReferenceInstance(class_name=label.label, mask=mask, box=corners, reference_id=label.id), ""
