"""The plugin's operators run from the FiftyOne App in a real browser, each outcome checked through the SDK.

The App server's model fields default to tiny random-weight models: the masks they draw are
meaningless, but every step of a run happens as it does with the paper's models.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import fiftyone.operators as foo
import pytest
import yaml
from app_pages import BUILT, PLUGIN, REPO, expect, pixels, segmented
from fiftyone import ViewField as F
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState
from fiftyone_scenes import field_documents, scenes_dataset

from ntt_core.fiftyone.bank_runs import load_memory_bank
from ntt_core.fiftyone.references import DEFAULT_REFERENCE_TAG

pytestmark = pytest.mark.browser
SIZE = (96, 128)  # scene height, width
FAST = "Prompt grid points per side", 4  # 16 prompts per image instead of the paper's 1024


@pytest.fixture
def dataset(tmp_path, request):
    """Six generated scenes; the first ground-truth instance of each class is tagged ``reference``."""
    dataset = scenes_dataset(tmp_path, count=6, size=SIZE)
    dataset.name = f"browser-{request.node.name.replace('_', '-')}"
    yield dataset
    dataset.delete()


@pytest.fixture
def banked(dataset, tiny_models):
    """``dataset`` with the memory bank ``references``, built through the SDK."""
    sam2, dinov2 = tiny_models
    foo.get_operator(f"{PLUGIN}/build_memory_bank")(dataset, "gt", sam2=str(sam2), dinov2=str(dinov2), device="cpu")
    return dataset


def our_operators() -> list:
    """The plugin's operators (its panels are not in the operator browser)."""
    return [op for op in foo.list_operators() if op.uri.startswith(f"{PLUGIN}/") and not isinstance(op, foo.Panel)]


def tagged_counts(dataset) -> dict[str, int]:
    references = dataset.filter_labels("gt", F("tags").contains(DEFAULT_REFERENCE_TAG))
    return references.count_values("gt.detections.label")


def test_operator_browser_lists_every_operator_and_builds_a_bank_from_its_form(fresh_app, dataset, tiny_models):
    app, server = fresh_app, fresh_app.server
    app.open(dataset)
    listing = app.operator_browser().inner_text()
    operators = our_operators()
    assert sorted(op.name for op in operators) == sorted(
        yaml.safe_load((REPO / "fiftyone.yml").read_text())["operators"]
    )
    for operator in operators:
        assert operator.config.label in listing and operator.name in listing, operator.uri
    app.page.keyboard.type("NTT")  # the product prefix of every label finds them all, and only them
    typed = app.page.get_by_test_id("operators-browser")
    for operator in operators:
        assert operator.config.label.startswith("NTT: "), operator.uri
        expect(typed).to_contain_text(operator.config.label)
    assert not server.torch_loaded(), "listing the operators imported torch in the App server"

    prompt = app.operator_form("Build memory bank from reference instances")
    counts = tagged_counts(dataset)
    found = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
    expect(prompt.get_by_text(f"References found per class: {found}", exact=True)).to_be_visible()
    expect(app.field(prompt, "Ground-truth field")).to_have_value("gt")
    for label, model_dir in zip(("SAM2 model", "DINOv2 model"), tiny_models):  # $NTT_SAM2, $NTT_DINOV2
        expect(app.field(prompt, label)).to_have_value(str(model_dir))
    assert not server.torch_loaded(), "resolving a form imported torch in the App server"
    app.screenshot("form")
    gt_before = field_documents(dataset, "gt")

    shown = app.run(prompt)
    expect(shown).to_contain_text(BUILT)
    app.screenshot("done")
    dataset.reload()
    assert dataset.list_runs() == ["references"]
    assert load_memory_bank(dataset, "references").counts() == counts
    assert field_documents(dataset, "gt") == gt_before
    assert server.torch_loaded(), "the first run did not import torch: this probe would see nothing"


def test_segment_by_reference_on_a_saved_view_shows_its_progress_and_adds_a_field_that_draws_masks(app, banked):
    dataset = banked
    in_view = dataset.values("id")[:3]
    dataset.select(in_view).tag_samples("todo")
    dataset.save_view("todo", dataset.match_tags("todo"))
    app.open(dataset, view="todo")
    assert app.sample_count() == 3

    prompt = app.operator_form("Segment by reference")
    expect(app.field(prompt, "Output field")).to_have_value("ntt_predictions")
    # the tiny models decode the paper's 32 x 32 prompts in under 0.1 s, less than the App's progress
    # interval (0.25 s); 96 x 96 take about 0.7 s per image, so some prompt batch is always shown
    app.set_field(prompt, "Prompt grid points per side", 96)
    shown = app.run(prompt)
    expect(shown).to_contain_text(segmented("ntt_predictions", 3))
    app.screenshot("done")
    states = app.shown()
    assert states[0]["text"].startswith("Loading the models"), states
    bars = [(int(s["value"]), s["text"]) for s in states if s["value"] is not None]
    done = []  # images finished, by what each label says
    for _, text in bars:  # what is happening now: each stage of each image, then the images done
        now = re.search(r"image (\d) of 3: (image encoders|prompts \d+/9216|post-processing|writing)", text)
        finished = re.search(r"Images: (\d)/3", text)
        assert now or finished, bars
        done.append(int(now[1]) - 1 if now else int(finished[1]))
    assert [value for value, _ in bars] == [round(100 * d / 3) for d in done], bars
    assert [value for value, _ in bars] == sorted(value for value, _ in bars), bars  # never backwards
    assert any(0 < value < 100 for value, _ in bars), f"no progress was shown during the run: {states}"
    assert any("prompts" in text for _, text in bars), f"no prompt batch was shown: {bars}"
    shown.get_by_role("button", name="Done").click()

    checkbox = app.sidebar_checkbox("ntt_predictions")
    expect(checkbox.locator("input")).to_be_checked()  # a new label field is shown at once
    app.page.mouse.move(0, 0)  # no hover highlight on the grid
    shown = app.screenshot("shown", app.grid)
    checkbox.click()
    expect(checkbox.locator("input")).not_to_be_checked()
    app.page.wait_for_timeout(500)  # the grid redraws its thumbnails
    hidden = app.screenshot("hidden", app.grid)
    changed = (abs(pixels(shown) - pixels(hidden)).max(axis=2) > 24).mean()
    assert changed > 0.01, f"hiding the predictions changed only {changed:.2%} of the grid's pixels"

    dataset.reload()
    assert sorted(dataset.exists("ntt_predictions").values("id")) == sorted(in_view)
    assert dataset.count("ntt_predictions.detections") > 0


def test_form_errors_show_inline_and_disable_execute(app, banked):
    dataset = banked
    dataset.clone_sample_field("gt", "ntt_predictions")  # an existing output field
    before = field_documents(dataset, "ntt_predictions")
    dataset.save_view("nothing", dataset.match(F("filepath") == ""))  # saved before the App loads the dataset
    app.open(dataset)
    prompt = app.operator_form("Segment by reference")
    execute = app.primary(prompt)  # Execute, or Schedule where this machine's figures make the run long
    expect(prompt.get_by_text("field 'ntt_predictions' already exists: choose another name")).to_be_visible()
    expect(execute).to_be_disabled()
    app.screenshot("existing-field")
    app.set_field(prompt, "Output field", "new_predictions")
    expect(execute).to_be_enabled()  # the same form, valid
    prompt.get_by_role("button", name="Cancel").click()

    app.open(dataset, view="nothing", samples=False)
    assert app.sample_count() == 0
    prompt = app.operator_form("Segment by reference")
    expect(prompt.get_by_text("the target view is empty: nothing to process")).to_be_visible()
    expect(app.primary(prompt)).to_be_disabled()
    app.screenshot("empty-view")
    assert field_documents(dataset, "ntt_predictions") == before
    assert not dataset.has_field("new_predictions")


def test_a_failed_run_shows_its_error(app, banked, tmp_path):
    dataset = banked
    app.open(dataset)
    prompt = app.operator_form("Segment by reference")
    app.set_field(prompt, "SAM2 model", tmp_path / "no-sam2")  # a folder that is not there
    app.set_field(prompt, *FAST)
    shown = app.run(prompt)
    expect(shown.get_by_text("Segment by reference failed", exact=True)).to_be_visible()
    expect(shown).to_contain_text(re.compile(r"SAM2 model '.*no-sam2' could not be loaded"))
    app.screenshot("failed")
    dataset.reload()
    assert not dataset.has_field("ntt_predictions")


def test_a_scheduled_run_is_queued_then_run_by_the_queue(app, banked):
    dataset = banked
    app.open(dataset)
    prompt = app.operator_form("Segment by reference")
    app.set_field(prompt, "Output field", "queued")
    app.set_field(prompt, *FAST)
    app.schedule(prompt)
    expect(app.page.get_by_text("Operation successfully scheduled")).to_be_visible()
    app.screenshot("scheduled")
    (queued,) = DelegatedOperationService().list_operations(dataset_name=dataset.name)
    assert queued.run_state == ExecutionRunState.QUEUED and not dataset.has_field("queued")

    # what a `fiftyone delegated launch` worker does on each poll, in a thread of the test process (the
    # service runs its own event loop, and Playwright's is running in this one)
    with ThreadPoolExecutor(1) as worker:
        (result,) = worker.submit(
            DelegatedOperationService().execute_queued_operations, dataset_name=dataset.name
        ).result()
    assert result.error is None, result.error
    assert result.result["report"]["processed"] == len(dataset)  # the report, as the operation's result
    assert DelegatedOperationService().get(queued.id).run_state == ExecutionRunState.COMPLETED

    expect(app.sidebar_checkbox("queued")).to_have_count(0)
    app.reload()
    expect(app.sidebar_checkbox("queued")).to_be_visible()
    app.screenshot("after-reload")
    dataset.reload()
    assert len(dataset.exists("queued")) == len(dataset)


def test_two_ground_truth_labels_are_tagged_as_references_in_the_sample_modal(app, tmp_path):
    dataset = scenes_dataset(tmp_path, count=2, size=SIZE, references=0)
    dataset.name = "browser-modal-tagging"
    try:
        app.open(dataset)
        modal = app.open_sample(0)
        chosen = dataset.first().gt.detections[:2]
        for detection in chosen:
            app.click_label(modal, detection, SIZE[::-1])
        expect(modal.get_by_test_id("action-manage-selected")).to_have_text("2")
        modal.get_by_test_id("action-tag-sample-labels").click()
        app.page.get_by_test_id("tagger-switch-label").click()
        tag_input = app.page.get_by_test_id("label-tag-input")
        tag_input.fill(DEFAULT_REFERENCE_TAG)
        tag_input.press("Enter")
        app.page.get_by_test_id("button-Apply").click()
        expect(app.page.get_by_test_id("button-Apply")).to_have_count(0)
        app.screenshot("tagged")

        dataset.reload()
        tagged = dataset.filter_labels("gt", F("tags").contains(DEFAULT_REFERENCE_TAG))
        assert sorted(tagged.values("gt.detections.id", unwind=True)) == sorted(d.id for d in chosen)
        assert dataset.count_label_tags() == {DEFAULT_REFERENCE_TAG: 2}
    finally:
        dataset.delete()


def test_a_long_segmentation_shows_its_size_and_estimate_and_defaults_to_schedule(app, banked, tiny_models):
    """With a kept figure that makes the run long, the form says how long and pre-selects Schedule;
    Execute stays in the split button's menu."""
    from fiftyone.operators.store import ExecutionStore

    from ntt_core.fiftyone.timings import STORE, record_timing, timing_key

    key = timing_key("auto", str(tiny_models[0]), str(tiny_models[1]), 32)  # the form's defaults here
    record_timing(key, 50 * 30.0, 50)  # 30 s per image on this machine
    try:
        app.open(banked)
        prompt = app.operator_form("Segment by reference")
        expect(
            prompt.get_by_text("Segments 6 sample(s); the 2 sample(s) holding the bank's references")
        ).to_be_visible()
        expect(prompt.get_by_text("About 3 min on 'auto' for 6 image(s)")).to_be_visible()
        expect(prompt.get_by_text("A long run: Schedule is pre-selected")).to_be_visible()
        expect(prompt.get_by_role("button", name="Schedule", exact=True)).to_be_visible()
        prompt.get_by_text("A long run: Schedule is pre-selected").scroll_into_view_if_needed()  # above the buttons
        app.screenshot("schedule-default", prompt)
        prompt.locator(".MuiDialogActions-root [aria-haspopup=menu]").click()
        expect(app.page.get_by_role("menuitem").filter(has_text="Execute")).to_have_count(1)
        app.page.keyboard.press("Escape")
    finally:
        ExecutionStore.create(STORE).delete(key)


def test_the_prediction_attributes_are_filters_in_the_sidebar(app, dataset, tiny_models):
    models = dict(sam2=str(tiny_models[0]), dinov2=str(tiny_models[1]), device="cpu")

    def build_and_segment():  # in a thread: Playwright's event loop runs in this one (see the queue test)
        foo.get_operator(f"{PLUGIN}/build_memory_bank")(dataset, "gt", **models)
        segment = foo.get_operator(f"{PLUGIN}/segment_by_reference")
        segment(dataset, "references", "ntt_predictions", points_per_side=4, sam_iou_threshold=0.0, **models)

    with ThreadPoolExecutor(1) as worker:
        worker.submit(build_and_segment).result()
    app.open(dataset)
    sidebar = app.page.get_by_test_id("sidebar")
    sidebar.get_by_test_id("sidebar-field-arrow-enabled-ntt_predictions").click()  # the field's attributes
    for name in ("confidence", "semantic_score", "sam_iou", "merge_factor"):
        expect(sidebar.locator(f"[data-cy^=numeric-filter-][data-cy$='.{name}']")).to_have_count(1)
    expect(sidebar.locator("[data-cy^=categorical-filter-][data-cy$='.reference_id']")).to_have_count(1)
    semantic = sidebar.locator("[data-cy^=numeric-filter-][data-cy$='.semantic_score']")
    semantic.scroll_into_view_if_needed()
    minimum = semantic.locator("input").first
    minimum.fill("0.5")
    minimum.press("Enter")
    expect(semantic.get_by_text("Reset")).to_be_visible()  # the filter is on
    app.page.wait_for_timeout(1000)  # the grid redraws with it
    app.screenshot("sidebar-filters")
    app.open_sample(0)  # filtered, then a sample opened: no console error (checked at the end)
