"""Review-loop operators: show the reference behind a prediction, add selected predictions (or
labels tagged ``not_this_class``, as negatives) to a memory bank, remove tagged references.
Each parses its form and calls :mod:`ntt_core.fiftyone.review`."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import reports
from .common import (
    bank_choice,
    call,
    check,
    check_models,
    current,
    finish,
    form,
    invalid,
    model_inputs,
    model_options,
    params_with_defaults,
    product_label,
    report_output,
    require_library,
    result,
    run_with_progress,
)

OUTSIDE_VIEW = (
    "the reference is outside your view, which is kept: the Memory banks panel's Matched reference opens it "
    "(showing the whole dataset until you close the sample, then your view again)"
)


def selected_labels(ctx) -> dict[str, list[str]]:
    """``{field: label ids}``: ``label_ids`` of ``label_field`` when given, else the App's selection."""
    if ctx.params.get("label_ids"):
        return {ctx.params["label_field"]: list(ctx.params["label_ids"])}
    found: dict[str, list[str]] = {}
    for label in ctx.selected_labels or []:
        found.setdefault(label["field"], []).append(label["label_id"])
    return found


def selected_prediction(ctx) -> tuple[str, str] | None:
    """(field, label id) of the first selected label of a field written by Segment by reference."""
    from ntt_core.fiftyone.predictions import prediction_record

    for field, ids in selected_labels(ctx).items():
        if prediction_record(ctx.dataset, field):
            return field, ids[0]
    return None


def user_view_to_restore(ctx, match: dict) -> dict | None:
    """None when the user's view holds the reference of ``match`` (see
    ``ntt_core.fiftyone.review.matched_reference``), else their view, for :func:`restore_view`:
    ``{"view": its stages as the App sent them, "view_name": its saved view or None}``."""
    if in_view(ctx.view, match):
        return None
    return {"view": ctx.request_params.get("view") or [], "view_name": ctx.request_params.get("view_name")}


def show_reference(ctx, match: dict) -> None:
    """Open the reference of ``match``, which the App's view holds, in the sample modal with its label
    selected (the App draws it highlighted while its field is shown in the sidebar)."""
    ctx.ops.open_sample(match["sample_id"])
    if match["field"]:
        label = {"label_id": match["reference_id"], "sample_id": match["sample_id"], "field": match["field"]}
        ctx.ops.set_selected_labels([{**label, "frame_number": None}])


def restore_view(ctx, user_view: dict) -> None:
    """Show the user's view again (as :func:`user_view_to_restore` gave it): their saved view, or their stages."""
    if user_view.get("view_name"):
        ctx.ops.set_view(name=user_view["view_name"])
    else:
        ctx.trigger("set_view", params={"view": user_view["view"]})


def in_view(view, match: dict) -> bool:
    """Whether the reference of ``match`` is in ``view``: its sample, and its label if it still has one
    (a patches or other generated view holds other documents, so never)."""
    if view._is_generated:
        return False
    samples = view.select(match["sample_id"])
    if match["field"] is None:
        return len(samples) == 1
    if match["field"] not in view.get_field_schema():
        return False
    return len(samples.select_labels(ids=[match["reference_id"]], fields=match["field"])) == 1


def bank_of_selection(ctx, inputs) -> types.Property:
    """A dropdown of the memory banks, defaulting to the bank that produced the selected predictions."""
    from ntt_core.fiftyone.bank_runs import list_memory_banks
    from ntt_core.fiftyone.predictions import prediction_record

    records = (prediction_record(ctx.dataset, field) or {} for field in selected_labels(ctx))
    banks = list_memory_banks(ctx.dataset)
    default = next((r["bank_key"] for r in records if r.get("bank_key") in banks), None)
    return bank_choice(inputs, ctx, default=default)


class ShowMatchedReference(foo.Operator):
    summarize = staticmethod(reports.matched_reference)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="show_matched_reference",
            label=product_label("Show matched reference"),
            description="Open the reference instance whose descriptor best matched the selected prediction",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        return form(ctx, "Show matched reference", self._form)

    def _form(self, ctx, inputs):
        found = selected_prediction(ctx)
        if found is None:
            message = "select a prediction of a 'Segment by reference' field first (in the sample modal)"
            invalid(inputs.view("no_prediction", types.Error(label=message)), message)
        else:
            inputs.view("prediction", types.Notice(label=f"Prediction {found[1]} of '{found[0]}'"))

    def execute(self, ctx):
        require_library()
        from ntt_core.fiftyone.review import matched_reference

        field, label_id = selected_prediction(ctx)
        match = matched_reference(ctx.dataset, field, label_id)
        inside = in_view(ctx.view, match)
        if inside:  # else the view is kept: asked together, the App would open it in the old view
            show_reference(ctx, match)
        return result(self, {**match, "note": None if inside else OUTSIDE_VIEW})

    def resolve_output(self, ctx):
        return report_output(ctx, "Matched reference")

    def __call__(self, sample_collection, pred_field: str, label_id: str):
        return call(self, sample_collection, dict(label_field=pred_field, label_ids=[label_id]))


class _AddReferences(foo.Operator):
    """Describe labels with a bank's encoder and add them to the bank (see subclasses for which)."""

    negative = False
    title = ""
    summarize = staticmethod(reports.bank_update)

    def resolve_input(self, ctx):
        return form(ctx, self.title, self._form)

    def _labels(self, ctx, inputs) -> dict[str, list[str]]:
        raise NotImplementedError

    def _form(self, ctx, inputs):
        from ntt_core.errors import NttError
        from ntt_core.fiftyone.bank_runs import list_memory_banks, memory_bank_info
        from ntt_core.fiftyone.fields import check_detections_field
        from ntt_core.fiftyone.review import check_not_in_bank

        bank_prop = bank_of_selection(ctx, inputs)
        labels = self._labels(ctx, inputs)
        key = current(ctx, inputs, "bank_key")
        if labels and key in list_memory_banks(ctx.dataset):
            check(bank_prop, lambda: check_not_in_bank(ctx.dataset, key, labels))
        counts: dict[str, int] = {}
        for field, ids in labels.items():
            try:
                check_detections_field(ctx.dataset, field, "label field")
            except NttError as error:
                invalid(inputs.view("label_field_problem", types.Error(label=str(error))), str(error))
                break
            found = ctx.dataset.select_labels(ids=ids, fields=field).count_values(f"{field}.detections.label")
            for name, count in found.items():
                counts[name] = counts.get(name, 0) + count
        if counts:
            role = "negative references of" if self.negative else "shots of"
            found = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
            inputs.view("found", types.Notice(label=f"{sum(counts.values())} label(s) become {role}: {found}"))
        info = memory_bank_info(ctx.dataset, key) if key in list_memory_banks(ctx.dataset) else {}
        inputs.str(
            "dinov2",
            default=info.get("encoder_id", ""),
            label="DINOv2 model",
            description="The bank's encoder (the same weights are required); a local folder if offline",
        )
        inputs.str(
            "sam2",
            default="",
            allow_empty=True,
            label="SAM2 model",
            description="Only for labels without a mask (box prompts); empty: such labels are skipped",
        )
        model_inputs(inputs, segmenter=False, encoder=False)  # device and dtype
        check_models(ctx, inputs)

    def execute(self, ctx):
        p = params_with_defaults(self, ctx)
        return run_with_progress(self, ctx, "Images", lambda progress: self._run(ctx, p, progress))

    def _run(self, ctx, p: dict, progress) -> dict:
        require_library()
        from ntt_core.fiftyone.review import add_to_memory_bank, check_not_in_bank, load_bank_models

        check_not_in_bank(ctx.dataset, p["bank_key"], self._labels(ctx, None))  # before the models load
        options = model_options(p)
        encoder, segmenter = load_bank_models(ctx.dataset, p["bank_key"], p["dinov2"], p["sam2"], **options)
        return add_to_memory_bank(
            ctx.dataset,
            p["bank_key"],
            self._labels(ctx, None),
            encoder,
            segmenter,
            negative=self.negative,
            progress=progress,
        )

    def resolve_output(self, ctx):
        return report_output(ctx, "Memory bank updated")


class AddToMemoryBank(_AddReferences):
    title = "Add selected predictions to references"

    @property
    def config(self):
        return foo.OperatorConfig(
            name="add_to_memory_bank",
            label=product_label("Add selected predictions to references"),
            description="Accepted predictions (or any selected labels) become new shots of their class in a memory bank",
            dynamic=True,
            allow_delegated_execution=True,
            execute_as_generator=True,  # immediate runs from the App stream their progress
        )

    def _labels(self, ctx, inputs):
        labels = selected_labels(ctx)
        if not labels and inputs is not None:
            message = "no label selected: select accepted predictions in the App first (sample modal or patches view)"
            invalid(inputs.view("no_selection", types.Error(label=message)), message)
        return labels

    def __call__(self, sample_collection, bank_key: str, label_field: str, label_ids, **options):
        """Add labels ``label_ids`` of ``label_field`` to ``bank_key`` as shots; ``options``: dinov2
        (default: the bank's encoder), sam2, device, dtype."""
        params = dict(bank_key=bank_key, label_field=label_field, label_ids=list(label_ids), **options)
        return call(self, sample_collection, params)


class AddNegativeReferences(_AddReferences):
    negative = True
    title = "Add negative references"

    @property
    def config(self):
        return foo.OperatorConfig(
            name="add_negative_references",
            label=product_label("Add 'not_this_class' labels as negative references"),
            description="Labels tagged not_this_class (e.g. false positives) damp look-alikes of their class",
            dynamic=True,
            allow_delegated_execution=True,
            execute_as_generator=True,  # immediate runs from the App stream their progress
        )

    def _labels(self, ctx, inputs):
        require_library()
        from ntt_core.fiftyone.review import NEGATIVE_TAG, tagged_labels

        if inputs is not None:
            inputs.str(
                "tag",
                default=NEGATIVE_TAG,
                label="Tag",
                description="Labels with this tag are instances that are NOT of the class in their label",
            )
            tag = current(ctx, inputs, "tag")
        else:
            tag = ctx.params.get("tag") or NEGATIVE_TAG
        labels = tagged_labels(ctx.dataset, tag)
        if not labels and inputs is not None:
            message = f"no label is tagged '{tag}': tag false-positive predictions with it in the App first"
            invalid(inputs.properties["tag"], message)
        return labels

    def __call__(self, sample_collection, bank_key: str, tag: str = "not_this_class", **options):
        """Add the labels tagged ``tag`` to ``bank_key`` as negative references; ``options`` as for adding shots."""
        return call(self, sample_collection, dict(bank_key=bank_key, tag=tag, **options))


class RemoveFromMemoryBank(foo.Operator):
    summarize = staticmethod(reports.bank_update)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="remove_from_memory_bank",
            label=product_label("Remove tagged references"),
            description="Remove the memory bank entries whose labels carry a tag (remove_reference)",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        return form(ctx, "Remove tagged references", self._form)

    def _form(self, ctx, inputs):
        require_library()
        from ntt_core.fiftyone.review import REMOVE_TAG, tagged_labels

        bank_of_selection(ctx, inputs)
        tag_prop = inputs.str("tag", default=REMOVE_TAG, label="Tag", description="Labels to remove carry this tag")
        tag = current(ctx, inputs, "tag")
        tagged = tagged_labels(ctx.dataset, tag)
        if not tagged:
            invalid(tag_prop, f"no label is tagged '{tag}': tag the references to remove in the App first")
        else:
            found = ", ".join(f"{field}: {len(ids)}" for field, ids in sorted(tagged.items()))
            inputs.view("found", types.Notice(label=f"Labels tagged '{tag}': {found}"))

    def execute(self, ctx):
        require_library()
        from ntt_core.fiftyone.review import remove_from_memory_bank, tagged_labels

        p = params_with_defaults(self, ctx)
        ids = [i for ids in tagged_labels(ctx.dataset, p["tag"]).values() for i in ids]
        return finish(self, ctx, remove_from_memory_bank(ctx.dataset, p["bank_key"], ids))

    def resolve_output(self, ctx):
        return report_output(ctx, "Memory bank updated")

    def __call__(self, sample_collection, bank_key: str, tag: str = "remove_reference"):
        return call(self, sample_collection, dict(bank_key=bank_key, tag=tag))
