"""Field and view checks shared by every workflow: image collections, ``Detections`` fields,
names of new fields and keys, and the ground-truth fields that no path ever writes."""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable

import fiftyone as fo
import fiftyone.core.fields as fof
import fiftyone.core.media as fom

from ..errors import NttError

#: Run methods of this tool: memory banks (:mod:`.bank_runs`) and prediction records (:mod:`.predictions`).
BANK_METHOD = "ntt_memory_bank"
PREDICTION_METHOD = "ntt_predictions"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

#: ``progress(done, total)``; some runs add ``detail``, a line on what is happening now ("image 3 of 40:
#: prompts 256/1024"). A :class:`~ntt_core.errors.RunStopped` it raises stops the run (see each run).
Progress = Callable[..., None]


class FiftyOneAdapterError(NttError):
    """A dataset, field, run or parameter that cannot be used; the message names it and says why."""


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


def images_to_process(samples) -> tuple[fo.core.collections.SampleCollection, str]:
    """:func:`image_collection`, refusing an empty collection."""
    images, note = image_collection(samples)
    if len(images) == 0:
        raise FiftyOneAdapterError("the target view is empty: nothing to process")
    return images, note


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
    fields = {dataset.get_run_info(key).config.gt_field for key in dataset._root_dataset.list_runs(method=BANK_METHOD)}
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
