"""The Memory banks panel: every bank of the dataset with its models, classes, shots, reference
thumbnails and leave-one-out threshold suggestions, and buttons for the workflow's actions.

The buttons open the operators' forms pre-filled (``ctx.prompt``), so every action stays an
operator that runs, and fails, the way it does from the operator browser. Rendering imports
the library (and torch) only when the panel opens, never when the plugin is listed.
"""

from __future__ import annotations

import functools

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from .common import LibraryMissingError, require_library
from .review import in_view, restore_view, selected_prediction, show_reference, user_view_to_restore

PLUGIN = "@ntt/no-time-to-train"
PREVIEW_FIELD = "ntt_preview"
EMPTY_STATE = (
    "No memory bank yet: open a sample, click a few ground-truth instances of each class you want, "
    "give them the label tag `reference` (tag icon, Labels), then click **Build memory bank**."
)
THRESHOLD_NOTE = (
    "Suggested thresholds come from the references themselves (leave-one-out: each reference scored "
    "against the bank without it; 10th percentile of each class, rounded down). They are not applied: "
    "use one as *Score threshold* in Segment by reference, or filter `confidence` in the sidebar."
)
REVIEW_HELP = (
    "Review: select a prediction and click **Matched reference**; select accepted predictions and click "
    "**Accept selected** (they become shots); tag false positives `not_this_class` and click "
    "**Add negatives**; tag references `remove_reference` and click **Remove tagged**."
)
STOP_NOTE = (
    "Stop requested: the run stops after the image it is on and keeps every sample written so far. "
    "To resume, run Segment by reference into the same field with 'Skip samples that already have predictions'."
)
BACK_NOTE = (
    "Matched reference: it is outside your view, so the App shows the whole dataset; closing the sample "
    "(or Back to my view) shows your view again."
)
OUTSIDE_VIEW_IN_MODAL = (
    "Matched reference: it is outside your view. Close the sample (your selection stays) and click "
    "Matched reference in this panel next to the grid: it shows the whole dataset until you close the "
    "reference, then your view again."
)
THUMBNAILS_PER_CLASS = 8


def operator_uri(name: str) -> str:
    return f"{PLUGIN}/{name}"


@functools.lru_cache(maxsize=8)
def cached_overview(dataset_name: str, key: str, sha256: str) -> dict:
    """The bank's overview with thumbnails, cached per stored bank version (``sha256``)."""
    require_library()
    from ntt_core.fiftyone.review import bank_overview

    return bank_overview(fo.load_dataset(dataset_name), key, per_class=THUMBNAILS_PER_CLASS)


class MemoryBanksPanel(foo.Panel):
    @property
    def config(self):
        return foo.PanelConfig(
            name="memory_banks",
            label="Memory banks",
            icon="collections_bookmark",
            surfaces="grid modal",
            help_markdown="Reference-based segmentation (No Time to Train!): memory banks, references, review.",
        )

    # --- events: each one is followed by render() ---

    def on_load(self, ctx):
        ctx.panel.state.message = None

    def on_change_view(self, ctx):
        """Once the App shows the whole dataset that Matched reference asked for, open the reference."""
        return_to = ctx.panel.get_state("return_to")
        whole_dataset = ctx.params.get("value") == []  # the view's own event (the App also sends others)
        if return_to and return_to["step"] == "pending" and whole_dataset and in_view(ctx.view, return_to["match"]):
            ctx.panel.state.return_to = {**return_to, "step": "shown"}
            show_reference(ctx, return_to["match"])

    def on_change_dataset(self, ctx):
        ctx.panel.state.message = None

    def on_change_selected(self, ctx):
        pass  # re-render: the preview button depends on the selection

    def on_change_selected_labels(self, ctx):
        pass  # re-render: the review buttons depend on the selected labels

    def on_change_current_sample(self, ctx):
        """Re-render (the layout keeps clear of the sample modal's arrows while it is open); once the
        reference that Matched reference opened outside the user's view is closed, their view again."""
        return_to = ctx.panel.get_state("return_to")
        if return_to and return_to["step"] == "shown" and ctx.params.get("value") is None:
            self.back_to_view(ctx)

    def back_to_view(self, ctx):
        restore_view(ctx, ctx.panel.get_state("return_to"))
        ctx.panel.state.return_to = None
        ctx.panel.state.message = None

    def refresh(self, ctx):
        cached_overview.cache_clear()
        ctx.panel.state.message = None

    def build(self, ctx):
        ctx.prompt(operator_uri("build_memory_bank"), on_success=self.refresh)

    def segment(self, ctx):
        ctx.prompt(operator_uri("segment_by_reference"), params=self._models(ctx), on_success=self.refresh)

    def preview(self, ctx):
        params = {
            **self._models(ctx),
            "pred_field": PREVIEW_FIELD,
            "overwrite": True,
            "view_target": "SELECTED_SAMPLES",
        }
        ctx.prompt(operator_uri("segment_by_reference"), params=params, on_success=self.refresh)

    def add_selected(self, ctx):
        ctx.prompt(operator_uri("add_to_memory_bank"), params=self._bank(ctx), on_success=self.refresh)

    def add_negatives(self, ctx):
        ctx.prompt(operator_uri("add_negative_references"), params=self._bank(ctx), on_success=self.refresh)

    def remove_tagged(self, ctx):
        ctx.prompt(operator_uri("remove_from_memory_bank"), params=self._bank(ctx), on_success=self.refresh)

    def delete(self, ctx):
        ctx.prompt(operator_uri("delete_memory_bank"), params=self._bank(ctx), on_success=self.refresh)

    def export(self, ctx):
        ctx.prompt(operator_uri("export_memory_bank"), params=self._bank(ctx), on_success=self.refresh)

    def import_bank(self, ctx):
        ctx.prompt(operator_uri("import_memory_bank"), on_success=self.refresh)

    def clear_cache(self, ctx):
        ctx.prompt(operator_uri("clear_candidate_cache"), on_success=self.refresh)

    def stop_run(self, ctx):
        require_library()
        from ntt_core.fiftyone.stops import request_stop

        request_stop(ctx.dataset, ctx.params["operation_id"])
        ctx.panel.state.message = STOP_NOTE

    def show_matched_reference(self, ctx):
        try:
            require_library()
        except LibraryMissingError as error:
            ctx.panel.state.message = f"Show matched reference: {error}"
            return
        from ntt_core.errors import NttError
        from ntt_core.fiftyone.review import matched_reference

        found = selected_prediction(ctx)
        if found is None:
            message = "select a prediction of a 'Segment by reference' field first (in the sample modal)"
            ctx.panel.state.message = f"Show matched reference: {message}"
            return
        try:
            self._show(ctx, matched_reference(ctx.dataset, *found))
        except NttError as error:
            ctx.panel.state.message = f"Show matched reference: {error}"

    def open_reference(self, ctx):
        match = {name: ctx.params.get(name) for name in ("sample_id", "reference_id", "field")}
        self._show(ctx, match)

    def _show(self, ctx, match: dict) -> None:
        """Open the reference of ``match`` in the modal. When it is outside the user's view, the App
        is first asked to show the whole dataset, and on_change_view opens the reference once it does
        (asked together, the App would look for it in the old view); from the sample modal, where
        that change would close the modal and this panel with it, the message says what to do."""
        user_view = user_view_to_restore(ctx, match)
        ctx.panel.state.return_to = None
        if user_view is None:
            ctx.panel.state.message = None
            show_reference(ctx, match)
        elif ctx.current_sample:
            ctx.panel.state.message = OUTSIDE_VIEW_IN_MODAL
        else:
            ctx.panel.state.return_to = {**user_view, "match": match, "step": "pending"}
            ctx.panel.state.message = BACK_NOTE
            ctx.ops.set_view(ctx.dataset.view())

    def _bank(self, ctx) -> dict:
        return {"bank_key": ctx.params.get("bank_key")}

    def _models(self, ctx) -> dict:
        """The bank key and the models the bank was built with (the encoder must match; a bank
        without a SAM2 id leaves the form's default)."""
        require_library()
        from ntt_core.fiftyone.bank_runs import memory_bank_info

        info = memory_bank_info(ctx.dataset, ctx.params.get("bank_key"))
        segmenter = {"sam2": info["segmenter_id"]} if info.get("segmenter_id") else {}
        return {"bank_key": info["key"], **segmenter, "dinov2": info["encoder_id"]}

    # --- layout ---

    def render(self, ctx):
        panel = types.Object()
        actions = panel.h_stack("actions", gap=1)
        actions.btn("build", label="Build memory bank", on_click=self.build, variant="contained")
        actions.btn("import_bank", label="Import", on_click=self.import_bank)
        _button(
            actions,
            "show_matched_reference",
            "Matched reference",
            self.show_matched_reference,
            None if ctx.selected_labels else NEEDS_PREDICTION,
        )
        actions.btn("refresh", label="Refresh", on_click=self.refresh)
        if ctx.panel.get_state("return_to"):
            panel.btn("back_to_view", label="Back to my view", on_click=self.back_to_view)
        _why_disabled(panel, "actions_disabled", [None if ctx.selected_labels else NEEDS_PREDICTION])
        message = ctx.panel.get_state("message")
        if message:
            panel.view("message", types.Warning(label=message))
        try:
            require_library()
        except LibraryMissingError as error:
            panel.view("library_missing", types.Error(label="The ntt_core library is missing", description=str(error)))
            return _layout(ctx, panel)
        from ntt_core.fiftyone.bank_runs import list_memory_banks

        self._render_running(ctx, panel)
        banks = list_memory_banks(ctx.dataset)
        if not banks:
            panel.md(EMPTY_STATE, name="empty")
        for index, key in enumerate(banks):
            self._render_bank(ctx, panel, f"bank_{index}", key)
        self._render_cache(panel)
        if banks:
            panel.md(THRESHOLD_NOTE, name="threshold_note")
            panel.md(REVIEW_HELP, name="review_help")
        return _layout(ctx, panel)

    def _render_running(self, ctx, panel) -> None:
        """The scheduled segmentations a worker is running, each with its progress and a stop button."""
        from ntt_core.fiftyone.stops import running_segmentations

        for index, run in enumerate(running_segmentations(ctx.dataset)):
            row = panel.h_stack(f"running_{index}", gap=1, align_y="center")
            row.md(f"**Running:** {run['label']}: {run['progress'] or 'starting'}", name="progress")
            row.btn(
                "stop",
                label="Stop requested" if run["stop_requested"] else "Stop after this image",
                on_click=self.stop_run,
                params={"operation_id": run["id"]},
                disabled=run["stop_requested"],
            )

    def _render_cache(self, panel) -> None:
        """The candidate cache's size and the action that empties it."""
        from .candidate_cache import cache_summary

        row = panel.h_stack("candidate_cache", gap=1, align_y="center")
        row.md(cache_summary(), name="size")
        row.btn("clear_cache", label="Clear cache", on_click=self.clear_cache)

    def _render_bank(self, ctx, panel, name: str, key: str) -> None:
        from ntt_core.errors import NttError
        from ntt_core.fiftyone.bank_runs import memory_bank_info

        try:
            sha256 = memory_bank_info(ctx.dataset, key)["sha256"]
            overview = cached_overview(ctx.dataset.name, key, sha256)
        except NttError as error:  # a damaged bank: say so, offer deletion
            panel.view(
                f"{name}_error", types.Error(label=f"Memory bank '{key}' cannot be read", description=str(error))
            )
            overview = None
        else:
            panel.md(summary_markdown(overview), name=f"{name}_summary")
            for index, entry in enumerate(overview["classes"]):
                self._render_thumbnails(panel, f"{name}_class_{index}", entry)
        # short labels in rows of at most four, so that a split layout or the modal's tab does not wrap them
        buttons = panel.h_stack(f"{name}_actions", gap=1)
        on = {"bank_key": key}
        reasons = []
        if overview is not None:
            buttons.btn("segment", label="Segment view", on_click=self.segment, params=on, variant="contained")
            reasons.append(None if ctx.selected else NEEDS_SAMPLES)
            _button(buttons, "preview", "Preview selected", self.preview, reasons[-1], params=on)
            buttons.btn("export", label="Export", on_click=self.export, params=on)
        buttons.btn("delete", label="Delete", on_click=self.delete, params=on)
        if overview is not None:
            review = panel.h_stack(f"{name}_review", gap=1)
            reasons.append(None if ctx.selected_labels else NEEDS_LABELS)
            _button(review, "add_selected", "Accept selected", self.add_selected, reasons[-1], params=on)
            review.btn("add_negatives", label="Add negatives", on_click=self.add_negatives, params=on)
            review.btn("remove_tagged", label="Remove tagged", on_click=self.remove_tagged, params=on)
        _why_disabled(panel, f"{name}_disabled", reasons)

    def _render_thumbnails(self, panel, name: str, entry: dict) -> None:
        row = panel.h_stack(name, gap=1, align_y="center")
        row.md(f"**{entry['name']}**", name="class_name")
        for index, thumb in enumerate(entry["thumbnails"]):
            kind = "negative reference" if thumb["negative"] else "reference"
            row.define_property(
                f"thumbnail_{index}",
                types.String(),
                default=thumb["src"],
                view=types.ImageView(
                    height="64px",
                    alt=f"{entry['name']} {kind} {thumb['reference_id']}",
                    operator=self.open_reference,
                    params={k: thumb[k] for k in ("sample_id", "reference_id", "field")},
                ),
            )
        if entry["more"]:
            row.md(f"+{entry['more']} more", name="more")


NEEDS_PREDICTION = "Show matched reference: select a prediction in the sample modal first"
NEEDS_SAMPLES = "Preview: select samples in the grid first"
NEEDS_LABELS = "Add selected predictions: select predictions (sample modal or patches view) first"


MODAL_ARROWS_PAD = 7  # layout units of 8 px: the modal's previous/next buttons (about 42 px) sit over its sides


def _layout(ctx, panel) -> types.Property:
    """The panel's rows top to bottom; in the sample modal's tab (a sample is open), with room on
    each side for the modal's previous/next sample buttons, which the App draws over the tab."""
    room = {"pad_x": MODAL_ARROWS_PAD} if ctx.current_sample else {}
    return types.Property(panel, view=types.GridView(orientation="vertical", **room))


def _button(row, name: str, label: str, on_click, why_disabled: str | None, **options) -> None:
    """A button that is disabled when ``why_disabled`` says why (shown as its tooltip)."""
    row.btn(name, label=label, on_click=on_click, disabled=why_disabled is not None, title=why_disabled, **options)


def _why_disabled(panel, name: str, reasons: list[str | None]) -> None:
    """One line under a row of buttons saying why the disabled ones are disabled."""
    shown = [reason for reason in reasons if reason]
    if shown:
        panel.md("*" + "; ".join(shown) + ".*", name=name)


def summary_markdown(overview: dict) -> str:
    """A bank's header, models, source and per-class table (shots, negatives, suggested threshold)."""
    fields = overview.get("source_fields") or {}
    if fields:  # every field its entries are labels of: ground truth, accepted predictions
        source = ", ".join(f"`{field}` ({count})" for field, count in fields.items())
    else:
        source = f"`{overview['gt_field']}`" if overview["gt_field"] else "an imported folder"
    if overview.get("tag"):
        source += f"; built from label tag `{overview['tag']}`"
    segmenter = f"SAM2 `{overview['segmenter_id']}`" if overview["segmenter_id"] else "no SAM2 (masks given)"
    lines = [
        f"### Memory bank `{overview['key']}`",
        "",
        f"DINOv2 `{overview['encoder_id']}` at {overview['encoder_input_size']} px, {segmenter}; "
        f"{overview['num_references']} entries from {source}; stored {overview['timestamp'][:19]}.",
        "",
        "| Class | Shots | Negatives | Suggested threshold | Leave-one-out scores |",
        "|---|---|---|---|---|",
    ]
    for entry in overview["classes"]:
        scores = entry["scores"]
        spread = f"{min(scores):.3f} – {max(scores):.3f}" if scores else "–"
        threshold = "–" if entry["threshold"] is None else f"{entry['threshold']:.2f}"
        if entry["note"]:
            threshold += f" ({entry['note']})"
        lines.append(f"| {entry['name']} | {entry['shots']} | {entry['negatives']} | {threshold} | {spread} |")
    if overview["not_found"]:
        lines += ["", f"{overview['not_found']} entries have no label in this dataset any more (no thumbnail)."]
    return "\n".join(lines)
