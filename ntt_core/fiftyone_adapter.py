"""The FiftyOne side of the method (with :mod:`ntt_core.fiftyone_review` for the review loop,
:mod:`ntt_core.shards` for sharded runs, and the demo, the only modules of ``ntt_core`` that import
``fiftyone``).

References come out of a dataset's ground truth, memory banks live in the dataset as runs,
predictions go back in as ``fo.Detections`` (one atomic write per sample), and evaluation runs
FiftyOne's COCO evaluator plus pycocotools on the same predictions. Modules that import torch
are imported inside the functions that need them, so that forms and listings stay light.

Ground truth is only ever read here. Runs are generic FiftyOne runs told apart by ``method``:
``ntt_memory_bank`` (the bank's JSON payload as the run result, its checksum in the config) and
``ntt_predictions`` (the record of how a prediction field was made, keyed ``ntt_predictions_<field>``).
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fiftyone as fo
import fiftyone.core.fields as fof
import fiftyone.core.media as fom
import fiftyone.core.models as fomo
import numpy as np
from fiftyone import ViewField as F
from PIL import Image

from .images import ImageError, load_image
from .input_rules import CROWD_REASON, check_count, is_crowd
from .instances import Instances
from .settings import MEMORY_ONLY, Settings

BANK_METHOD = "ntt_memory_bank"
PREDICTION_METHOD = "ntt_predictions"
PREDICTION_RUN_PREFIX = "ntt_predictions_"
REFERENCE_MODES = ("label_tag", "sample_tag", "label_ids")
DEFAULT_REFERENCE_TAG = "reference"
#: Keys of a prediction record that must agree before ``skip_existing`` may resume a field.
RECORD_MATCH_KEYS = ("bank_key", "bank_sha256", "segmenter_fingerprint", "encoder_fingerprint", "dtype", "settings")
#: pycocotools figures stored on an evaluation as custom metrics (key -> (iou type, metric)).
PYCOCOTOOLS_METRICS = {"pycocotools_segm_AP": ("segm", "AP"), "pycocotools_bbox_AP": ("bbox", "AP")}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

Progress = Callable[[int, int], None]  # (done, total)


class FiftyOneAdapterError(ValueError):
    """A dataset, field, run or parameter that cannot be used; the message names it and says why."""


# --- collections and fields ---


def image_collection(samples) -> tuple[fo.core.collections.SampleCollection, str]:
    """The image samples behind ``samples`` and a note on how they were chosen.

    A patches view is mapped to the images its patches come from; video, frames, clips and
    grouped collections are refused.
    """
    if samples.media_type == fom.GROUP:
        raise FiftyOneAdapterError(
            f"'{samples._root_dataset.name}' is a grouped dataset: select one image slice first "
            "(e.g. view.select_group_slices('left'))"
        )
    note = ""
    if samples._is_patches:
        ids = samples.distinct("sample_id")
        note = f"patch view mapped to its {len(ids)} source image(s)"
        samples = samples._root_dataset.select(ids)
    if samples._is_frames or samples._is_clips or samples.media_type != fom.IMAGE:
        raise FiftyOneAdapterError(
            f"only image samples can be processed; this collection holds media of type '{samples.media_type}'"
        )
    return samples, note


def check_detections_field(samples, name: str, role: str = "field") -> None:
    """Raise unless ``name`` is a ``Detections`` field of ``samples``."""
    if not name:
        raise FiftyOneAdapterError(f"no {role} given")
    schema = samples.get_field_schema()
    if name not in schema:
        detections = detections_fields(samples)
        hint = (
            f"; Detections fields: {', '.join(detections)}" if detections else "; the dataset has no Detections field"
        )
        raise FiftyOneAdapterError(f"{role} '{name}' does not exist{hint}")
    if not _is_detections(schema[name]):
        kind = getattr(schema[name], "document_type", None) or type(schema[name])
        raise FiftyOneAdapterError(f"{role} '{name}' holds {kind.__name__}, not Detections (boxes/instance masks)")


def detections_fields(samples) -> list[str]:
    """Names of the ``Detections`` fields of ``samples``."""
    return sorted(name for name, kind in samples.get_field_schema().items() if _is_detections(kind))


def _is_detections(kind) -> bool:
    return isinstance(kind, fof.EmbeddedDocumentField) and issubclass(kind.document_type, fo.Detections)


def protected_fields(dataset) -> set[str]:
    """Ground-truth fields: the source of every memory bank and of every evaluation."""
    fields = {dataset.get_run_info(key).config.gt_field for key in list_memory_banks(dataset)}
    for key in dataset.list_evaluations():
        gt_field = getattr(dataset.get_evaluation_info(key).config, "gt_field", None)
        if gt_field:
            fields.add(gt_field)
    return fields - {None}


def check_new_field_name(dataset, name: str) -> None:
    """Raise unless ``name`` can be a new top-level label field (whatever exists under it now)."""
    if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name):
        raise FiftyOneAdapterError(
            f"output field name {name!r} is invalid: use letters, digits and underscores, starting with a letter"
        )
    if name in set(dataset._get_default_sample_fields(include_private=True)) or name in ("frames", "groups"):
        raise FiftyOneAdapterError(f"output field name '{name}' is reserved by FiftyOne")
    if name in protected_fields(dataset):
        raise FiftyOneAdapterError(
            f"'{name}' is a ground-truth field (a memory bank or an evaluation reads it): it is never written"
        )


def check_output_field(dataset, name: str, overwrite: bool = False, skip_existing: bool = False) -> bool:
    """Raise unless predictions may go to ``name``; returns whether it already exists."""
    check_new_field_name(dataset, name)
    schema = dataset.get_field_schema()
    if name not in schema:
        return False
    if not _is_detections(schema[name]):
        kind = getattr(schema[name], "document_type", None) or type(schema[name])
        raise FiftyOneAdapterError(
            f"field '{name}' exists and holds {kind.__name__}, not Detections: choose another name or delete it"
        )
    if not (overwrite or skip_existing):
        raise FiftyOneAdapterError(
            f"field '{name}' already exists: choose another name, allow overwriting it, or skip the samples it already has"
        )
    return True


def check_key(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise FiftyOneAdapterError(
            f"{what} {name!r} is invalid: use letters, digits and underscores, not starting with a digit"
        )


# --- references ---


@dataclass
class ReferenceSelection:
    """References found in a dataset: images for :func:`ntt_core.memory_bank.build_memory_bank`,
    label ids that could not be used (with the reason) and references per class."""

    images: list = field(default_factory=list)  # [ReferenceImage]
    skipped: list[dict] = field(default_factory=list)  # {"reference_id", "class_name", "reason"}
    counts: dict[str, int] = field(default_factory=dict)


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
    if classes:
        view = view.filter_labels(gt_field, F("label").is_in(list(classes)), only_matches=True)
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
    from .memory_bank import ReferenceImage

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
    """Raise when ``counts`` (references per class) is empty or lacks a requested class."""
    if not counts:
        where = {
            "label_tag": f"no label of '{gt_field}' is tagged '{tag}'",
            "sample_tag": f"no sample tagged '{tag}' has labels in '{gt_field}'",
            "label_ids": f"none of the selected labels is in '{gt_field}'",
        }[mode]
        of = f" among classes {', '.join(map(repr, classes))}" if classes else ""
        raise FiftyOneAdapterError(f"no reference found: {where}{of}")
    missing = [name for name in classes or [] if name not in counts]
    if missing:
        raise FiftyOneAdapterError(f"no reference for class(es) {', '.join(map(repr, missing))} in '{gt_field}'")


def _skip(label, reason: str) -> dict:
    return {"reference_id": label.id, "class_name": label.label, "reason": reason}


def reference_instance(label, image_size: tuple[int, int]):
    """A ``ReferenceInstance`` from a ``fo.Detection``, or None and the reason it is unusable."""
    from .memory_bank import ReferenceInstance

    box = pixel_box(label.bounding_box, image_size)
    if box is None:
        return None, f"bounding box {label.bounding_box!r} is missing, empty or outside the image"
    try:
        crop = label.get_mask()
    except Exception as error:  # a mask_path that cannot be read
        return None, f"instance mask unreadable ({error})"
    mask = None if crop is None else place_mask(crop, box, image_size)
    # The crop follows the annotation's own box, in pixels (as the authors crop around the COCO
    # bbox), rounded to 1e-6 px so that a box imported from pixels comes back exactly.
    height, width = image_size
    x, y, w, h = (float(v) for v in label.bounding_box)
    corners = tuple(round(v, 6) for v in (x * width, y * height, (x + w) * width, (y + h) * height))
    return ReferenceInstance(class_name=label.label, mask=mask, box=corners, reference_id=label.id), ""


def pixel_box(bounding_box, image_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Relative ``[x, y, w, h]`` -> integer end-exclusive (x0, y0, x1, y1) clipped to the image,
    or None when missing, malformed, empty or outside."""
    height, width = image_size
    try:
        x, y, w, h = (float(v) for v in bounding_box)
    except (TypeError, ValueError):
        return None
    if not np.isfinite([x, y, w, h]).all():
        return None
    x0, y0 = max(round(x * width), 0), max(round(y * height), 0)
    x1, y1 = min(round((x + w) * width), width), min(round((y + h) * height), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def fit_mask(crop: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """An instance mask stored for ``box`` (any size: resized nearest to the box) -> ``[y1 - y0, x1 - x0]`` bool."""
    x0, y0, x1, y1 = box
    crop = np.asarray(crop)
    if crop.ndim == 3:
        crop = crop[..., 0]
    if crop.shape != (y1 - y0, x1 - x0):
        crop = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((x1 - x0, y1 - y0), Image.NEAREST))
    return crop > 0


def place_mask(crop: np.ndarray, box: tuple[int, int, int, int], image_size: tuple[int, int]) -> np.ndarray:
    """An instance mask cropped to ``box`` (see :func:`fit_mask`) -> ``[H, W]`` bool."""
    x0, y0, x1, y1 = box
    full = np.zeros(image_size, dtype=bool)
    full[y0:y1, x0:x1] = fit_mask(crop, box)
    return full


# --- memory banks as runs ---


def list_memory_banks(dataset) -> list[str]:
    """Keys of the memory banks stored on ``dataset``."""
    return dataset._root_dataset.list_runs(method=BANK_METHOD)


def memory_bank_info(dataset, key: str) -> dict:
    """What a stored bank holds (classes, counts, models, source) and when it was built."""
    _check_bank_exists(dataset, key)
    info = dataset._root_dataset.get_run_info(key)
    return {**info.config.serialize(), "key": key, "timestamp": str(info.timestamp)}


def _check_bank_exists(dataset, key: str) -> None:
    banks = list_memory_banks(dataset)
    if key not in banks:
        available = f"available: {', '.join(banks)}" if banks else "the dataset has no memory bank; build one first"
        raise FiftyOneAdapterError(f"no memory bank '{key}' on dataset '{dataset._root_dataset.name}' ({available})")


def check_bank_key(dataset, key: str, overwrite: bool = False) -> None:
    """Raise unless a memory bank may be stored under ``key``."""
    dataset = dataset._root_dataset
    check_key(key, "memory bank name")
    if dataset.has_run(key):
        if key not in list_memory_banks(dataset):
            raise FiftyOneAdapterError(f"run key '{key}' is taken by a run that is not a memory bank")
        if not overwrite:
            raise FiftyOneAdapterError(
                f"memory bank '{key}' already exists: choose another name or allow overwriting it"
            )


def save_memory_bank(dataset, key: str, bank, source: dict | None = None, overwrite: bool = False) -> None:
    """Store ``bank`` on the dataset as a run: JSON payload as the result, checksum in the config."""
    dataset = dataset._root_dataset
    check_bank_key(dataset, key, overwrite)
    payload = bank.to_payload()
    manifest = payload["manifest"]
    described = dict(
        classes=list(bank.classes),
        counts=bank.counts(),
        num_references=len(bank.reference_ids),
        reference_sample_ids=sorted(set(bank.image_ids)),
        encoder_id=bank.encoder_id,
        encoder_fingerprint=bank.encoder_fingerprint,
        encoder_input_size=bank.encoder_input_size,
        segmenter_id=bank.segmenter_id,
        sha256=manifest["sha256"],
        schema_version=manifest["schema_version"],
        num_skipped=len(bank.skipped),
        gt_field=None,
    )
    config = dataset.init_run(method=BANK_METHOD, **{**described, **(source or {})})
    dataset.register_run(key, config, overwrite=True)
    dataset.save_run_results(key, dataset.init_run_results(key, bank=payload), overwrite=True, cache=False)


def load_memory_bank(dataset, key: str):
    """The :class:`~ntt_core.memory_bank.MemoryBank` stored under ``key``, validated (schema,
    shapes, dtypes, checksum against the run config)."""
    from .memory_bank import MemoryBank, MemoryBankError

    _check_bank_exists(dataset, key)
    dataset = dataset._root_dataset
    results = dataset.load_run_results(key, cache=False, load_view=False)
    payload = getattr(results, "bank", None)
    if not isinstance(payload, dict):
        raise MemoryBankError(f"memory bank '{key}': the stored run has no bank payload")
    expected = dataset.get_run_info(key).config.sha256
    if payload.get("manifest", {}).get("sha256") != expected:
        raise MemoryBankError(f"memory bank '{key}': the stored payload does not match the checksum in its run config")
    return MemoryBank.from_payload(payload)


def delete_memory_bank(dataset, key: str) -> None:
    _check_bank_exists(dataset, key)
    dataset._root_dataset.delete_run(key)


def export_memory_bank(dataset, key: str, directory: str | Path) -> Path:
    """Write the stored bank as ``manifest.json`` + ``features.safetensors`` under ``directory``."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FiftyOneAdapterError(f"{directory}: export folder is not empty")
    return load_memory_bank(dataset, key).save(directory)


def import_memory_bank(dataset, key: str, directory: str | Path, overwrite: bool = False):
    """Read a bank folder written by :func:`export_memory_bank` (or the CLI) into the dataset."""
    from .memory_bank import MemoryBank

    check_bank_key(dataset, key, overwrite)
    bank = MemoryBank.load(directory)
    save_memory_bank(dataset, key, bank, source={"imported_from": str(directory)}, overwrite=overwrite)
    return bank


# --- models ---


def load_models(
    sam2: str | None = None,
    dinov2: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    encoder_size: int | None = None,
):
    """(segmenter, encoder); None means the paper's models. The models module caches them per
    (source, device, dtype), so repeated runs do not rebuild them."""
    from .models import load_encoder, load_segmenter

    return load_segmenter(sam2, device, dtype), load_encoder(dinov2, device, dtype, encoder_size)


def load_segmenter_only(sam2: str | None = None, device: str | None = "auto", dtype: str | None = "auto"):
    """SAM2 alone (for boxes to masks); None means the paper's model."""
    from .models import load_segmenter

    return load_segmenter(sam2, device, dtype)


def segmenter_source(sam2: str | None = None) -> str:
    """The id a SAM2 loaded from ``sam2`` has (short names resolved; None: the paper's), without loading it."""
    from .models import SAM2, resolve_model

    return resolve_model(SAM2, sam2).model_id


def load_encoder_only(
    dinov2: str | None = None, device: str | None = "auto", dtype: str | None = "auto", encoder_size: int | None = None
):
    """DINOv2 alone (a bank whose references all have masks needs no SAM2); None means the paper's model."""
    from .models import load_encoder

    return load_encoder(dinov2, device, dtype, encoder_size)


# --- building a bank from a dataset ---


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
    from .memory_bank import ReferenceError, build_memory_bank

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
            classes=list(classes) if classes else None,
            progress=None if progress is None else (lambda done: progress(done, total)),
        )
    except ReferenceError as error:  # say why the labels left out here could not be used either
        if not selection.skipped:
            raise
        reasons = "; ".join(f"{s['reference_id']} ({s['class_name']}): {s['reason']}" for s in selection.skipped)
        raise ReferenceError(f"{error}. Unusable in '{gt_field}': {reasons}") from None
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


# --- predictions into the dataset ---


def prediction_run_key(field_name: str) -> str:
    return PREDICTION_RUN_PREFIX + field_name


def prediction_record(dataset, field_name: str) -> dict | None:
    """How ``field_name`` was predicted (bank, models, settings), or None if not by this tool."""
    dataset = dataset._root_dataset
    key = prediction_run_key(field_name)
    if key not in dataset.list_runs(method=PREDICTION_METHOD):
        return None
    return dataset.get_run_info(key).config.serialize()


def make_prediction_record(dataset, field_name: str, bank_key: str, segmenter, encoder, settings: Settings) -> dict:
    """The record of a prediction run, from the stored bank's config and the models in use."""
    bank = memory_bank_info(dataset, bank_key)
    return {
        "pred_field": field_name,
        "bank_key": bank_key,
        "bank_sha256": bank["sha256"],
        "classes": list(bank["classes"]),
        "gt_field": bank.get("gt_field"),
        "reference_sample_ids": list(bank.get("reference_sample_ids", [])),
        "segmenter_id": segmenter.model_id,
        "segmenter_fingerprint": segmenter.fingerprint,
        "encoder_id": encoder.model_id,
        "encoder_fingerprint": encoder.fingerprint,
        "dtype": [str(getattr(model, "dtype", None)) for model in (segmenter, encoder)],  # bfloat16 is not float32
        "settings": settings.to_dict(),
    }


def check_prediction_field(dataset, name: str, overwrite: bool = False, skip_existing: bool = False) -> bool:
    """:func:`check_output_field` for predictions: an existing field is overwritten only if this tool
    wrote it (it has a run record); any other may be ground truth that no bank or evaluation names yet."""
    exists = check_output_field(dataset, name, overwrite=overwrite, skip_existing=skip_existing)
    if exists and overwrite and prediction_record(dataset, name) is None:
        raise FiftyOneAdapterError(
            f"field '{name}' was not written by segment-by-reference (no run record): it may be ground truth, "
            "so it is never overwritten; choose another field"
        )
    return exists


def prepare_prediction_field(dataset, record: dict, overwrite: bool = False, skip_existing: bool = False) -> None:
    """Create the prediction field and its run record, or check an existing one.

    ``overwrite`` clears every value of the field and replaces the record; ``skip_existing``
    keeps the field only if its record matches ``record`` on :data:`RECORD_MATCH_KEYS`.
    """
    dataset = dataset._root_dataset
    name = record["pred_field"]
    exists = check_prediction_field(dataset, name, overwrite=overwrite, skip_existing=skip_existing)
    if name == record.get("gt_field"):
        raise FiftyOneAdapterError(f"'{name}' is the memory bank's ground-truth field: it is never written")
    key = prediction_run_key(name)
    if exists and not overwrite:
        existing = prediction_record(dataset, name)
        if existing is None:
            raise FiftyOneAdapterError(
                f"field '{name}' was not written by segment-by-reference (no run record): cannot resume it; choose another field"
            )
        differ = [k for k in RECORD_MATCH_KEYS if _resume_part(existing, k) != _resume_part(record, k)]
        if differ:
            raise FiftyOneAdapterError(
                f"field '{name}' was written with a different {', '.join(differ)}: resuming would mix results; "
                "use the same bank, models and settings, overwrite the field, or choose another field"
            )
        return
    if exists:
        for eval_key in dataset.list_evaluations(pred_field=name):
            dataset.delete_evaluation(eval_key)  # its results describe the predictions being replaced
        dataset.clear_sample_field(name)
    else:
        dataset.add_sample_field(name, fof.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    if dataset.has_run(key) and key not in dataset.list_runs(method=PREDICTION_METHOD):
        raise FiftyOneAdapterError(f"run key '{key}' is taken by another run")
    dataset.register_run(key, dataset.init_run(method=PREDICTION_METHOD, **record), overwrite=True)


def _resume_part(record: dict, key: str):
    """What of ``record[key]`` must agree to resume a field: settings that change only memory and speed
    (a smaller prompt batch after running out of memory) may differ."""
    value = record.get(key)
    if key == "settings" and isinstance(value, dict):
        return {name: setting for name, setting in value.items() if name not in MEMORY_ONLY}
    return value


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


def segment_by_reference(
    samples,
    bank_key: str,
    pred_field: str,
    segmenter,
    encoder,
    settings: Settings | None = None,
    batch_size: int = 1,
    overwrite: bool = False,
    skip_existing: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Predict every instance of the bank's classes in ``samples`` into ``pred_field``.

    Each batch is written as soon as it is done, one atomic update per sample, so a run that
    dies keeps its finished samples; re-running with ``skip_existing=True`` finishes the rest
    (only samples whose field is still empty are processed). Unreadable images stay empty and
    are reported. ``should_stop`` is asked before each batch is written (one call a batch); when it
    says so the run stops with an error, writing nothing more (a delegated shard whose operation
    was marked failed). Returns ``{"field",
    "processed", "instances", "skipped_existing", "failed", "note"}``.
    """
    from .predictor import Predictor

    check_count(batch_size, "batch_size")
    settings = settings or Settings()
    samples, note = image_collection(samples)
    dataset = samples._root_dataset
    if len(samples) == 0:
        raise FiftyOneAdapterError("the target view is empty: nothing to segment")
    check_prediction_field(dataset, pred_field, overwrite=overwrite, skip_existing=skip_existing)
    bank = load_memory_bank(dataset, bank_key)
    predictor = Predictor(segmenter, encoder, bank, settings=settings)
    record = make_prediction_record(dataset, pred_field, bank_key, segmenter, encoder, settings)
    prepare_prediction_field(dataset, record, overwrite=overwrite, skip_existing=skip_existing)

    todo = samples.exists(pred_field, False)
    ids, paths = todo.values(["id", "filepath"])
    report = {
        "field": pred_field,
        "processed": 0,
        "instances": 0,
        "skipped_existing": len(samples) - len(ids),
        "failed": [],
        "note": note,
    }
    for start in range(0, len(ids), batch_size):
        batch_ids, batch_paths = ids[start : start + batch_size], paths[start : start + batch_size]
        try:
            results = predictor.predict_paths(batch_paths)
        except Exception as error:
            raise FiftyOneAdapterError(
                f"segmentation stopped after {start} of {len(ids)} samples: {str(error) or type(error).__name__}. "
                f"The finished samples are saved "
                f"in '{pred_field}'; run again with skip_existing to finish the rest"
            ) from error
        if should_stop is not None and should_stop():  # asked just before writing: a failed shard writes nothing more
            raise FiftyOneAdapterError(
                f"stopped after {start} of {len(ids)} samples: this run's operation is no longer running "
                f"(marked failed or taken over); the finished samples are saved in '{pred_field}'"
            )
        values = {}
        for sample_id, result in zip(batch_ids, results):
            if isinstance(result, Exception):
                report["failed"].append({"sample_id": sample_id, "reason": str(result)})
            else:
                values[sample_id] = instances_to_detections(result)
                report["instances"] += len(values[sample_id].detections)
        if values:
            dataset.set_values(pred_field, values, key_field="id")
        report["processed"] += len(values)
        if progress is not None:
            progress(start + len(batch_ids), len(ids))
    return report


def start_sharded_prediction(
    samples,
    bank_key: str,
    pred_field: str,
    segmenter,
    encoder,
    num_shards: int,
    settings: Settings | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    assigned: Collection[str] = (),
) -> list[list[str]]:
    """Everything a sharded run does before its shards are queued: check the bank against the
    models, create the field and its run record, and fix each shard's sample ids (the samples
    still lacking predictions and not ``assigned`` to shards already queued, split into contiguous
    parts). Each shard then runs :func:`segment_by_reference` on its ids with ``skip_existing=True``.

    The record says planning is under way until :func:`finish_planning`; planning again before
    that (its operation died) continues it as if ``skip_existing`` were given."""
    settings = settings or Settings()
    samples, _ = image_collection(samples)
    dataset = samples._root_dataset
    if len(samples) == 0:
        raise FiftyOneAdapterError("the target view is empty: nothing to segment")
    check_count(num_shards, "num_shards")
    skip_existing = skip_existing or (planning_unfinished(dataset, pred_field) and not overwrite)
    check_prediction_field(dataset, pred_field, overwrite=overwrite, skip_existing=skip_existing)
    load_memory_bank(dataset, bank_key).check_encoder(encoder)
    record = make_prediction_record(dataset, pred_field, bank_key, segmenter, encoder, settings)
    prepare_prediction_field(dataset, {**record, "planning": True}, overwrite=overwrite, skip_existing=skip_existing)
    return plan_shards(samples.exclude(list(assigned)), pred_field, num_shards)


def planning_unfinished(dataset, pred_field: str) -> bool:
    """Whether a sharded run into ``pred_field`` created the field but did not queue all its shards."""
    return (prediction_record(dataset, pred_field) or {}).get("planning") is True


def finish_planning(dataset, pred_field: str) -> None:
    """Mark the sharded run into ``pred_field`` as planned (all its shards are queued)."""
    dataset = dataset._root_dataset
    record = prediction_record(dataset, pred_field)
    if record is not None and record.get("planning"):
        fields = {name: value for name, value in record.items() if name not in ("cls", "type", "method")}
        config = dataset.init_run(method=PREDICTION_METHOD, **{**fields, "planning": False})
        dataset.register_run(prediction_run_key(pred_field), config, overwrite=True)


def plan_shards(samples, pred_field: str, num_shards: int) -> list[list[str]]:
    """Split the samples of ``samples`` still lacking ``pred_field`` into up to ``num_shards``
    contiguous lists of sample ids (none empty)."""
    check_count(num_shards, "num_shards")
    samples, _ = image_collection(samples)
    todo = samples.exists(pred_field, False) if samples.has_field(pred_field) else samples
    ids = todo.values("id")
    count = min(num_shards, len(ids))
    return [ids[i * len(ids) // count : (i + 1) * len(ids) // count] for i in range(count)]


class ReferenceSegmentationModel(fomo.Model):
    """The predictor as a FiftyOne model. Apply it with :func:`apply_reference_model`: FiftyOne's own
    ``apply_model`` writes whatever field it is given (a ground-truth field too) without telling the model.

    Takes ``[H, W, 3]`` uint8 images and returns ``fo.Detections`` (see :func:`instances_to_detections`).
    """

    def __init__(self, predictor) -> None:
        self.predictor = predictor

    @property
    def media_type(self) -> str:
        return "image"

    @property
    def ragged_batches(self) -> bool:
        return True

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return False

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        if value:
            raise ValueError("ReferenceSegmentationModel has no preprocessing transforms")

    def predict(self, arg: np.ndarray) -> fo.Detections:
        return self.predict_all([arg])[0]

    def predict_all(self, args) -> list[fo.Detections]:
        return [instances_to_detections(instances) for instances in self.predictor.predict(list(args))]


def reference_model(
    dataset, bank_key: str, segmenter, encoder, settings: Settings | None = None
) -> ReferenceSegmentationModel:
    """A :class:`ReferenceSegmentationModel` for the bank stored on ``dataset`` under ``bank_key``."""
    from .predictor import Predictor

    return ReferenceSegmentationModel(
        Predictor(segmenter, encoder, load_memory_bank(dataset, bank_key), settings=settings)
    )


def apply_reference_model(
    samples,
    bank_key: str,
    label_field: str,
    segmenter,
    encoder,
    settings: Settings | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    **apply_options,
) -> None:
    """FiftyOne's ``apply_model`` with the bank's :func:`reference_model`, guarded like every
    other way of writing predictions: ``label_field`` must not be a ground-truth field
    (:func:`protected_fields`, the bank's own among them) and an existing field is refused unless
    ``overwrite``. The field gets a prediction record, so :func:`evaluate` finds its ground truth.
    ``apply_options`` go to ``apply_model`` (e.g. ``num_workers``, ``skip_failures``)."""
    settings = settings or Settings()
    samples, _ = image_collection(samples)
    dataset = samples._root_dataset
    if len(samples) == 0:
        raise FiftyOneAdapterError("the target view is empty: nothing to segment")
    check_prediction_field(dataset, label_field, overwrite=overwrite)
    model = reference_model(dataset, bank_key, segmenter, encoder, settings=settings)  # checks the encoder
    record = make_prediction_record(dataset, label_field, bank_key, segmenter, encoder, settings)
    prepare_prediction_field(dataset, record, overwrite=overwrite)
    samples.apply_model(model, label_field=label_field, batch_size=batch_size, **apply_options)


# --- boxes to masks ---


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
    from .memory_bank import box_mask_crops

    samples, _ = image_collection(samples)
    dataset = samples._root_dataset
    check_detections_field(samples, in_field, "input field")
    in_place = out_field in (None, in_field)
    out_field = in_field if in_place else out_field
    if in_place:
        if in_field in protected_fields(dataset):
            raise FiftyOneAdapterError(f"'{in_field}' is a ground-truth field: write the masks to a new field instead")
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
            _fill_masks(todo, image, segmenter, box_mask_crops, report)
        dataset.set_values(out_field, {sample_id: fo.Detections(detections=copies)}, key_field="id")
        report["samples"] += 1
        if progress is not None:
            progress(done, len(ids))
    return report


def _fill_masks(detections: list, image: np.ndarray, segmenter, box_mask_crops, report: dict) -> None:
    size = image.shape[:2]
    boxes = [pixel_box(det.bounding_box, size) for det in detections]
    usable = [(det, box) for det, box in zip(detections, boxes) if box is not None]
    for det, box in zip(detections, boxes):
        if box is None:
            report["failed"].append(
                {"label_id": det.id, "reason": f"bounding box {det.bounding_box!r} is empty or outside the image"}
            )
    if not usable:
        return
    crops = box_mask_crops(segmenter, image, [box for _, box in usable])
    for (det, _), crop in zip(usable, crops):
        if crop.any():
            det.mask = crop
            report["filled"] += 1
        else:
            report["failed"].append({"label_id": det.id, "reason": "SAM2 returned an empty mask inside the box"})


# --- evaluation ---


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
    (see :func:`ntt_core.coco.evaluate`); images whose size cannot be read are left out, with a note."""
    from .coco import encode_crop, evaluate

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
            entry = _coco_entry(label, size, encode_crop)
            if entry is not None and label.label in category:
                crowd = int(is_crowd(label))  # COCO imports keep it
                entry.update(
                    id=len(annotations) + 1, image_id=image_id, category_id=category[label.label], iscrowd=crowd
                )
                annotations.append(entry)
        for label in predicted.detections if predicted else []:
            entry = _coco_entry(label, size, encode_crop, prediction=True)
            if entry is not None and label.label in category:
                entry.update(image_id=image_id, category_id=category[label.label], score=float(label.confidence or 0.0))
                results.append(entry)
    truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in category.items()],
    }
    report = evaluate(truth, results)
    if unreadable:
        report["notes"].append(
            f"{len(unreadable)} unreadable image(s) left out of the pycocotools figures: {', '.join(unreadable[:3])}"
        )
    return report


def _coco_entry(label, size: tuple[int, int], encode_crop, prediction: bool = False) -> dict | None:
    """A COCO annotation (or, for a ``prediction``, a result with the authors' inclusive box: see
    :func:`ntt_core.coco.result_box`) from a ``fo.Detection``; None if its box is unusable."""
    from .coco import result_box

    box = pixel_box(label.bounding_box, size)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    entry = {"bbox": result_box(box) if prediction else [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
    crop = label.get_mask()
    if crop is not None:
        entry["segmentation"] = encode_crop(fit_mask(crop, box), box, size)
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
