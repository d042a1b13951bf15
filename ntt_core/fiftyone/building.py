"""Building a memory bank from a dataset's references and storing it as a run."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..memory_bank import build_memory_bank
from ..references import InvalidReferenceError
from ..settings import Settings
from .bank_runs import check_bank_key, save_memory_bank
from .fields import Progress
from .references import DEFAULT_REFERENCE_TAG, chosen_classes, collect_references


def build_dataset_memory_bank(
    samples,
    key: str,
    gt_field: str,
    segmenter,
    encoder,
    mode: str = "label_tag",
    tag: str = DEFAULT_REFERENCE_TAG,
    label_ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
    settings: Settings | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    load_segmenter: Callable[[], object] | None = None,
    segmenter_id: str = "",
) -> dict:
    """Collect references, describe them, store the bank as run ``key``; returns a report
    ``{"key", "classes", "counts", "skipped"}``. Without ``segmenter``, ``load_segmenter`` (if
    given) loads SAM2 when some reference has no mask and needs a box prompt, and only then;
    ``segmenter_id`` names the SAM2 chosen for the bank when none had to be loaded (the panel's
    forms start with it)."""
    dataset = samples._root_dataset
    check_bank_key(dataset, key, overwrite)
    selection = collect_references(samples, gt_field, mode, tag, label_ids, classes, max_per_class)
    boxes_only = any(instance.mask is None for image in selection.images for instance in image.instances)
    if segmenter is None and load_segmenter is not None and boxes_only:
        segmenter = load_segmenter()
    total = len(selection.images)
    try:
        bank = build_memory_bank(
            selection.images,
            encoder,
            segmenter,
            settings=settings,
            classes=chosen_classes(classes),
            progress=None if progress is None else (lambda done: progress(done, total)),
        )
    except InvalidReferenceError as error:  # say why the labels left out here could not be used either
        if not selection.skipped:
            raise
        reasons = "; ".join(f"{s['reference_id']} ({s['class_name']}): {s['reason']}" for s in selection.skipped)
        raise InvalidReferenceError(f"{error}. Unusable in '{gt_field}': {reasons}") from None
    bank.skipped = selection.skipped + bank.skipped
    bank.segmenter_id = bank.segmenter_id or segmenter_id
    source = {
        "gt_field": gt_field,
        "reference_mode": mode,
        "tag": tag if mode != "label_ids" else None,
        "max_per_class": max_per_class,
    }
    save_memory_bank(dataset, key, bank, source=source, overwrite=overwrite)
    return {"key": key, "classes": list(bank.classes), "counts": bank.counts(), "skipped": list(bank.skipped)}
