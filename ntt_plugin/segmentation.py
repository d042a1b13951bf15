"""Operators that write masks: segment by reference, and boxes to masks."""

from __future__ import annotations

import functools

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import reports
from .common import (
    GONE_AFTER_S,
    bank_choice,
    call,
    check,
    check_models,
    count_input,
    current,
    field_choice,
    form,
    invalid,
    model_inputs,
    model_options,
    params_with_defaults,
    product_label,
    report_output,
    require_library,
    run_with_progress,
)
from .videos import is_video, target_problem, tracking_inputs
from .videos import run as run_video


def _target_problem(inputs, target, videos: bool = False) -> None:
    """An error in the form when the target cannot be processed (videos only where ``videos``: the
    segmentation tracks them); a notice when it was mapped."""
    from ntt_core.errors import NttError
    from ntt_core.fiftyone.fields import images_to_process

    if videos and is_video(target):
        return target_problem(inputs, target)
    try:
        _, note = images_to_process(target)
    except NttError as error:
        invalid(inputs.view("target_problem", types.Error(label=str(error))), str(error))
        return
    if note:
        inputs.view("target_note", types.Notice(label=note))


SCHEDULE_ADVICE = (
    "A long run: Schedule is pre-selected, so the App stays usable; start a worker on the server with "
    "`fiftyone delegated launch` (the Memory banks panel shows its progress and can stop it). "
    "Execute runs it now, in this page: FiftyOne's Executing dialog cannot cancel it; closing or reloading "
    f"the page stops it at its next prompt batch (after about {GONE_AFTER_S:.0f} s), keeping the finished samples."
)


def form_settings(params: dict):
    """The method's settings that the form sets (the others: the paper's)."""
    from ntt_core.settings import Settings

    names = ("points_per_side", "sam_iou_threshold", "max_detections", "score_threshold")
    return Settings(**{name: params[name] for name in names})


def _run_plan(ctx, params: dict):
    """``(plan, seconds, line, schedule)`` of a segmentation with ``params`` (None when the form has
    an error that makes it unknowable): the samples it would process, its estimated seconds (None
    when no figure is kept for the device, models and grid), the form's line on the estimate, and
    whether to recommend *Schedule*: over ``LONG_RUN_S``, or unknown with the paper's models on a
    device that may be a CPU."""
    from ntt_core.errors import NttError
    from ntt_core.fiftyone.predictions import DEFAULT_PREDICTION_FIELD, segmentation_plan
    from ntt_core.fiftyone.timings import LONG_RUN_S, estimate, timing_key
    from ntt_core.input_rules import check_count
    from ntt_core.settings import Settings

    def get(name: str, default):
        return default if params.get(name) is None else params[name]

    try:
        plan = segmentation_plan(
            ctx.target_view(),
            params.get("bank_key"),
            get("pred_field", DEFAULT_PREDICTION_FIELD),
            skip_existing=bool(params.get("skip_existing")),
            skip_references=bool(params.get("skip_reference_samples")),
        )
        grid = check_count(get("points_per_side", Settings().points_per_side), "points_per_side")
    except NttError:  # shown under its field
        return None
    sam2, dinov2, device = get("sam2", ""), get("dinov2", ""), get("device", "auto")
    key = timing_key(device, sam2, dinov2, grid, get("dtype", "auto"))
    seconds, line = estimate(key, plan["samples"])
    paper_models_on_cpu = not sam2 and not dinov2 and device in ("auto", "cpu")
    schedule = (seconds is not None and seconds > LONG_RUN_S) or (seconds is None and paper_models_on_cpu)
    return plan, seconds, line, schedule


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
    summarize = staticmethod(reports.segment)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_by_reference",
            label=product_label("Segment by reference"),
            description="Find every instance of a memory bank's classes and write them as Detections with instance masks",
            dynamic=True,
            allow_delegated_execution=True,
            execute_as_generator=True,  # immediate runs from the App stream their progress
        )

    def resolve_input(self, ctx):
        return form(ctx, "Segment by reference", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.bank_runs import list_memory_banks
        from ntt_core.fiftyone.predictions import (
            DEFAULT_PREDICTION_FIELD,
            check_prediction_field,
            check_resume,
            planning_unfinished,
        )
        from ntt_core.settings import Settings

        paper = Settings()
        shard = ctx.params.get("shard_sample_ids") is not None
        if not shard:
            _target_problem(inputs, ctx.target_view(), videos=True)
        bank_choice(inputs, ctx)
        field_prop = inputs.str("pred_field", default=DEFAULT_PREDICTION_FIELD, label="Output field")
        inputs.bool("overwrite", default=False, label="Overwrite the field if it exists (clears all its values)")
        inputs.bool(
            "skip_existing",
            default=False,
            label="Skip samples that already have predictions",
            description="Resumes an interrupted run; needs the same bank, models and settings as the field's run record",
        )
        inputs.float(
            "score_threshold",
            min=0.0,
            max=1.0,
            default=paper.score_threshold,
            label="Score threshold",
            description=f"{paper.score_threshold:g} as in the paper",
        )
        count_input(ctx, inputs, "max_detections", "Max instances per image", default=paper.max_detections)
        count_input(
            ctx,
            inputs,
            "points_per_side",
            "Prompt grid points per side",
            default=paper.points_per_side,
            description=f"{paper.points_per_side} as in the paper",
        )
        inputs.float(
            "sam_iou_threshold",
            min=0.0,
            max=1.0,
            default=paper.sam_iou_threshold,
            label="SAM2 IoU threshold",
            description=f"{paper.sam_iou_threshold:g} as in the paper",
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
        else:
            inputs.bool(
                "skip_reference_samples",
                default=False,
                label="Leave out the samples holding the bank's references",
                description="They are segmented too by default; evaluation leaves them out either way",
            )
        model_inputs(inputs)
        check_models(ctx, inputs)
        if is_video(ctx.dataset):
            return  # the frame field is checked when the run starts
        field, overwrite = current(ctx, inputs, "pred_field"), current(ctx, inputs, "overwrite")
        shards = current(ctx, inputs, "num_shards")
        planning = isinstance(shards, int) and shards > 1 and planning_unfinished(ctx.dataset, field)
        skip = current(ctx, inputs, "skip_existing") or shard or planning  # a planning step that died continues
        exists = check(
            field_prop, lambda: check_prediction_field(ctx.dataset, field, overwrite=overwrite, skip_existing=skip)
        )
        key = current(ctx, inputs, "bank_key")
        if exists and skip and not overwrite and key in list_memory_banks(ctx.dataset):
            values = {name: current(ctx, inputs, name) for name in inputs.properties}
            check(
                inputs.properties["skip_existing"],
                lambda: check_resume(ctx.dataset, field, key, form_settings(values)),
            )
        if not shard:
            self._plan(ctx, inputs)

    def _plan(self, ctx, inputs) -> None:
        """What the run will do: how many samples (the reference samples among them or not), how long
        on the chosen device (from the kept figure), and the advice to schedule a long run."""
        found = _run_plan(ctx, {name: current(ctx, inputs, name) for name in inputs.properties})
        if found is None:
            return
        plan, seconds, line, schedule = found
        existing = f"; {plan['existing']} already have predictions and are skipped" if plan["existing"] else ""
        if plan["references"]:
            left_out = current(ctx, inputs, "skip_reference_samples")
            where = "left out" if left_out else "among them"
            references = f"; the {plan['references']} sample(s) holding the bank's references are {where}"
        else:
            references = "; none of them holds the bank's references"
        inputs.view("plan", types.Notice(label=f"Segments {plan['samples']} sample(s){existing}{references}."))
        inputs.view("estimate", types.Notice(label=line))
        if schedule:
            inputs.view("schedule_advice", types.Warning(label=SCHEDULE_ADVICE))

    def resolve_execution_options(self, ctx):
        """Immediate or scheduled; a long run (see :func:`_run_plan`) defaults to *Schedule*."""
        from fiftyone.operators.executor import ExecutionOptions

        shard = ctx.params.get("shard_sample_ids") is not None
        found = None if shard else _run_plan(ctx, params_with_defaults(self, ctx))  # the App may send no params
        return ExecutionOptions(
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=bool(found and found[3]),
        )

    def resolve_run_name(self, ctx):
        return _shard_label(ctx.params) if ctx.params.get("shard") else self.config.label

    def execute(self, ctx):
        p = params_with_defaults(self, ctx)
        unit = "Frames" if is_video(ctx.dataset) else "Images"  # a video run counts frames
        return run_with_progress(self, ctx, unit, lambda progress: self._run(ctx, p, progress))

    def _run(self, ctx, p: dict, progress) -> dict:
        require_library()
        if p["overwrite"] and p.get("shard_sample_ids") is None:
            from ntt_core.shards import check_no_live_shards

            check_no_live_shards(ctx.dataset.name, p["pred_field"])
        if is_video(ctx.dataset):
            return run_video(
                ctx, p, progress, lambda: _shard_watch(ctx), functools.partial(self._plan_and_queue, ctx, p)
            )
        from ntt_core.fiftyone.predictions import segment_by_reference, start_sharded_prediction, without_references
        from ntt_core.fiftyone.timings import run_timer, timing_key
        from ntt_core.models import load_models

        segmenter, encoder = load_models(p["sam2"] or None, p["dinov2"] or None, **model_options(p))
        settings = form_settings(p)
        run = dict(
            bank_key=p["bank_key"], pred_field=p["pred_field"], segmenter=segmenter, encoder=encoder, settings=settings
        )
        # seconds per image kept for the estimates, images served from the candidate cache apart
        timed = dict(
            on_batch=run_timer(
                timing_key(p["device"], p["sam2"], p["dinov2"], p["points_per_side"], p["dtype"]), cached=True
            )
        )
        target = ctx.target_view()
        if p.get("skip_reference_samples"):
            target = without_references(target, p["bank_key"])
        if p.get("shard_sample_ids") is not None:
            target = ctx.dataset.select(p["shard_sample_ids"])
            return segment_by_reference(
                target,
                **run,
                **timed,
                batch_size=p["batch_size"],
                skip_existing=True,
                progress=progress,
                **_shard_watch(ctx),
            )
        flags = dict(overwrite=p["overwrite"], skip_existing=p["skip_existing"])
        if p["num_shards"] > 1:

            def plan(assigned):
                return start_sharded_prediction(target, **run, num_shards=p["num_shards"], **flags, assigned=assigned)

            return self._plan_and_queue(ctx, p, plan, p["pred_field"])
        return segment_by_reference(target, **run, **timed, batch_size=p["batch_size"], **flags, progress=progress)

    def _plan_and_queue(self, ctx, p: dict, plan, record_key: str) -> dict:
        """Plan a sharded run (``plan(assigned)``: each shard's sample ids, leaving out ``assigned``, the
        ids of the field's shards still queued or running) and queue its shards, then mark the run
        record ``record_key`` planned (see ``ntt_core.fiftyone.predictions.finish_planning``)."""
        from ntt_core.fiftyone.predictions import finish_planning
        from ntt_core.shards import live_shard_sample_ids

        assigned = live_shard_sample_ids(ctx.dataset.name, p["pred_field"]) if not p["overwrite"] else set()
        shards = plan(assigned)
        queued = [self._queue_shard(ctx, p, ids, i, len(shards)) for i, ids in enumerate(shards)]
        finish_planning(ctx.dataset, record_key)
        field = f"frames.{p['pred_field']}" if is_video(ctx.dataset) else p["pred_field"]
        return {"field": field, "shards": queued, "left_to_queued_shards": len(assigned)}

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
        pred_field: str | None = None,
        overwrite: bool = False,
        skip_existing: bool = False,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        points_per_side: int | None = None,
        sam_iou_threshold: float | None = None,
        batch_size: int = 1,
        num_shards: int = 1,
        skip_reference_samples: bool = False,
        sam2: str = "",
        dinov2: str = "",
        device: str = "auto",
        dtype: str = "auto",
        delegate: bool = False,
        key_frame_stride: int = 10,
        match_iou: float = 0.5,
        lost_frames: int = 10,
    ):
        """Segment ``sample_collection`` with ``bank_key``; a setting left None is the form's default
        (the paper's, from ``ntt_core.settings.Settings``; the field ``ntt_predictions``)."""
        thresholds = dict(score_threshold=score_threshold, sam_iou_threshold=sam_iou_threshold)
        params = dict(
            bank_key=bank_key,
            pred_field=pred_field,
            overwrite=overwrite,
            skip_existing=skip_existing,
            **{name: float(value) for name, value in thresholds.items() if value is not None},
            max_detections=max_detections,
            points_per_side=points_per_side,
            batch_size=batch_size,
            num_shards=num_shards,
            skip_reference_samples=skip_reference_samples,
            sam2=sam2,
            dinov2=dinov2,
            device=device,
            dtype=dtype,
            key_frame_stride=key_frame_stride,  # video datasets only
            match_iou=float(match_iou),
            lost_frames=lost_frames,
        )
        return call(self, sample_collection, {k: v for k, v in params.items() if v is not None}, delegate)


class BoxesToMasks(foo.Operator):
    summarize = staticmethod(reports.boxes_to_masks)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="boxes_to_masks",
            label=product_label("Boxes to masks (SAM2)"),
            description="Fill the masks of box-only detections with SAM2 box prompts, into a new field",
            dynamic=True,
            allow_delegated_execution=True,
            execute_as_generator=True,  # immediate runs from the App stream their progress
        )

    def resolve_input(self, ctx):
        return form(ctx, "Boxes to masks", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.fields import check_output_field, detections_fields
        from ntt_core.fiftyone.labels import check_in_place

        _target_problem(inputs, ctx.target_view())
        fields = detections_fields(ctx.dataset)
        field_choice(inputs, "in_field", fields, "Detections field", "Its box-only detections get masks")
        inputs.bool(
            "in_place", default=False, label="Write in place", description="Only for fields that are not ground truth"
        )
        in_field = current(ctx, inputs, "in_field")
        if current(ctx, inputs, "in_place"):
            check(inputs.properties["in_place"], lambda: check_in_place(ctx.dataset, in_field))
        else:
            out_prop = inputs.str("out_field", default=f"{in_field}_masks", label="Output field")
            inputs.bool("overwrite", default=False, label="Overwrite the output field if it exists")
            out_field, overwrite = current(ctx, inputs, "out_field"), current(ctx, inputs, "overwrite")
            check(out_prop, lambda: check_output_field(ctx.dataset, out_field, overwrite=overwrite))
        model_inputs(inputs, encoder=False)
        check_models(ctx, inputs)

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
