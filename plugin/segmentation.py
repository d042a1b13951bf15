"""Operators that write masks: segment by reference, and boxes to masks."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from .common import (
    bank_choice,
    call,
    check,
    count_input,
    current,
    field_choice,
    form,
    invalid,
    model_inputs,
    model_options,
    params_with_defaults,
    report_output,
    require_library,
    run_with_progress,
)
from .videos import is_video, target_problem, tracking_inputs
from .videos import run as run_video


def _target_problem(inputs, target) -> None:
    """An error in the form when the target cannot be segmented; a notice when it was mapped."""
    from ntt_core.errors import NttError
    from ntt_core.fiftyone.fields import FiftyOneAdapterError, image_collection

    if is_video(target):
        return target_problem(inputs, target)
    try:
        images, note = image_collection(target)
        if len(images) == 0:
            raise FiftyOneAdapterError("the target view is empty: nothing to process")
    except NttError as error:
        invalid(inputs.view("target_problem", types.Error(label=str(error))), str(error))
        return
    if note:
        inputs.view("target_note", types.Notice(label=note))


def _shard_watch(ctx) -> dict:
    """For a delegated shard: a unique label among re-runs of the shard, and the check that stops it
    once its operation was marked failed (``segment_by_reference``'s ``should_stop``)."""
    operation_id = getattr(ctx, "_delegated_operation_id", None)  # set by FiftyOne's delegated service
    if not ctx.delegated or operation_id is None:
        return {}
    from ntt_core.shards import label_attempt, stopped_check

    label_attempt(operation_id, lambda attempt: _shard_label(ctx.params, attempt))
    return {"should_stop": stopped_check(operation_id)}


def _shard_label(params: dict, attempt: int = 1) -> str:
    again = f", attempt {attempt}" if attempt > 1 else ""
    return f"Segment by reference ({params.get('pred_field')}, shard {params.get('shard')}{again})"


class SegmentByReference(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_by_reference",
            label="Segment by reference",
            description="Find every instance of a memory bank's classes and write them as Detections with instance masks",
            dynamic=True,
            allow_delegated_execution=True,
            execute_as_generator=True,  # immediate runs from the App stream their progress
        )

    def resolve_input(self, ctx):
        return form(ctx, "Segment by reference", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.predictions import check_prediction_field, planning_unfinished

        shard = ctx.params.get("shard_sample_ids") is not None
        if not shard:
            _target_problem(inputs, ctx.target_view())
        bank_choice(inputs, ctx)
        field_prop = inputs.str("pred_field", default="ntt_predictions", label="Output field")
        inputs.bool("overwrite", default=False, label="Overwrite the field if it exists (clears all its values)")
        inputs.bool(
            "skip_existing",
            default=False,
            label="Skip samples that already have predictions",
            description="Resumes an interrupted run; needs the same bank, models and settings as the field's run record",
        )
        inputs.float(
            "score_threshold", min=0.0, max=1.0, default=0.0, label="Score threshold", description="0 as in the paper"
        )
        count_input(ctx, inputs, "max_detections", "Max instances per image", default=100)
        count_input(
            ctx,
            inputs,
            "points_per_side",
            "Prompt grid points per side",
            default=32,
            description="32 as in the paper",
        )
        inputs.float(
            "sam_iou_threshold",
            min=0.0,
            max=1.0,
            default=0.4,
            label="SAM2 IoU threshold",
            description="0.4 as in the paper",
        )
        count_input(ctx, inputs, "batch_size", "Images per batch", default=1)
        count_input(
            ctx,
            inputs,
            "num_shards",
            "Shards",
            default=1,
            description="Above 1: queue that many delegated operations over fixed parts of the target for `fiftyone delegated launch` workers",
        )
        if is_video(ctx.dataset):
            tracking_inputs(ctx, inputs)
        model_inputs(inputs)
        if is_video(ctx.dataset):
            return  # the frame field is checked when the run starts
        field, overwrite = current(ctx, inputs, "pred_field"), current(ctx, inputs, "overwrite")
        shards = current(ctx, inputs, "num_shards")
        planning = isinstance(shards, int) and shards > 1 and planning_unfinished(ctx.dataset, field)
        skip = current(ctx, inputs, "skip_existing") or shard or planning  # a planning step that died continues
        check(field_prop, lambda: check_prediction_field(ctx.dataset, field, overwrite=overwrite, skip_existing=skip))

    def resolve_run_name(self, ctx):
        return _shard_label(ctx.params) if ctx.params.get("shard") else self.config.label

    def execute(self, ctx):
        p = params_with_defaults(self, ctx)
        return run_with_progress(self, ctx, "Images", lambda progress: self._run(ctx, p, progress))

    def _run(self, ctx, p: dict, progress) -> dict:
        if is_video(ctx.dataset):
            return run_video(ctx, p, progress)
        require_library()
        from ntt_core.fiftyone.predictions import finish_planning, segment_by_reference, start_sharded_prediction
        from ntt_core.models import load_models
        from ntt_core.settings import Settings

        if p["overwrite"] and p.get("shard_sample_ids") is None:
            from ntt_core.shards import check_no_live_shards

            check_no_live_shards(ctx.dataset.name, p["pred_field"])
        segmenter, encoder = load_models(p["sam2"] or None, p["dinov2"] or None, **model_options(p))
        settings = Settings(
            points_per_side=p["points_per_side"],
            sam_iou_threshold=p["sam_iou_threshold"],
            max_detections=p["max_detections"],
            score_threshold=p["score_threshold"],
        )
        run = dict(
            bank_key=p["bank_key"], pred_field=p["pred_field"], segmenter=segmenter, encoder=encoder, settings=settings
        )
        if p.get("shard_sample_ids") is not None:
            target = ctx.dataset.select(p["shard_sample_ids"])
            return segment_by_reference(
                target, **run, batch_size=p["batch_size"], skip_existing=True, progress=progress, **_shard_watch(ctx)
            )
        flags = dict(overwrite=p["overwrite"], skip_existing=p["skip_existing"])
        if p["num_shards"] > 1:
            from ntt_core.shards import live_shard_sample_ids

            assigned = live_shard_sample_ids(ctx.dataset.name, p["pred_field"]) if not p["overwrite"] else set()
            shards = start_sharded_prediction(
                ctx.target_view(), **run, num_shards=p["num_shards"], **flags, assigned=assigned
            )
            queued = [self._queue_shard(ctx, p, ids, i, len(shards)) for i, ids in enumerate(shards)]
            finish_planning(ctx.dataset, p["pred_field"])
            return {"field": p["pred_field"], "shards": queued, "left_to_queued_shards": len(assigned)}
        return segment_by_reference(ctx.target_view(), **run, batch_size=p["batch_size"], **flags, progress=progress)

    def _queue_shard(self, ctx, p: dict, sample_ids: list[str], index: int, count: int) -> dict:
        """Queue one shard: a delegated operation over fixed sample ids, resuming the field."""
        params = {k: v for k, v in p.items() if k not in ("num_shards", "overwrite", "skip_existing")}
        params.update(shard_sample_ids=list(sample_ids), shard=f"{index + 1}/{count}", skip_existing=True)
        result = foo.execute_operator(self.uri, dict(dataset=ctx.dataset), params=params, request_delegation=True)
        return {"operation_id": str(result.result["id"]), "shard": params["shard"], "samples": len(sample_ids)}

    def resolve_output(self, ctx):
        return report_output(ctx, "Segmentation")

    def __call__(
        self,
        sample_collection,
        bank_key: str,
        pred_field: str = "ntt_predictions",
        overwrite: bool = False,
        skip_existing: bool = False,
        score_threshold: float = 0.0,
        max_detections: int = 100,
        points_per_side: int = 32,
        sam_iou_threshold: float = 0.4,
        batch_size: int = 1,
        num_shards: int = 1,
        sam2: str = "",
        dinov2: str = "",
        device: str = "auto",
        dtype: str = "auto",
        delegate: bool = False,
        key_frame_stride: int = 10,
        match_iou: float = 0.5,
        lost_frames: int = 10,
    ):
        params = dict(
            bank_key=bank_key,
            pred_field=pred_field,
            overwrite=overwrite,
            skip_existing=skip_existing,
            score_threshold=float(score_threshold),
            max_detections=max_detections,
            points_per_side=points_per_side,
            sam_iou_threshold=float(sam_iou_threshold),
            batch_size=batch_size,
            num_shards=num_shards,
            sam2=sam2,
            dinov2=dinov2,
            device=device,
            dtype=dtype,
            key_frame_stride=key_frame_stride,  # video datasets only
            match_iou=float(match_iou),
            lost_frames=lost_frames,
        )
        return call(self, sample_collection, params, delegate)


class BoxesToMasks(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="boxes_to_masks",
            label="Boxes to masks (SAM2)",
            description="Fill the masks of box-only detections with SAM2 box prompts, into a new field",
            dynamic=True,
            allow_delegated_execution=True,
            execute_as_generator=True,  # immediate runs from the App stream their progress
        )

    def resolve_input(self, ctx):
        return form(ctx, "Boxes to masks", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.fields import check_output_field, detections_fields, protected_fields

        _target_problem(inputs, ctx.target_view())
        fields = detections_fields(ctx.dataset)
        field_choice(inputs, "in_field", fields, "Detections field", "Its box-only detections get masks")
        inputs.bool(
            "in_place", default=False, label="Write in place", description="Only for fields that are not ground truth"
        )
        in_field = current(ctx, inputs, "in_field")
        if current(ctx, inputs, "in_place"):
            if in_field in protected_fields(ctx.dataset):
                message = f"'{in_field}' is a ground-truth field: write to a new field"
                invalid(inputs.view("in_place_problem", types.Error(label=message)), message)
        else:
            out_prop = inputs.str("out_field", default=f"{in_field}_masks", label="Output field")
            inputs.bool("overwrite", default=False, label="Overwrite the output field if it exists")
            out_field, overwrite = current(ctx, inputs, "out_field"), current(ctx, inputs, "overwrite")
            check(out_prop, lambda: check_output_field(ctx.dataset, out_field, overwrite=overwrite))
        model_inputs(inputs, encoder=False)

    def execute(self, ctx):
        p = params_with_defaults(self, ctx)
        return run_with_progress(self, ctx, "Images", lambda progress: self._run(ctx, p, progress))

    def _run(self, ctx, p: dict, progress) -> dict:
        require_library()
        from ntt_core.fiftyone.labels import boxes_to_masks
        from ntt_core.models import load_segmenter

        segmenter = load_segmenter(p["sam2"] or None, **model_options(p))
        return boxes_to_masks(
            ctx.target_view(),
            p["in_field"],
            segmenter,
            out_field=None if p["in_place"] else p["out_field"],
            overwrite=p.get("overwrite", False),
            progress=progress,
        )

    def resolve_output(self, ctx):
        return report_output(ctx, "Boxes to masks")

    def __call__(
        self,
        sample_collection,
        in_field: str,
        out_field: str | None = None,
        in_place: bool = False,
        overwrite: bool = False,
        sam2: str = "",
        device: str = "auto",
        dtype: str = "auto",
        delegate: bool = False,
    ):
        params = dict(in_field=in_field, in_place=in_place, overwrite=overwrite, sam2=sam2, device=device, dtype=dtype)
        if out_field:
            params["out_field"] = out_field
        return call(self, sample_collection, params, delegate)
