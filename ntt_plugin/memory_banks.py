"""Operators that build, export, import and delete memory banks."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import reports
from .common import (
    bank_choice,
    call,
    check,
    check_models,
    count_input,
    current,
    field_choice,
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
    timed_progress,
)

MODES = {
    "label_tag": "Labels with a tag (instance by instance)",
    "sample_tag": "Every label of the chosen classes in samples with a tag",
    "label_ids": "The labels selected in the App",
}


def selected_label_ids(ctx, gt_field: str) -> list[str]:
    """Ids of the labels of ``gt_field`` passed as ``label_ids``, else those selected in the App."""
    if ctx.params.get("label_ids"):
        return list(ctx.params["label_ids"])
    return [label["label_id"] for label in ctx.selected_labels or [] if label.get("field") == gt_field]


class BuildMemoryBank(foo.Operator):
    summarize = staticmethod(reports.build)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="build_memory_bank",
            label=product_label("Build memory bank from reference instances"),
            description="Describe tagged or selected ground-truth instances with DINOv2 and store them as a named memory bank",
            dynamic=True,
            allow_delegated_execution=True,
            execute_as_generator=True,  # immediate runs from the App stream their progress
        )

    def resolve_input(self, ctx):
        return form(ctx, "Build memory bank", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.bank_runs import DEFAULT_BANK_KEY, check_bank_key
        from ntt_core.fiftyone.fields import detections_fields
        from ntt_core.fiftyone.references import DEFAULT_REFERENCE_TAG

        target = ctx.target_view()
        fields = detections_fields(ctx.dataset)
        field_choice(inputs, "gt_field", fields, "Ground-truth field", "The Detections field holding the references")
        modes = types.RadioGroup()
        for value, text in MODES.items():
            modes.add_choice(value, label=text)
        inputs.enum("reference_mode", modes.values(), default="label_tag", label="References", view=modes)
        mode = current(ctx, inputs, "reference_mode")
        if mode != "label_ids":
            inputs.str("tag", default=DEFAULT_REFERENCE_TAG, label="Tag", description="The tag references carry")
        inputs.list("classes", types.String(), label="Classes", description="Classes to include (empty: all)")
        gt_field = current(ctx, inputs, "gt_field")
        chosen = None
        if gt_field in fields:  # the counts right after the choices they follow
            chosen = self._counts(ctx, inputs, target, gt_field, mode)
        count_input(ctx, inputs, "max_per_class", "Max references per class", description="First ones in dataset order")
        key_prop = inputs.str("bank_key", default=DEFAULT_BANK_KEY, label="Memory bank name")
        inputs.bool("overwrite", default=False, label="Overwrite a bank of that name")
        model_inputs(inputs)
        check_models(ctx, inputs)
        key, overwrite = current(ctx, inputs, "bank_key"), current(ctx, inputs, "overwrite")
        check(key_prop, lambda: check_bank_key(ctx.dataset, key, overwrite))
        if chosen is not None:
            self._estimate(ctx, inputs, target, gt_field, chosen)

    def _counts(self, ctx, inputs, target, gt_field: str, mode: str) -> dict | None:
        """References found per class, or the error under the field it is about (the classes, else
        the tag, else the field); returns the references' choice, None on an error."""
        from ntt_core.errors import NttError
        from ntt_core.fiftyone.references import ClassesNotFoundError, count_references

        chosen = dict(
            mode=mode,
            tag=current(ctx, inputs, "tag"),
            label_ids=selected_label_ids(ctx, gt_field),
            classes=ctx.params.get("classes"),
        )
        try:
            counts = count_references(target, gt_field, **chosen)
        except NttError as error:
            about = (
                "classes" if isinstance(error, ClassesNotFoundError) else "tag" if mode != "label_ids" else "gt_field"
            )
            invalid(inputs.properties[about], str(error))
            return None
        found = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
        inputs.view("found", types.Notice(label=f"References found per class: {found}"))
        return chosen

    def _estimate(self, ctx, inputs, target, gt_field: str, chosen: dict) -> None:
        """How long describing the references takes on the chosen device, from the kept figure per
        reference image (see ``ntt_core.fiftyone.timings``), or that none exists yet."""
        from ntt_core.fiftyone.references import reference_view
        from ntt_core.fiftyone.timings import BUILD, estimate, timing_key

        images = len(reference_view(target, gt_field, **chosen))  # what the run's progress counts
        models = [current(ctx, inputs, name) for name in ("sam2", "dinov2")]
        key = timing_key(current(ctx, inputs, "device"), *models, BUILD, current(ctx, inputs, "dtype"))
        inputs.view("estimate", types.Notice(label=estimate(key, images)[1]))

    def execute(self, ctx):
        p = params_with_defaults(self, ctx)
        return run_with_progress(self, ctx, "Reference images", lambda progress: self._run(ctx, p, progress))

    def _run(self, ctx, p: dict, progress) -> dict:
        require_library()
        from ntt_core.fiftyone.building import build_dataset_memory_bank
        from ntt_core.fiftyone.references import DEFAULT_REFERENCE_TAG
        from ntt_core.fiftyone.timings import BUILD, timing_key
        from ntt_core.models import load_encoder, load_segmenter, segmenter_source

        options = model_options(p)
        progress = timed_progress(progress, timing_key(p["device"], p["sam2"], p["dinov2"], BUILD, p["dtype"]))
        encoder = load_encoder(p["dinov2"] or None, **options)
        return build_dataset_memory_bank(
            ctx.target_view(),
            p["bank_key"],
            p["gt_field"],
            None,  # SAM2 is loaded only for references without a mask
            encoder,
            load_segmenter=lambda: load_segmenter(p["sam2"] or None, **options),
            segmenter_id=segmenter_source(p["sam2"] or None),
            mode=p["reference_mode"],
            tag=p.get("tag", DEFAULT_REFERENCE_TAG),
            label_ids=selected_label_ids(ctx, p["gt_field"]),
            classes=p.get("classes"),
            max_per_class=p.get("max_per_class"),
            overwrite=p["overwrite"],
            progress=progress,
        )

    def resolve_output(self, ctx):
        return report_output(ctx, "Memory bank")

    def __call__(
        self,
        sample_collection,
        gt_field: str,
        bank_key: str | None = None,
        reference_mode: str = "label_tag",
        tag: str | None = None,
        label_ids=None,
        classes=None,
        max_per_class: int | None = None,
        sam2: str = "",
        dinov2: str = "",
        device: str = "auto",
        dtype: str = "auto",
        overwrite: bool = False,
        delegate: bool = False,
    ):
        """Build a memory bank from ``sample_collection``; returns the report (or the queued operation)."""
        params = dict(
            gt_field=gt_field,
            bank_key=bank_key,
            reference_mode=reference_mode,
            tag=tag,
            label_ids=list(label_ids or []),
            classes=list(classes or []),
            max_per_class=max_per_class,
            sam2=sam2,
            dinov2=dinov2,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
        )
        return call(self, sample_collection, {k: v for k, v in params.items() if v is not None}, delegate)


class ExportMemoryBank(foo.Operator):
    summarize = staticmethod(reports.exported)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="export_memory_bank",
            label=product_label("Export memory bank"),
            description="Write a stored memory bank to a folder (manifest.json + features.safetensors)",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        return form(ctx, "Export memory bank", self._form)

    def _form(self, ctx, inputs):
        bank_choice(inputs, ctx)
        inputs.str("directory", required=True, label="Folder", description="A new or empty folder on the server")

    def execute(self, ctx):
        require_library()
        from ntt_core.fiftyone.bank_runs import export_memory_bank

        p = params_with_defaults(self, ctx)
        path = export_memory_bank(ctx.dataset, p["bank_key"], p["directory"])
        return result(self, {"bank_key": p["bank_key"], "directory": str(path)})

    def resolve_output(self, ctx):
        return report_output(ctx, "Exported")

    def __call__(self, sample_collection, bank_key: str, directory: str):
        return call(self, sample_collection, dict(bank_key=bank_key, directory=str(directory)))


class ImportMemoryBank(foo.Operator):
    summarize = staticmethod(reports.imported)

    @property
    def config(self):
        return foo.OperatorConfig(
            name="import_memory_bank",
            label=product_label("Import memory bank"),
            description="Read a memory bank folder (exported from any dataset, or written by the CLI) into this dataset",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        return form(ctx, "Import memory bank", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.bank_runs import check_bank_key

        inputs.str(
            "directory", required=True, label="Folder", description="Holds manifest.json and features.safetensors"
        )
        key_prop = inputs.str(
            "bank_key",
            default="",
            allow_empty=True,
            label="Memory bank name",
            description="Empty: the folder's name, as the bank was exported",
        )
        inputs.bool("overwrite", default=False, label="Overwrite a bank of that name")
        key, overwrite = _import_key(ctx.params), current(ctx, inputs, "overwrite")
        if check(key_prop, lambda: check_bank_key(ctx.dataset, key, overwrite)) is None and not key_prop.invalid:
            inputs.view("name", types.Notice(label=f"Imported as memory bank '{key}'"))

    def execute(self, ctx):
        require_library()
        from ntt_core.fiftyone.bank_runs import import_memory_bank

        p = params_with_defaults(self, ctx)
        key = _import_key(p)
        bank = import_memory_bank(ctx.dataset, key, p["directory"], overwrite=p["overwrite"])
        return finish(self, ctx, {"bank_key": key, "classes": list(bank.classes), "counts": bank.counts()})

    def resolve_output(self, ctx):
        return report_output(ctx, "Imported")

    def __call__(self, sample_collection, directory: str, bank_key: str = "", overwrite: bool = False):
        """Import the bank in ``directory``, named ``bank_key`` (empty: the folder's name)."""
        return call(self, sample_collection, dict(directory=str(directory), bank_key=bank_key, overwrite=overwrite))


def _import_key(params: dict) -> str:
    from ntt_core.fiftyone.bank_runs import imported_bank_key

    return params.get("bank_key") or imported_bank_key(params.get("directory"))


class DeleteMemoryBank(foo.Operator):
    summarize = staticmethod(reports.deleted)

    @property
    def config(self):
        return foo.OperatorConfig(name="delete_memory_bank", label=product_label("Delete memory bank"), dynamic=True)

    def resolve_input(self, ctx):
        return form(ctx, "Delete memory bank", self._form)

    def _form(self, ctx, inputs):
        from ntt_core.fiftyone.bank_runs import list_memory_banks, memory_bank_info

        bank_choice(inputs, ctx)
        key = current(ctx, inputs, "bank_key")
        if key in list_memory_banks(ctx.dataset):
            entries = memory_bank_info(ctx.dataset, key).get("num_references")
            warning = (
                f"Deletes memory bank '{key}' ({entries} entries) from this dataset: this cannot be undone "
                "(Export keeps a copy). Labels and predictions stay as they are."
            )
            inputs.view("confirm", types.Warning(label=warning))

    def execute(self, ctx):
        require_library()
        from ntt_core.fiftyone.bank_runs import delete_memory_bank

        key = params_with_defaults(self, ctx)["bank_key"]
        delete_memory_bank(ctx.dataset, key)
        return finish(self, ctx, {"deleted": key})

    def resolve_output(self, ctx):
        return report_output(ctx, "Deleted")

    def __call__(self, sample_collection, bank_key: str):
        return call(self, sample_collection, dict(bank_key=bank_key))
