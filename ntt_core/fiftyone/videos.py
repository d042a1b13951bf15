"""Video datasets: tracks of the bank's instances written as frame-level ``Detections``
(``frames.<field>``, the track id in each detection's ``index``), resumable per video, and their
evaluation (FiftyOne's COCO evaluation on the frame fields plus pycocotools figures per frame).

A video is finished when its sample-level ``<field>_tracks`` (the number of tracks) is set: a run
that dies keeps the videos before the one it was on; run again with ``skip_existing`` to finish the
rest (a half-written video is cleared and redone). A sharded run splits the videos still to do
into whole videos per shard (:func:`start_sharded_tracking`), each shard resuming the same field.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import fiftyone as fo
import fiftyone.core.fields as fof
import fiftyone.core.media as fom
import fiftyone.core.utils as fou
import numpy as np

from .. import coco_evaluation
from ..input_rules import check_count
from ..settings import Settings
from .bank_runs import load_memory_bank
from .evaluation import _coco_entry, check_eval_key, coco_evaluation_with_figures
from .fields import PREDICTION_METHOD, FiftyOneAdapterError, Progress, check_new_field_name
from .predictions import (
    RECORD_MATCH_KEYS,
    _resume_part,
    make_prediction_record,
    planning_unfinished,
    prediction_record,
    prediction_run_key,
    split_into_shards,
)

# these import torch: loaded at first use, so that forms resolve in the App without it
pipeline = fou.lazy_import("ntt_core.predictor")
tracking = fou.lazy_import("ntt_core.tracking")
video_files = fou.lazy_import("ntt_core.video_files")

TRACKS_SUFFIX = "_tracks"  # sample field: the number of tracks of a finished video


def video_collection(samples) -> tuple[fo.core.collections.SampleCollection, str]:
    """The video samples behind ``samples`` and a note: a frames or clips view is mapped to its videos
    (whole videos are tracked: tracks need every frame); image and grouped collections are refused."""
    note = ""
    if samples._is_frames or samples._is_clips:
        ids = samples.distinct("sample_id")
        kind = "frames" if samples._is_frames else "clips"
        note = f"{kind} view mapped to its {len(ids)} video(s): whole videos are tracked"
        samples = samples._root_dataset.select(ids)
    if samples.media_type != fom.VIDEO:
        raise FiftyOneAdapterError(
            f"only video samples can be tracked; this collection holds media of type '{samples.media_type}'"
        )
    return samples, note


def _record(dataset, field: str, bank_key: str, segmenter, encoder, propagator, settings, tracking_settings) -> dict:
    """The image pipeline's record (see :func:`.predictions.make_prediction_record`) plus the video parts."""
    record = make_prediction_record(dataset, f"frames.{field}", bank_key, segmenter, encoder, settings)
    record["settings"] = {**record["settings"], **vars(tracking_settings)}
    return {**record, "propagator_id": propagator.model_id}


def _prepare_field(dataset, field: str, record: dict, overwrite: bool, skip_existing: bool) -> None:
    """Create ``frames.<field>`` and its run record, or check an existing one (see
    :func:`.predictions.prepare_prediction_field`; ground-truth frame fields are never written)."""
    check_new_field_name(dataset, field)
    frame_schema = dataset.get_frame_field_schema() or {}
    key = prediction_run_key(f"frames_{field}")
    if field in frame_schema:
        existing = (
            dataset.get_run_info(key).config.serialize() if key in dataset.list_runs(method=PREDICTION_METHOD) else None
        )
        if existing is None:
            raise FiftyOneAdapterError(
                f"frame field '{field}' was not written by segment-by-reference (no run record): it may be ground "
                "truth, so it is never written; choose another field"
            )
        if not (overwrite or skip_existing):
            raise FiftyOneAdapterError(
                f"frame field '{field}' already exists: choose another name, allow overwriting it, or skip the "
                "videos it already has"
            )
        if not overwrite:
            differ = [k for k in RECORD_MATCH_KEYS if _resume_part(existing, k) != _resume_part(record, k)]
            if differ:
                raise FiftyOneAdapterError(
                    f"frame field '{field}' was written with a different {', '.join(differ)}: resuming would mix "
                    "results; use the same bank, models and settings, overwrite the field, or choose another field"
                )
            return
        for eval_key in dataset.list_evaluations(pred_field=f"frames.{field}"):
            dataset.delete_evaluation(eval_key)
        dataset.clear_frame_field(field)
        dataset.clear_sample_field(field + TRACKS_SUFFIX)
    else:
        dataset.add_frame_field(field, fof.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
        if not dataset.has_sample_field(field + TRACKS_SUFFIX):
            dataset.add_sample_field(field + TRACKS_SUFFIX, fof.IntField)
    dataset.register_run(key, dataset.init_run(method=PREDICTION_METHOD, **record), overwrite=True)


def frame_detections(frame, class_names: list[str]) -> fo.Detections:
    """A :class:`~ntt_core.tracking.TrackedFrame` as ``fo.Detections``: masks cropped to relative boxes,
    the track id in ``index``; label and confidence are set when the track is finished."""
    height, width = frame.image_size
    return fo.Detections(
        detections=[
            fo.Detection(
                label=class_names[0],
                bounding_box=[x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height],
                mask=np.asarray(mask, dtype=bool),
                index=int(track),
                object_score=float(score),
                key_frame=bool(frame.key_frame),
            )
            for track, (x0, y0, x1, y1), mask, score in zip(
                frame.track_ids.tolist(), frame.boxes.tolist(), frame.masks, frame.object_scores
            )
        ]
    )


def segment_videos_by_reference(
    samples,
    bank_key: str,
    pred_field: str,
    segmenter,
    encoder,
    make_propagator: Callable[[], object],
    settings: Settings | None = None,
    tracking_settings=None,
    overwrite: bool = False,
    skip_existing: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Track every instance of the bank's classes through each video of ``samples`` into the frame
    field ``frames.<pred_field>`` (see :class:`~ntt_core.tracking.VideoTracker`).

    ``make_propagator()`` gives a fresh propagator per video. Each detection carries its track's class
    and confidence (see :mod:`ntt_core.tracking`), its track id in ``index``, ``object_score`` and
    ``key_frame``; ``<pred_field>_tracks`` on the sample counts the tracks and marks the video done.
    A video that cannot be read, has no frames or changes frame size is reported in ``failed`` (and
    left empty); any other error stops the run, the finished videos kept. ``progress(frames done,
    frames total)`` is called per frame. ``should_stop`` is asked before each video; when it says so
    the run stops with an error, starting no more videos (a delegated shard whose operation was
    marked failed). Returns ``{"field", "videos", "frames", "tracks",
    "skipped_existing", "failed", "note"}``.
    """
    settings = settings or Settings()
    tracking_settings = tracking_settings or tracking.TrackingSettings()
    samples, note = video_collection(samples)
    if len(samples) == 0:
        raise FiftyOneAdapterError("the target view is empty: nothing to segment")
    dataset = samples._root_dataset
    bank = load_memory_bank(dataset, bank_key)
    predictor = pipeline.Predictor(segmenter, encoder, bank, settings=settings)  # checks the bank's encoder
    probe = make_propagator()
    record = _record(dataset, pred_field, bank_key, segmenter, encoder, probe, settings, tracking_settings)
    _prepare_field(dataset, pred_field, record, overwrite, skip_existing)

    done_field = pred_field + TRACKS_SUFFIX
    todo = samples.exists(done_field, False)
    samples.compute_metadata()
    totals = [m.total_frame_count if m is not None else None for m in todo.values("metadata")]
    total = sum(t or 0 for t in totals)
    report = {"field": f"frames.{pred_field}", "videos": 0, "frames": 0, "tracks": 0, "failed": [], "note": note}
    report["skipped_existing"] = len(samples) - len(todo)
    propagator = probe
    for sample in todo.iter_samples(autosave=False):
        if should_stop is not None and should_stop():
            raise FiftyOneAdapterError(
                f"stopped after {report['videos']} of {len(todo)} videos: this run's operation is no longer "
                f"running (marked failed or taken over); the finished videos are saved in 'frames.{pred_field}'"
            )
        propagator = propagator or make_propagator()
        tracker = tracking.VideoTracker(predictor, propagator, tracking_settings)
        try:
            written = _track_sample(sample, tracker, pred_field, report, total, progress)
        except tracking.VideoError as error:
            _clear(sample, pred_field)
            report["failed"].append({"sample_id": sample.id, "reason": str(error)})
            propagator = None
            continue
        except Exception as error:
            _clear(sample, pred_field)
            raise FiftyOneAdapterError(
                f"segmentation stopped at video {report['videos'] + len(report['failed']) + 1} of {len(todo)} "
                f"({sample.filepath}): {str(error) or type(error).__name__}. The finished videos are saved in "
                f"'frames.{pred_field}'; run again with skip_existing to finish the rest"
            ) from error
        _finish(dataset, sample.id, pred_field, tracker, written)
        report["videos"] += 1
        report["tracks"] += len(tracker.tracks)
        propagator = None
    return report


def start_sharded_tracking(
    samples,
    bank_key: str,
    pred_field: str,
    segmenter,
    encoder,
    make_propagator: Callable[[], object],
    num_shards: int,
    settings: Settings | None = None,
    tracking_settings=None,
    overwrite: bool = False,
    skip_existing: bool = False,
    assigned: Collection[str] = (),
) -> list[list[str]]:
    """Everything a sharded video run does before its shards are queued (as
    :func:`.predictions.start_sharded_prediction` for images): check the bank against the encoder,
    create ``frames.<pred_field>`` and its run record, and fix each shard's video ids (the videos
    not finished and not ``assigned`` to shards already queued, in the collection's order, split into
    contiguous parts: whole videos, never split). Each shard then runs
    :func:`segment_videos_by_reference` on its ids with ``skip_existing=True``; planning again before
    :func:`.predictions.finish_planning` (``"frames_" + pred_field``) continues it."""
    settings = settings or Settings()
    tracking_settings = tracking_settings or tracking.TrackingSettings()
    samples, _ = video_collection(samples)
    check_count(num_shards, "num_shards")
    dataset = samples._root_dataset
    skip_existing = skip_existing or (planning_unfinished(dataset, f"frames_{pred_field}") and not overwrite)
    load_memory_bank(dataset, bank_key).check_encoder(encoder)
    record = _record(dataset, pred_field, bank_key, segmenter, encoder, make_propagator(), settings, tracking_settings)
    _prepare_field(dataset, pred_field, {**record, "planning": True}, overwrite, skip_existing)
    todo = samples.exclude(list(assigned)).exists(pred_field + TRACKS_SUFFIX, False)
    return split_into_shards(todo.values("id"), num_shards)


def _track_sample(sample, tracker, field: str, report: dict, total: int, progress) -> int:
    """Track one video, writing its frames as they are settled; the number of frames written."""
    names = tracker.class_names
    written = 0
    for frame in tracker.run(video_files.read_frames(sample.filepath)):
        sample.frames[frame.index + 1][field] = frame_detections(frame, names)
        written += 1
        report["frames"] += 1
        if frame.key_frame:
            sample.save()  # what is settled so far; the frames themselves are not held
        if progress is not None:
            progress(report["frames"], max(total, report["frames"]))
    sample.save()
    return written


def _clear(sample, field: str) -> None:
    """Empty ``frames.<field>`` of a video that did not finish (nothing half-written stays)."""
    sample.reload()
    for frame in sample.frames.values():
        if frame.has_field(field):
            frame[field] = None
    sample.save()


def _finish(dataset, sample_id: str, field: str, tracker, frames: int) -> None:
    """Give each detection its track's class and confidence, then mark the video done."""
    view = dataset.select(sample_id)
    path = f"frames.{field}.detections"
    indices = view.values(f"{path}.index")[0]
    tracks = tracker.tracks
    labels = [[[tracker.class_names[tracks[i].label] for i in frame or []] for frame in indices]]
    confidences = [[[tracks[i].confidence for i in frame or []] for frame in indices]]
    view.set_values(f"{path}.label", labels)
    view.set_values(f"{path}.confidence", confidences)
    view.set_values(field + TRACKS_SUFFIX, [len(tracks)])


def frame_prediction_record(dataset, field: str) -> dict | None:
    """How the frame field ``field`` (``frames.`` optional) was predicted, or None if not by this tool."""
    return prediction_record(dataset, "frames_" + field.removeprefix("frames."))


def video_detections_fields(dataset) -> list[str]:
    """The frame-level ``Detections`` fields of a video dataset, as ``frames.<name>``."""
    schema = dataset.get_frame_field_schema() or {}
    return sorted(
        f"frames.{name}"
        for name, kind in schema.items()
        if issubclass(getattr(kind, "document_type", None) or object, fo.Detections)
    )


def evaluate_video(
    samples,
    pred_field: str,
    eval_key: str,
    gt_field: str | None = None,
    classes=None,
    use_masks: bool = True,
    overwrite: bool = False,
) -> dict:
    """FiftyOne's COCO evaluation of the frame field ``pred_field`` against ``gt_field`` (both given
    with or without ``frames.``; ground truth defaults to the bank's), masks, mAP, plus pycocotools
    bbox/segm figures with every frame an image, stored on the evaluation as for images."""
    samples, note = video_collection(samples)
    dataset = samples._root_dataset
    record = frame_prediction_record(dataset, pred_field) or {}
    gt_field = gt_field or record.get("gt_field")
    if not gt_field:
        raise FiftyOneAdapterError(
            f"'{pred_field}' has no prediction record naming its ground truth: give the ground-truth field"
        )
    pred_field, gt_field = (name if name.startswith("frames.") else f"frames.{name}" for name in (pred_field, gt_field))
    schema = dataset.get_frame_field_schema() or {}
    for name, role in ((pred_field, "prediction field"), (gt_field, "ground-truth field")):
        kind = schema.get(name[len("frames.") :])
        if kind is None or not issubclass(getattr(kind, "document_type", object), fo.Detections):
            raise FiftyOneAdapterError(f"{role} '{name}' is not a frame-level Detections field of this video dataset")
    if pred_field == gt_field:
        raise FiftyOneAdapterError("the prediction and ground-truth fields must differ")
    if check_eval_key(dataset, eval_key, overwrite):
        dataset.delete_evaluation(eval_key)
    classes = list(classes or record.get("classes") or samples.distinct(f"{pred_field}.detections.label"))
    figures = _pycocotools_frames(samples, pred_field, gt_field, classes)
    results = coco_evaluation_with_figures(samples, pred_field, gt_field, eval_key, use_masks, classes, figures)
    return {
        "eval_key": eval_key,
        "gt_field": gt_field,
        "videos": len(samples),
        "classes": classes,
        "mAP": float(results.mAP()),
        "use_masks": use_masks,
        "pycocotools": {t: figures.get(t) for t in ("bbox", "segm")},
        "notes": ([note] if note else []) + figures["notes"],
    }


def _pycocotools_frames(samples, pred_field: str, gt_field: str, classes) -> dict:
    """pycocotools figures with each frame an image (sizes from the videos' metadata)."""
    samples.compute_metadata()
    category = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations, results = [], [], []
    columns = samples.values(["filepath", "metadata", "frames.frame_number", gt_field, pred_field])
    for path, metadata, numbers, truths, predictions in zip(*columns):
        size = (metadata.frame_height, metadata.frame_width)
        for number, truth, predicted in zip(numbers, truths, predictions):
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": f"{path}#{number}", "height": size[0], "width": size[1]})
            for label in truth.detections if truth else []:
                entry = _coco_entry(label, size)
                if entry is not None and label.label in category:
                    entry.update(
                        id=len(annotations) + 1, image_id=image_id, category_id=category[label.label], iscrowd=0
                    )
                    annotations.append(entry)
            for label in predicted.detections if predicted else []:
                entry = _coco_entry(label, size, prediction=True)
                if entry is not None and label.label in category:
                    entry.update(
                        image_id=image_id, category_id=category[label.label], score=float(label.confidence or 0)
                    )
                    results.append(entry)
    truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in category.items()],
    }
    return coco_evaluation.evaluate(truth, results)
