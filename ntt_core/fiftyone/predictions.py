"""Predictions into a dataset: the record of how a field was made (run ``segmentation_<field>``),
resuming and sharded runs, and the predictor as a FiftyOne ``Model``. Each batch is written as
soon as it is done, one atomic update per sample."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection

import fiftyone as fo
import fiftyone.core.fields as fof
import fiftyone.core.models as fomo
import fiftyone.core.utils as fou
import numpy as np

from ..errors import RunStopped
from ..input_rules import check_count
from ..settings import MEMORY_ONLY, Settings
from .bank_runs import load_memory_bank, memory_bank_info
from .fields import (
    PREDICTION_METHOD,
    FiftyOneAdapterError,
    Progress,
    check_output_field,
    image_collection,
    images_to_process,
)
from .labels import declare_prediction_attributes, instances_to_detections

# imports torch: loaded at first use, so that forms resolve in the App without it
pipeline = fou.lazy_import("ntt_core.predictor")
candidate_cache = fou.lazy_import("ntt_core.candidate_cache")

DEFAULT_PREDICTION_FIELD = "ntt_predictions"
PREDICTION_RUN_PREFIX = "segmentation_"
LEGACY_RUN_PREFIX = "ntt_predictions_"  # records written before: still read
#: Keys of a prediction record that must agree before ``skip_existing`` may resume a field.
RECORD_MATCH_KEYS = ("bank_key", "bank_sha256", "segmenter_fingerprint", "encoder_fingerprint", "dtype", "settings")


def prediction_run_key(field_name: str) -> str:
    """The key of the run that records how ``field_name`` was segmented: ``segmentation_<field>``."""
    return PREDICTION_RUN_PREFIX + field_name


def prediction_record(dataset, field_name: str) -> dict | None:
    """How ``field_name`` was predicted (bank, models, settings), or None if not by this tool
    (a record under the earlier key ``ntt_predictions_<field>`` is read too)."""
    dataset = dataset._root_dataset
    runs = dataset.list_runs(method=PREDICTION_METHOD)
    for key in (prediction_run_key(field_name), LEGACY_RUN_PREFIX + field_name):
        if key in runs:
            return dataset.get_run_info(key).config.serialize()
    return None


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
    """:func:`.fields.check_output_field` for predictions: an existing field is overwritten only if this tool
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
    keeps the field only if its record matches ``record`` on :data:`RECORD_MATCH_KEYS`. The field's
    detection attributes are declared in the schema (:func:`.labels.declare_prediction_attributes`).
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
        _check_same_run(name, existing, record)
        declare_prediction_attributes(dataset, name)  # a field written before they were declared
        return
    if dataset.has_run(key) and key not in dataset.list_runs(method=PREDICTION_METHOD):  # before changing anything
        raise FiftyOneAdapterError(f"run key '{key}' is taken by another run")
    if exists:
        for eval_key in dataset.list_evaluations(pred_field=name):
            dataset.delete_evaluation(eval_key)  # its results describe the predictions being replaced
        dataset.clear_sample_field(name)
        if LEGACY_RUN_PREFIX + name in dataset.list_runs(method=PREDICTION_METHOD):
            dataset.delete_run(LEGACY_RUN_PREFIX + name)  # describes the predictions being replaced
    else:
        dataset.add_sample_field(name, fof.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    dataset.register_run(key, dataset.init_run(method=PREDICTION_METHOD, **record), overwrite=True)
    declare_prediction_attributes(dataset, name)


def check_resume(dataset, pred_field: str, bank_key: str, settings: Settings) -> None:
    """Before the models load: raise if resuming ``pred_field`` with ``bank_key`` and ``settings``
    would mix results (the bank or a setting differs from the field's record); each difference is
    named with both values. The models are compared when the run starts (:func:`prepare_prediction_field`)."""
    existing = prediction_record(dataset, pred_field)
    if existing is None:
        return
    bank = memory_bank_info(dataset, bank_key)
    partial = {"bank_key": bank_key, "bank_sha256": bank["sha256"], "settings": settings.to_dict()}
    _check_same_run(pred_field, existing, partial)


def _check_same_run(name: str, existing: dict, record: dict) -> None:
    """Raise unless ``record`` agrees with the field's ``existing`` record on :data:`RECORD_MATCH_KEYS`
    (those that ``record`` has)."""
    differ, details = [], []
    for key in (k for k in RECORD_MATCH_KEYS if k in record):
        old, new = _resume_part(existing, key), _resume_part(record, key)
        if old == new:
            continue
        differ.append(key)
        if key == "settings" and isinstance(old, dict) and isinstance(new, dict):
            names = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
            details += [f"{n}: {old.get(n)!r} in the field, {new.get(n)!r} now" for n in names]
        else:
            details.append(f"{key}: {_short(old)} in the field, {_short(new)} now")
    if differ:
        raise FiftyOneAdapterError(
            f"field '{name}' was written with a different {', '.join(differ)}: resuming would mix results "
            f"({'; '.join(details)}); use the same bank, models and settings, overwrite the field, or choose "
            "another field"
        )


def _short(value) -> str:
    """A recorded value as the error shows it: fingerprints and checksums cut to 12 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:13] + "…'"


def _resume_part(record: dict, key: str):
    """What of ``record[key]`` must agree to resume a field: settings that change only memory and speed
    (a smaller prompt batch after running out of memory) may differ."""
    value = record.get(key)
    if key == "settings" and isinstance(value, dict):
        return {name: setting for name, setting in value.items() if name not in MEMORY_ONLY}
    return value


def _target(samples):
    """The image samples to segment (:func:`.fields.images_to_process`), their dataset and the
    collection's note."""
    samples, note = images_to_process(samples)
    return samples, samples._root_dataset, note


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
    cache=True,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> dict:
    """Predict every instance of the bank's classes in ``samples`` into ``pred_field``.

    ``cache`` is the candidate cache (:func:`ntt_core.candidate_cache.open_cache`: True, the default,
    its default folder; None none; or a folder): re-segmenting after a bank edit reuses each image's
    bank-independent work, with the same results.

    Each batch is written as soon as it is done, one atomic update per sample, so a run that
    dies keeps its finished samples; re-running with ``skip_existing=True`` finishes the rest
    (only samples whose field is still empty are processed). Unreadable images stay empty and
    are reported. ``should_stop`` is asked before each batch is written (one call a batch); when it
    says so the run stops with an error, writing nothing more (a delegated shard whose operation
    was marked failed). ``progress(done, total, detail)`` is called at every stage of each batch
    (image encoders, each prompt batch, post-processing, writing) and after it; a
    :class:`~ntt_core.errors.RunStopped` it raises stops the run there (inside a batch: nothing of
    the batch is written) with the resume hint. ``on_batch(done, total, from_cache)`` is called after
    each batch is written, with the images served from the candidate cache so far (timings). Returns ``{"field",
    "processed", "instances", "skipped_existing", "failed", "note"}``.
    """
    check_count(batch_size, "batch_size")
    settings = settings or Settings()
    samples, dataset, note = _target(samples)
    check_prediction_field(dataset, pred_field, overwrite=overwrite, skip_existing=skip_existing)
    bank = load_memory_bank(dataset, bank_key)
    predictor = pipeline.Predictor(segmenter, encoder, bank, settings=settings, cache=candidate_cache.open_cache(cache))
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
    total = len(ids)
    stream = predictor.predict_stream(paths, batch_size)
    for start in range(0, total, batch_size):
        batch_ids = ids[start : start + batch_size]
        now = _batch_progress(progress, start, len(batch_ids), total)
        predictor.on_stage = now
        try:  # one batch of the stream
            results = [result for _, result in itertools.islice(stream, len(batch_ids))]
        except RunStopped as stop:
            raise _stopped(stop, start, total, pred_field) from None
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
        if now is not None:
            now("writing", 0, 1)  # stopping here writes nothing of the batch
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
        if on_batch is not None:
            on_batch(start + len(batch_ids), total, predictor.cache_hits)
        if progress is not None:
            try:
                progress(start + len(batch_ids), total)
            except RunStopped as stop:  # after the batch is written
                raise _stopped(stop, start + len(batch_ids), total, pred_field) from None
    return report


def _batch_progress(progress: Progress | None, start: int, count: int, total: int):
    """``on_stage(stage, done, total)`` for the batch of ``count`` images from ``start``: ``progress``
    with the detail "image 3 of 40: prompts 256/1024" (None without ``progress``)."""
    if progress is None:
        return None
    images = f"image {start + 1}" if count == 1 else f"images {start + 1}-{start + count}"

    def now(stage: str, done: int, of: int) -> None:
        what = f"{stage} {done}/{of}" if stage == "prompts" else stage
        progress(start, total, detail=f"{images} of {total}: {what}")

    return now


def _stopped(stop: RunStopped, done: int, total: int, pred_field: str) -> RunStopped:
    return RunStopped(
        f"{stop}: stopped after {done} of {total} samples; the finished samples are saved in '{pred_field}'. "
        f"To resume, run Segment by reference into '{pred_field}' again with skip_existing "
        "('Skip samples that already have predictions')"
    )


def without_references(samples, bank_key: str):
    """``samples`` less the samples holding ``bank_key``'s references."""
    dataset = samples._root_dataset
    return samples.exclude(memory_bank_info(dataset, bank_key).get("reference_sample_ids", []))


def segmentation_plan(
    samples, bank_key: str, pred_field: str, skip_existing: bool = False, skip_references: bool = False
) -> dict:
    """What a run over ``samples`` would process: ``{"samples"`` (to segment), ``"existing"`` (skipped:
    they have predictions), ``"references"`` (samples holding the bank's references among those of
    ``samples``), ``"note"}``; ``skip_references`` leaves those out (:func:`without_references`)."""
    samples, dataset, note = _target(samples)
    chosen = without_references(samples, bank_key)
    references = len(samples) - len(chosen)
    if not skip_references:
        chosen = samples
    existing = len(chosen.exists(pred_field)) if skip_existing and dataset.has_field(pred_field) else 0
    return {"samples": len(chosen) - existing, "existing": existing, "references": references, "note": note}


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
    samples, dataset, _ = _target(samples)
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
    return split_into_shards(todo.values("id"), num_shards)


def split_into_shards(ids: list[str], num_shards: int) -> list[list[str]]:
    """``ids`` in up to ``num_shards`` contiguous parts of sizes differing by at most one (none empty)."""
    check_count(num_shards, "num_shards")
    count = min(num_shards, len(ids))
    return [ids[i * len(ids) // count : (i + 1) * len(ids) // count] for i in range(count)]


class ReferenceSegmentationModel(fomo.Model):
    """The predictor as a FiftyOne model. Apply it with :func:`apply_reference_model`: FiftyOne's own
    ``apply_model`` writes whatever field it is given (a ground-truth field too) without telling the model.

    Takes ``[H, W, 3]`` uint8 images and returns ``fo.Detections`` (see :func:`.labels.instances_to_detections`).
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
    dataset, bank_key: str, segmenter, encoder, settings: Settings | None = None, cache=True
) -> ReferenceSegmentationModel:
    """A :class:`ReferenceSegmentationModel` for the bank stored on ``dataset`` under ``bank_key``
    (``cache`` as in :func:`segment_by_reference`)."""
    bank = load_memory_bank(dataset, bank_key)
    return ReferenceSegmentationModel(
        pipeline.Predictor(segmenter, encoder, bank, settings=settings, cache=candidate_cache.open_cache(cache))
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
    (:func:`.fields.protected_fields`, the bank's own among them) and an existing field is refused unless
    ``overwrite``. The field gets a prediction record, so :func:`.evaluation.evaluate` finds its ground truth.
    ``apply_options`` go to ``apply_model`` (e.g. ``num_workers``, ``skip_failures``)."""
    settings = settings or Settings()
    samples, dataset, _ = _target(samples)
    check_prediction_field(dataset, label_field, overwrite=overwrite)
    model = reference_model(dataset, bank_key, segmenter, encoder, settings=settings)  # checks the encoder
    record = make_prediction_record(dataset, label_field, bank_key, segmenter, encoder, settings)
    prepare_prediction_field(dataset, record, overwrite=overwrite)
    samples.apply_model(model, label_field=label_field, batch_size=batch_size, **apply_options)
