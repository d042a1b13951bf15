"""Segment by reference on video datasets: the form's tracking options and the run, called by the
Segment by reference operator (ntt_plugin/segmentation.py) when its dataset holds videos."""

from __future__ import annotations

from collections.abc import Callable

import fiftyone.core.media as fom
import fiftyone.operators.types as types

from .common import count_input, invalid, model_options


def is_video(collection) -> bool:
    """Whether ``collection`` holds videos (frames and clips views too)."""
    return collection.media_type == fom.VIDEO or collection._is_frames or collection._is_clips


def target_problem(inputs, target) -> None:
    """An error in the form when the videos cannot be tracked; a notice when a view was mapped."""
    from ntt_core.errors import NttError
    from ntt_core.fiftyone.videos import video_collection

    try:
        videos, note = video_collection(target)
        if len(videos) == 0:
            invalid(inputs.view("target_problem", types.Error(label="the target view is empty")), "empty target")
            return
    except NttError as error:
        invalid(inputs.view("target_problem", types.Error(label=str(error))), str(error))
        return
    if note:
        inputs.view("target_note", types.Notice(label=note))


def tracking_inputs(ctx, inputs) -> None:
    count_input(
        ctx,
        inputs,
        "key_frame_stride",
        "Key-frame stride",
        default=10,
        description="The image pipeline runs on the first frame and every k-th; SAM2's video memory follows the instances between",
    )
    inputs.float("match_iou", min=0.0, max=1.0, default=0.5, label="Track matching IoU")
    count_input(ctx, inputs, "lost_frames", "Frames before a lost track ends", default=10)


def run(ctx, p: dict, progress, shard_watch: Callable[[], dict], queue_shards: Callable[..., dict]) -> dict:
    """Track the bank's instances through the target videos into ``frames.<pred_field>``: one run,
    one shard's videos (``shard_sample_ids``, watched by ``shard_watch()``), or the planning of a
    sharded run (``queue_shards(plan, record key)``, ``plan(assigned ids)`` giving each shard's ids)."""
    from ntt_core.fiftyone.videos import segment_videos_by_reference, start_sharded_tracking
    from ntt_core.models import load_models
    from ntt_core.propagation import load_propagator
    from ntt_core.settings import Settings
    from ntt_core.tracking import TrackingSettings

    tracking = TrackingSettings(p["key_frame_stride"], float(p["match_iou"]), p["lost_frames"])
    segmenter, encoder = load_models(p["sam2"] or None, p["dinov2"] or None, **model_options(p))
    settings = Settings(
        points_per_side=p["points_per_side"],
        sam_iou_threshold=p["sam_iou_threshold"],
        max_detections=p["max_detections"],
        score_threshold=p["score_threshold"],
    )

    def make_propagator():
        return load_propagator(p["sam2"] or None, feature_frames=tracking.key_frame_stride + 1, **model_options(p))

    run = dict(
        bank_key=p["bank_key"],
        pred_field=p["pred_field"],
        segmenter=segmenter,
        encoder=encoder,
        make_propagator=make_propagator,
        settings=settings,
        tracking_settings=tracking,
    )
    if p.get("shard_sample_ids") is not None:
        target = ctx.dataset.select(p["shard_sample_ids"])
        return segment_videos_by_reference(target, **run, skip_existing=True, progress=progress, **shard_watch())
    flags = dict(overwrite=p["overwrite"], skip_existing=p["skip_existing"])
    if p["num_shards"] > 1:

        def plan(assigned):
            return start_sharded_tracking(
                ctx.target_view(), **run, num_shards=p["num_shards"], **flags, assigned=assigned
            )

        return queue_shards(plan, f"frames_{p['pred_field']}")
    return segment_videos_by_reference(ctx.target_view(), **run, **flags, progress=progress)
