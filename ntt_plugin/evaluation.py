"""The evaluation operator: FiftyOne's COCO evaluation plus pycocotools figures."""

from __future__ import annotations

import fiftyone.operators as foo

from . import reports
from .common import (
    call,
    check,
    current,
    field_choice,
    finish,
    form,
    params_with_defaults,
    product_label,
    report_output,
    require_library,
)

MODEL_EVALUATION_PANEL = "model_evaluation_panel_builtin"  # FiftyOne's Model Evaluation panel


class EvaluateByReference(foo.Operator):
    summarize = staticmethod(reports.evaluation)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="evaluate_by_reference",
            label=product_label("Evaluate reference segmentation (COCO)"),
            description="COCO mAP with masks in the Model Evaluation panel, plus pycocotools bbox/segm AP",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        return form(ctx, "Evaluate reference segmentation", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.evaluation import DEFAULT_EVAL_KEY, check_eval_key
        from ntt_core.fiftyone.fields import detections_fields
        from ntt_core.fiftyone.predictions import prediction_record

        ctx.target_view()
        fields, record_of = detections_fields(ctx.dataset), prediction_record
        if ctx.dataset.media_type == "video":  # frame-level fields, evaluated frame by frame
            from ntt_core.fiftyone.videos import frame_prediction_record, video_detections_fields

            fields, record_of = video_detections_fields(ctx.dataset), frame_prediction_record
        predicted = [name for name in fields if record_of(ctx.dataset, name)]
        ordered = predicted + [name for name in fields if name not in predicted]
        field_choice(inputs, "pred_field", ordered, "Predictions", "The Detections to evaluate")
        pred_field = current(ctx, inputs, "pred_field")
        record = record_of(ctx.dataset, pred_field) if pred_field in fields else None
        gt_choices = [name for name in fields if name != pred_field]
        default_gt = (record or {}).get("gt_field")
        description = "Never modified, apart from the evaluation's own attributes"
        field_choice(
            inputs,
            "gt_field",
            gt_choices,
            "Ground truth",
            description,
            default=default_gt if default_gt in gt_choices else None,
        )
        key_prop = inputs.str("eval_key", default=DEFAULT_EVAL_KEY, label="Evaluation key")
        inputs.bool(
            "exclude_references",
            default=True,
            label="Exclude samples holding references",
            description="Scoring references against themselves inflates the numbers",
        )
        inputs.bool("use_masks", default=True, label="Use instance masks (else boxes)")
        inputs.bool("overwrite", default=False, label="Replace an evaluation with this key")
        key, overwrite = current(ctx, inputs, "eval_key"), current(ctx, inputs, "overwrite")
        check(key_prop, lambda: check_eval_key(ctx.dataset, key, overwrite))

    def execute(self, ctx):
        require_library()
        from ntt_core.fiftyone.evaluation import evaluate

        p = params_with_defaults(self, ctx)
        options = dict(gt_field=p["gt_field"], use_masks=p["use_masks"], overwrite=p["overwrite"])
        if ctx.dataset.media_type == "video":  # frame fields, every frame an image; no reference samples
            from ntt_core.fiftyone.videos import evaluate_video

            report = evaluate_video(ctx.target_view(), p["pred_field"], p["eval_key"], **options)
        else:
            report = evaluate(
                ctx.target_view(), p["pred_field"], p["eval_key"], exclude_references=p["exclude_references"], **options
            )
        if not ctx.delegated:
            ctx.ops.open_panel(MODEL_EVALUATION_PANEL, layout="horizontal")  # shows the new run
        return finish(self, ctx, report)

    def resolve_output(self, ctx):
        return report_output(ctx, "Evaluation")

    def __call__(
        self,
        sample_collection,
        pred_field: str,
        eval_key: str | None = None,
        gt_field: str | None = None,
        exclude_references: bool = True,
        use_masks: bool = True,
        overwrite: bool = False,
        delegate: bool = False,
    ):
        params = dict(
            pred_field=pred_field,
            exclude_references=exclude_references,
            use_masks=use_masks,
            overwrite=overwrite,
        )
        params.update({name: value for name, value in (("eval_key", eval_key), ("gt_field", gt_field)) if value})
        return call(self, sample_collection, params, delegate)
