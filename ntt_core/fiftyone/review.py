"""The review loop on a dataset: what a stored memory bank holds (with thumbnails and threshold
suggestions), the reference behind a prediction, and updating a bank from labels in the App.

Tag conventions (label tags, on instances of any Detections field):

- ``not_this_class`` (:data:`NEGATIVE_TAG`): the instance is *not* of the class in its ``label``
  (typically a false-positive prediction); :func:`add_to_memory_bank` with ``negative=True``
  stores it as a negative reference of that class, which damps look-alikes
  (s = s_pos * exp(-max(0, s_neg - s_pos) / 0.8)). A bank has none until the user adds some.
- ``remove_reference`` (:data:`REMOVE_TAG`): :func:`remove_from_memory_bank` drops the bank
  entries of the instances carrying it.

Accepted predictions become shots with their own provenance: the bank entry's reference id is
the prediction's label id and its image id the sample id, so "show matched reference" finds
them like any other reference. Ground truth is only read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import fiftyone as fo
import fiftyone.core.utils as fou
from bson import ObjectId

from ..images import ImageError, load_image
from ..settings import Settings
from .bank_runs import bank_reference_ids, list_memory_banks, load_memory_bank, memory_bank_info, save_memory_bank
from .fields import FiftyOneAdapterError, detections_fields
from .predictions import prediction_record
from .references import collect_references, reference_instance

# these import torch: loaded at first use, so that forms resolve in the App without it
bank_review = fou.lazy_import("ntt_core.bank_review")
memory_bank = fou.lazy_import("ntt_core.memory_bank")
models = fou.lazy_import("ntt_core.models")
reference_descriptors = fou.lazy_import("ntt_core.reference_descriptors")

NEGATIVE_TAG = "not_this_class"
REMOVE_TAG = "remove_reference"
#: Keys of a bank's run config that describe where its references came from; kept on updates.
SOURCE_KEYS = ("gt_field", "reference_mode", "tag", "max_per_class", "imported_from", "review")


@dataclass
class ReferenceLabel:
    """Where a bank entry's instance is in the dataset."""

    sample_id: str
    field: str
    label: fo.Detection
    filepath: str


def locate_references(dataset, bank) -> dict[str, ReferenceLabel]:
    """``{reference_id: ReferenceLabel}`` for the entries of ``bank`` whose instance is still a
    label of ``dataset`` (any Detections field of the sample the entry names)."""
    dataset = dataset._root_dataset
    wanted = set(bank.reference_ids)
    ids = [i for i in dict.fromkeys(bank.image_ids) if ObjectId.is_valid(i)]
    fields = detections_fields(dataset)
    found = {}
    for sample_id, filepath, *values in zip(*dataset.select(ids).values(["id", "filepath", *fields])):
        for field, detections in zip(fields, values):
            for label in detections.detections if detections else []:
                if label.id in wanted:
                    found[label.id] = ReferenceLabel(sample_id, field, label, filepath)
    return found


def bank_overview(dataset, key: str, per_class: int = 8, size: int = 96) -> dict:
    """What memory bank ``key`` holds, for display: its models and source, and per class the
    shots, negative references, leave-one-out threshold suggestion (see
    :func:`ntt_core.bank_review.suggest_thresholds`) and up to ``per_class`` thumbnails each of
    positive and negative references (``size`` px PNG data URIs, outline yellow / red)."""
    info = memory_bank_info(dataset, key)
    bank = load_memory_bank(dataset, key)
    suggestions = bank_review.suggest_thresholds(bank)
    located = locate_references(dataset, bank)
    context = bank.settings.get("context_ratio", 0.2)
    images: dict[str, object] = {}
    classes = []
    for index, name in enumerate(bank.classes):
        thumbnails, hidden = [], 0
        for negative in (False, True):
            rows = [
                row
                for row, (c, n) in enumerate(zip(bank.class_index.tolist(), bank.negative.tolist()))
                if c == index and n == negative
            ]
            hidden += max(0, len(rows) - per_class)
            colour = bank_review.NEGATIVE_OUTLINE if negative else bank_review.POSITIVE_OUTLINE
            for row in rows[:per_class]:
                entry = located.get(bank.reference_ids[row])
                src = entry and _thumbnail(entry, images, size, colour, context)
                if src:
                    thumbnails.append(
                        {
                            "reference_id": entry.label.id,
                            "sample_id": entry.sample_id,
                            "field": entry.field,
                            "negative": negative,
                            "src": src,
                        }
                    )
        classes.append({"name": name, **suggestions[name], "thumbnails": thumbnails, "more": hidden})
    return {
        "key": key,
        "encoder_id": bank.encoder_id,
        "encoder_input_size": bank.encoder_input_size,
        "segmenter_id": bank.segmenter_id,
        "gt_field": info.get("gt_field"),
        "reference_mode": info.get("reference_mode"),
        "tag": info.get("tag"),
        "imported_from": info.get("imported_from"),
        "timestamp": info["timestamp"],
        "sha256": info["sha256"],
        "num_references": len(bank.reference_ids),
        "source_fields": _count_fields(located.values()),
        "not_found": len(bank.reference_ids) - len(located),
        "classes": classes,
    }


def _count_fields(entries) -> dict[str, int]:
    """Entries per field their labels are in (ground truth, and predictions accepted into the bank)."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.field] = counts.get(entry.field, 0) + 1
    return dict(sorted(counts.items()))


def _thumbnail(entry: ReferenceLabel, images: dict, size: int, colour, context: float) -> str | None:
    """The thumbnail of one located reference; None when its image, box or mask is unusable."""
    if entry.filepath not in images:
        try:
            images[entry.filepath] = load_image(entry.filepath)
        except ImageError:
            images[entry.filepath] = None
    image = images[entry.filepath]
    instance, _ = (None, "") if image is None else reference_instance(entry.label, image.shape[:2])
    if instance is None:
        return None
    return bank_review.thumbnail(image, instance.box, instance.mask, size=size, colour=colour, context_ratio=context)


def matched_reference(dataset, pred_field: str, label_id: str) -> dict:
    """The reference that produced prediction ``label_id`` of ``pred_field``:
    ``{"bank_key", "reference_id", "sample_id", "field", "class_name", "negative"}``; ``field``
    is None when the reference's label no longer exists (its sample may still)."""
    dataset = dataset._root_dataset
    record = prediction_record(dataset, pred_field)
    if record is None:
        raise FiftyOneAdapterError(
            f"'{pred_field}' was not written by Segment by reference: its labels have no matched reference"
        )
    labels = dataset.select_labels(ids=[label_id], fields=pred_field).values(f"{pred_field}.detections", unwind=True)
    if not labels:
        raise FiftyOneAdapterError(f"no label '{label_id}' in '{pred_field}'")
    reference_id = labels[0].get_field("reference_id") if labels[0].has_field("reference_id") else None
    if not reference_id:
        raise FiftyOneAdapterError(f"prediction '{label_id}' carries no reference_id")
    key = record["bank_key"]
    if key not in list_memory_banks(dataset):
        raise FiftyOneAdapterError(f"memory bank '{key}', which produced '{pred_field}', no longer exists")
    bank = load_memory_bank(dataset, key)
    if reference_id not in bank.reference_ids:
        raise FiftyOneAdapterError(
            f"reference '{reference_id}' is no longer in memory bank '{key}' (it was removed or the bank rebuilt)"
        )
    row = bank.reference_ids.index(reference_id)
    entry = locate_references(dataset, bank).get(reference_id)
    return {
        "bank_key": key,
        "reference_id": reference_id,
        "sample_id": bank.image_ids[row],
        "field": entry.field if entry else None,
        "class_name": bank.classes[int(bank.class_index[row])],
        "negative": bool(bank.negative[row]),
    }


def tagged_labels(samples, tag: str) -> dict[str, list[str]]:
    """Ids of the labels tagged ``tag`` in each Detections field of ``samples`` (fields without any left out)."""
    found = {}
    for field in detections_fields(samples):
        ids = samples.select_labels(tags=tag, fields=field).values(f"{field}.detections.id", unwind=True)
        if ids:
            found[field] = [str(i) for i in ids]
    return found


def check_not_in_bank(dataset, key: str, labels: Mapping[str, Sequence[str]]) -> None:
    """Raise if any of ``labels`` (``{field: label ids}``) is already an entry of bank ``key``: adding
    it again would be skipped, and a shot tagged as a negative would contradict itself."""
    known = set(bank_reference_ids(dataset, key))
    present = [label_id for ids in labels.values() for label_id in ids if label_id in known]
    if present:
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise FiftyOneAdapterError(
            f"{len(present)} of these label(s) are already entries of memory bank '{key}' ({shown}): "
            "remove their tag, or remove them from the bank first (tag them remove_reference)"
        )


def load_bank_models(dataset, key: str, dinov2: str = "", sam2: str = "", device: str | None = None, dtype=None):
    """(encoder, segmenter or None) to describe new references of bank ``key``: the bank's own
    encoder (at its input size) unless ``dinov2`` names another source; SAM2 only when ``sam2``
    names one (it turns box-only labels into masks; without it they are skipped)."""
    info = memory_bank_info(dataset, key)
    encoder = models.load_encoder(
        dinov2 or info["encoder_id"], device=device, dtype=dtype, input_size=info["encoder_input_size"]
    )
    return encoder, models.load_segmenter(sam2, device=device, dtype=dtype) if sam2 else None


def add_to_memory_bank(
    dataset,
    key: str,
    labels: Mapping[str, Sequence[str]],
    encoder,
    segmenter=None,
    negative: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Describe the labels ``{field: label ids}`` with the bank's encoder and add them to bank
    ``key``: as shots of their class (a new class is appended), or with ``negative=True`` as
    negative references of their class. Instances already in the bank, unusable ones and
    negatives of a class the bank lacks are skipped with the reason; nothing added is an error.
    Returns ``{"bank_key", "added", "negative", "counts", "negative_counts", "skipped"}``."""
    dataset = dataset._root_dataset
    info = memory_bank_info(dataset, key)
    bank = load_memory_bank(dataset, key)
    bank.check_encoder(encoder)
    images, skipped = [], []
    for field, ids in labels.items():
        if not ids:
            continue
        selection = collect_references(dataset, field, mode="label_ids", label_ids=list(ids))
        for image in selection.images:
            for instance in image.instances:
                instance.negative = negative
        images += selection.images
        skipped += selection.skipped
    if not images and not skipped:
        raise FiftyOneAdapterError("no label given: select predictions (or tag labels) in the App first")
    described = reference_descriptors.describe_references(
        images,
        encoder,
        segmenter,
        _bank_settings(bank),
        progress=None if progress is None else (lambda done: progress(done, len(images))),
    )
    grown, rejected = memory_bank.add_references(bank, described)
    skipped += described.skipped + rejected
    added = len(grown.reference_ids) - len(bank.reference_ids)
    if not added:
        reasons = "; ".join(f"{s['reference_id']} ({s['class_name']}): {s['reason']}" for s in skipped)
        raise FiftyOneAdapterError(f"nothing added to memory bank '{key}': {reasons}")
    entry = {"action": "add", "negative": negative, "fields": sorted(labels), "count": added}
    _save(dataset, key, grown, info, entry)
    return {
        "bank_key": key,
        "added": added,
        "negative": negative,
        "counts": grown.counts(),
        "negative_counts": grown.counts(negative=True),
        "skipped": skipped,
    }


def remove_from_memory_bank(dataset, key: str, reference_ids: Sequence[str]) -> dict:
    """Remove the entries of bank ``key`` whose reference id is in ``reference_ids`` (e.g. the
    labels tagged :data:`REMOVE_TAG`). A class left without positive references is dropped with
    its negative ones. Returns ``{"bank_key", "removed", "dropped_classes", "counts",
    "negative_counts"}``."""
    dataset = dataset._root_dataset
    info = memory_bank_info(dataset, key)
    bank = load_memory_bank(dataset, key)
    known = set(bank.reference_ids)
    present = [rid for rid in reference_ids if rid in known]
    if not present:
        raise FiftyOneAdapterError(f"none of the {len(reference_ids)} label(s) is a reference of memory bank '{key}'")
    smaller, removed, dropped = memory_bank.remove_references(bank, present)
    _save(dataset, key, smaller, info, {"action": "remove", "count": len(removed), "dropped_classes": dropped})
    return {
        "bank_key": key,
        "removed": removed,
        "dropped_classes": dropped,
        "counts": smaller.counts(),
        "negative_counts": smaller.counts(negative=True),
    }


def _bank_settings(bank):
    return Settings.from_dict(bank.settings) if bank.settings else Settings()


def _save(dataset, key: str, bank, info: dict, entry: dict) -> None:
    """Store the updated bank under its key, keeping where its references came from and logging ``entry``."""
    source = {name: info[name] for name in SOURCE_KEYS if name in info}
    source["review"] = list(info.get("review") or []) + [entry]
    save_memory_bank(dataset, key, bank, source=source, overwrite=True)
