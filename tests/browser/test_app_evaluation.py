"""Predicted masks, evaluation and memory banks in the App: the grid, the Evaluate operator from its
form, FiftyOne's Model Evaluation panel on its result, and the plugin's Memory banks panel, each
checked against the SDK.

The memory bank and the predictions come from the library's stand-in models (``ntt_core.standins``:
colour regions and colour-histogram features, meaningful on generated scenes only), run through the
SDK: random weights would give a mAP of about 0, which would not show whether the panel's figure is
the SDK's.
"""

from __future__ import annotations

import contextlib
import re

import fiftyone as fo
import pytest
from app_pages import expect, filter_reset_and_open
from fiftyone import ViewField as F
from fiftyone_scenes import scenes_dataset

from ntt_core.fiftyone.bank_runs import load_memory_bank
from ntt_core.fiftyone.building import build_dataset_memory_bank
from ntt_core.fiftyone.predictions import segment_by_reference
from ntt_core.fiftyone.references import DEFAULT_REFERENCE_TAG
from ntt_core.fiftyone.review import matched_reference
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """Eight generated scenes (two references per class) with the stand-in memory bank ``references``
    and stand-in predictions in ``ntt_predictions``."""
    dataset = scenes_dataset(tmp_path_factory.mktemp("predicted"), count=8, size=(192, 256), references=2)
    dataset.name = "browser-evaluation"
    dataset.app_config.color_scheme = fo.ColorScheme(color_by="value")  # one colour per class
    dataset.save()
    segmenter = ConnectedRegionSegmenter(input_size=256, mask_size=64)
    encoder = ColourStatsEncoder(input_size=112, grid_size=14)
    build_dataset_memory_bank(dataset, "references", "gt", segmenter, encoder)
    settings = Settings(points_per_side=12)
    segment_by_reference(dataset, "references", "ntt_predictions", segmenter, encoder, settings=settings)
    yield dataset
    dataset.delete()


@pytest.fixture
def dataset(predicted, request):
    """A copy of ``predicted`` for one test: the App keeps its panel layout per dataset."""
    copy = predicted.clone(f"browser-{request.node.name.replace('_', '-')}")
    yield copy
    copy.delete()


def add_false_positives(dataset, count: int) -> None:
    """Relabel one prediction to a wrong class in each of ``count`` samples without references
    (which the evaluation keeps): the stand-ins make no false positives on these scenes."""
    with_references = dataset.filter_labels("gt", F("tags").contains(DEFAULT_REFERENCE_TAG)).values("id")
    classes = sorted(dataset.distinct("gt.detections.label"))
    for sample in dataset.exclude(with_references).limit(count):
        wrong = sample.ntt_predictions.detections[0]
        wrong.label = classes[(classes.index(wrong.label) + 1) % len(classes)]
        sample.save()


def false_positive_samples(dataset, eval_key: str) -> int:
    """Samples of the evaluation's view with a false-positive prediction (what the panel's FP view shows)."""
    view = dataset.load_evaluation_view(eval_key)
    return len(view.filter_labels("ntt_predictions", F(eval_key) == "fp"))


def test_memory_banks_panel_shows_the_bank_with_its_references(app, dataset):
    counts = load_memory_bank(dataset, "references").counts()
    app.open(dataset)
    app.sidebar_checkbox("gt").click()  # predicted masks only
    app.page.mouse.move(0, 0)
    app.screenshot_samples("predicted-masks")
    app.sidebar_checkbox("gt").click()

    app.page.set_viewport_size({"width": 1600, "height": 900})  # room for the panel's table
    app.open_panel("memory_banks")
    panel = app.page.get_by_test_id("panel-content-memory_banks")
    expect(panel.get_by_role("heading", name="Memory bank references")).to_be_visible()
    for name, shots in counts.items():
        row = panel.get_by_role("row").filter(has=app.page.get_by_role("cell", name=name, exact=True))
        expect(row.get_by_role("cell").nth(1)).to_have_text(str(shots))
        thumbnails = panel.get_by_role("img", name=re.compile(rf"^{name} reference "))
        expect(thumbnails).to_have_count(shots)
    app.page.wait_for_timeout(500)  # the thumbnails finish decoding
    app.screenshot("panel", panel)

    panel.get_by_role("button", name="Build memory bank").click()
    prompt = app.page.get_by_test_id("operators-prompt-modal")
    expect(prompt.get_by_text("Build memory bank", exact=True)).to_be_visible()
    prompt.get_by_role("button", name="Cancel").click()


PANEL_ROWS = (  # the panel's rows of buttons, each on one line
    ("Build memory bank", "Import", "Matched reference", "Refresh"),
    ("Segment view", "Preview selected", "Export", "Delete"),
    ("Accept selected", "Add negatives", "Remove tagged"),
)


def assert_rows_fit(panel) -> None:
    """Each row of the panel's buttons on one line, every button's label on one line, nothing past
    the panel's right edge."""
    right = panel.bounding_box()["x"] + panel.bounding_box()["width"]
    for row in PANEL_ROWS:
        boxes = [panel.get_by_role("button", name=name, exact=True).bounding_box() for name in row]
        assert len({round(box["y"]) for box in boxes}) == 1, f"the row {row} wraps: {boxes}"
        assert max(box["height"] for box in boxes) < 40, f"a label of {row} wraps: {boxes}"
        assert max(box["x"] + box["width"] for box in boxes) <= right + 0.5, f"{row} is cut off: {boxes}"
    overflow = panel.evaluate("(node) => node.scrollWidth - node.clientWidth")
    assert overflow <= 0, f"the panel scrolls sideways by {overflow} px"


def test_memory_banks_panel_fits_a_split_layout(app, dataset):
    app.open(dataset)  # 1280 x 800: the panel opens next to the grid, in half of it
    app.open_panel("memory_banks")
    panel = app.page.get_by_test_id("panel-content-memory_banks")
    expect(panel.get_by_role("table")).to_be_visible()
    grid = app.grid.bounding_box()
    assert panel.bounding_box()["width"] < 600 and panel.bounding_box()["x"] >= grid["x"] + grid["width"] - 1
    assert_rows_fit(panel)
    app.page.wait_for_timeout(500)  # the thumbnails finish decoding
    app.screenshot("split")


def test_memory_banks_panel_in_the_sample_modal_keeps_clear_of_its_arrows(app, dataset):
    app.open(dataset)
    modal = app.open_sample(1)  # a middle sample: both the previous and the next arrow
    modal.get_by_test_id("panel-tab-memory_banks").click()
    panel = app.page.get_by_test_id("panel-content-memory_banks")
    expect(panel.get_by_role("table")).to_be_visible()
    arrows = [app.page.get_by_test_id(f"nav-{side}-button").locator("xpath=..") for side in ("left", "right")]
    left, right = (arrow.bounding_box() for arrow in arrows)  # the buttons the App draws over the tab
    content = [*panel.get_by_role("button").all(), panel.get_by_role("table"), *panel.get_by_role("img").all()]
    for element in content:
        box = element.bounding_box()
        assert left["x"] + left["width"] <= box["x"] and box["x"] + box["width"] <= right["x"], (
            f"{element} {box} is under a sample arrow ({left}, {right})"
        )
    assert_rows_fit(panel)
    app.page.wait_for_timeout(500)  # the thumbnails finish decoding
    app.screenshot("modal-tab", modal)
    modal.get_by_test_id("panel-tab-fo-sample-modal-plugin").click()  # back to the sample: it still draws
    expect(modal.locator("[canvas-loaded='true']")).to_have_count(1)


def test_evaluate_opens_in_the_model_evaluation_panel_with_the_sdk_map(app, dataset):
    add_false_positives(dataset, 2)
    app.open(dataset)
    prompt = app.operator_form("Evaluate reference segmentation (COCO)")
    expect(app.field(prompt, "Predictions")).to_have_value("ntt_predictions")
    expect(app.field(prompt, "Ground truth")).to_have_value("gt")
    app.execute(prompt)
    expect(prompt).to_contain_text("mAP")
    prompt.get_by_role("button", name="Close").click()
    dataset.reload()
    sdk_map = dataset.load_evaluation_results("eval_ntt").mAP()
    assert 0 < sdk_map < 1

    page = app.page  # the operator opened FiftyOne's Model Evaluation panel itself
    entry = page.get_by_text("eval_ntt", exact=True)
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="mAP", exact=True))
    for _ in range(3):  # the panel re-renders its list while it loads: a click then is lost (seen once in CI)
        if entry.is_visible():
            entry.click()
        with contextlib.suppress(AssertionError):
            expect(row).to_be_visible(timeout=10_000)
            break
    expect(row.get_by_role("cell").nth(1)).to_have_text(f"{round(sdk_map, 3):g}")
    app.screenshot("panel")

    false_positives = false_positive_samples(dataset, "eval_ntt")
    assert false_positives >= 2
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="False Positives", exact=True))
    row.get_by_role("button").click()
    expect(page.get_by_test_id("entry-counts")).to_contain_text(f"{false_positives} sample")
    app.screenshot("false-positives")


def test_filtering_confidence_resetting_it_and_opening_a_sample_logs_no_unknown_error(app, dataset):
    """The steps that logged "An ImageBitmap is detached" on the demo dataset: FiftyOne's own error
    (see test_app_upstream.py), known; nothing else is logged (checked at the end)."""
    app.open(dataset)
    filter_reset_and_open(app, "ntt_predictions")
    app.screenshot("reset-then-opened")


SCENE = (256, 192)  # width, height of the `predicted` scenes


def prediction_elsewhere(dataset):
    """A prediction on a sample that holds no reference, and the reference that produced it."""
    with_references = set(dataset.filter_labels("gt", F("tags").contains(DEFAULT_REFERENCE_TAG)).values("id"))
    ids = dataset.values("id")
    index = next(i for i, sample_id in enumerate(ids) if sample_id not in with_references)
    prediction = dataset[ids[index]].ntt_predictions.detections[0]
    return index, prediction, matched_reference(dataset, "ntt_predictions", prediction.id)


def app_view(app) -> list[str]:
    """The stages of the view the App shows (kept in its history entry), by class name."""
    stages = app.page.evaluate("() => window.history.state?.usr?.view ?? []")
    return [stage["_cls"].rsplit(".", 1)[-1] for stage in stages]


def expect_reference_open(app, match, drawn: bool = True) -> None:
    """The sample modal shows the reference's sample with its label selected (and, if ``drawn``, its
    field shown, so that the App draws the label highlighted)."""
    modal = app.page.get_by_test_id("modal")
    expect(app.page).to_have_url(re.compile(rf"[?&]id={match['sample_id']}"))
    modal.locator("[canvas-loaded='true']").wait_for()
    expect(modal.get_by_test_id("action-manage-selected")).to_have_text("1")
    if not drawn:
        return
    checkbox = modal.get_by_test_id("sidebar").get_by_test_id(f"checkbox-{match['field']}").locator("input")
    expect(checkbox).to_be_checked()  # the field is shown, so the selected label is drawn


def select_prediction(app, index: int, prediction) -> None:
    """Open the ``index``-th sample of the grid, click ``prediction`` and close the modal (the selection stays)."""
    modal = app.open_sample(index)
    app.click_label(modal, prediction, SCENE)
    expect(modal.get_by_test_id("action-manage-selected")).to_have_text("1")
    close_modal(app)


def close_modal(app) -> None:
    app.page.mouse.click(5, 400)  # outside the modal, as a user closes it
    expect(app.page.get_by_test_id("modal")).to_have_count(0)


def matched_reference_from_the_panel(app):
    app.open_panel("memory_banks")
    panel = app.page.get_by_test_id("panel-content-memory_banks")
    panel.get_by_role("button", name="Matched reference").click()
    return panel


def test_matched_reference_opens_in_the_modal_highlighted_without_changing_the_view(app, dataset):
    index, prediction, match = prediction_elsewhere(dataset)
    app.open(dataset)
    app.sidebar_checkbox("gt").click()  # predictions only: the click selects one
    modal = app.open_sample(index)
    app.click_label(modal, prediction, SCENE)
    expect(modal.get_by_test_id("action-manage-selected")).to_have_text("1")
    modal.get_by_test_id("sidebar").get_by_test_id("checkbox-gt").click()  # the ground truth shown again
    app.page.keyboard.press("`")  # the operator browser, from the modal (Escape would clear the selection)
    app.page.get_by_test_id("operators-browser").wait_for()
    app.page.keyboard.type("Show matched reference")
    app.page.keyboard.press("Enter")
    prompt = app.page.get_by_test_id("operators-prompt-modal")
    app.primary(prompt).wait_for()
    app.settle(prompt)
    app.execute(prompt)
    expect(prompt).to_contain_text(f"Matched reference {match['reference_id']}")
    prompt.get_by_role("button", name="Close").click()
    expect_reference_open(app, match)
    app.page.wait_for_timeout(500)
    app.screenshot("matched-reference", modal)
    assert app_view(app) == []  # the view is unchanged
    close_modal(app)
    assert app_view(app) == [] and app.sample_count() == len(dataset)
    app.open(dataset)  # re-opened: still the whole dataset, no Select stage
    assert app_view(app) == [] and app.sample_count() == len(dataset)


def test_matched_reference_from_a_patches_view_restores_it_when_the_reference_is_closed(app, dataset):
    patches = dataset.to_patches("ntt_predictions")
    prediction = patches.first().ntt_predictions
    match = matched_reference(dataset, "ntt_predictions", prediction.id)
    app.open(dataset)
    app.page.get_by_test_id("action-clips-patches").click()
    app.page.get_by_title('Switch to patches view for the "ntt_predictions" field').click()
    expect(app.page.get_by_test_id("entry-counts")).to_contain_text(f"{len(patches)} patches")
    select_prediction(app, 0, prediction)
    panel = matched_reference_from_the_panel(app)
    # FiftyOne 1.22's modal sidebar keeps the patches view's fields: `gt` is not listed, so not drawn
    expect_reference_open(app, match, drawn=False)
    assert app_view(app) == []  # the whole dataset while the reference is open
    app.screenshot("reference-open")
    close_modal(app)
    expect(app.page.get_by_test_id("entry-counts")).to_contain_text(f"{len(patches)} patches")
    assert app_view(app) == ["ToPatches"]  # the user's patches view again
    expect(panel.get_by_role("button", name="Back to my view")).to_have_count(0)
    app.open(dataset)  # re-opened: the App brings back the user's last view, nothing of ours in it
    assert app_view(app) == ["ToPatches"]


def test_matched_reference_from_a_saved_view_without_it_restores_the_saved_view(app, dataset):
    index, prediction, match = prediction_elsewhere(dataset)
    saved = dataset.exclude(match["sample_id"])
    dataset.save_view("without-the-reference", saved)
    app.open(dataset, view="without-the-reference")
    assert app.sample_count() == len(saved)
    app.sidebar_checkbox("gt").click()  # predictions only: the click selects one
    select_prediction(app, saved.values("id").index(dataset.values("id")[index]), prediction)
    panel = matched_reference_from_the_panel(app)
    expect_reference_open(app, match, drawn=False)  # the modal keeps the fields shown when it was last open
    expect(panel).to_contain_text("it is outside your view")
    close_modal(app)
    expect(app.page).to_have_url(re.compile(r"[?&]view=without-the-reference"))
    expect(app.page.get_by_test_id("entry-counts")).to_contain_text(f"{len(saved)} samples")
    app.open(dataset)  # re-opened: the App brings back the user's last view, no Select stage
    assert app_view(app) == ["Exclude"] and app.sample_count() == len(saved)
