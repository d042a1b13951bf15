"""A scheduled segmentation, run by a real ``fiftyone delegated launch`` worker, stopped from the
Memory banks panel's "Stop after this image" button: it ends after the image it is on, keeps every
sample it wrote, is marked as failed with a message that says how to resume, and resumes from there."""

from __future__ import annotations

import math
import re
import time

import fiftyone.operators as foo
import pytest
from app_pages import PLUGIN, expect
from delegated_workers import start_worker, stop, wait_for
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState
from fiftyone_scenes import field_documents, scenes_dataset

from ntt_plugin.common import STOP_POLL_S

pytestmark = pytest.mark.browser
IMAGES = 24  # with the paper's 32 x 32 prompts each: the worker is still running when the button is clicked
WORKER_S = 240  # the worker process imports torch and loads the models before its first image


@pytest.fixture
def dataset(tmp_path, tiny_models):
    """A persistent dataset (the worker opens it by name) with the memory bank ``references``."""
    dataset = scenes_dataset(tmp_path, count=IMAGES, size=(96, 128))
    dataset.name = "browser-stop-after-this-image"
    dataset.persistent = True
    sam2, dinov2 = tiny_models
    foo.get_operator(f"{PLUGIN}/build_memory_bank")(dataset, "gt", sam2=str(sam2), dinov2=str(dinov2), device="cpu")
    yield dataset
    DelegatedOperationService().delete_for_dataset(dataset._doc.id)
    dataset.delete()


def test_a_scheduled_segmentation_stops_after_its_image_from_the_panel(app, dataset, tmp_path):
    gt_before = field_documents(dataset, "gt")
    app.open(dataset)
    prompt = app.operator_form("Segment by reference")
    app.set_field(prompt, "Output field", "pred")
    app.schedule(prompt)
    expect(app.page.get_by_text("Operation successfully scheduled")).to_be_visible()
    (queued,) = DelegatedOperationService().list_operations(dataset_name=dataset.name)

    log = tmp_path / "worker.log"
    worker = start_worker(log)
    try:
        written = lambda: len(dataset.exists("pred"))  # noqa: E731
        wait_for(lambda: written() >= 1, WORKER_S, "the worker to write its first sample", [log])
        first_written, first_at = written(), time.monotonic()
        app.open_panel("memory_banks")
        panel = app.page.get_by_test_id("panel-content-memory_banks")
        expect(panel).to_contain_text(re.compile(rf"Running: .*image \d+ of {IMAGES}|Running: .*Images: \d+/{IMAGES}"))
        app.screenshot("running", panel)
        panel.get_by_role("button", name="Stop after this image").click()
        expect(panel.get_by_role("button", name="Stop requested")).to_be_disabled()
        expect(panel).to_contain_text("To resume, run Segment by reference into the same field")
        app.screenshot("stop-requested", panel)
        asked_at = written()

        service = DelegatedOperationService()
        counts = []  # (time, samples written) until the run stops: the worker's pace over all its images

        def stopped() -> bool:
            counts.append((time.monotonic(), written()))
            return service.get(queued.id).run_state == ExecutionRunState.FAILED

        wait_for(stopped, 120, "the run to stop", [log])
    finally:
        stop(worker)
    error = service.get(queued.id).result.error
    done = int(re.search(rf"stopped after (\d+) of {IMAGES} samples", error)[1])
    assert "stopped from the Memory banks panel" in error and "To resume, run Segment by reference into 'pred'" in error
    assert asked_at <= done < IMAGES, (asked_at, done)  # after the image it was on, not at the end
    # promptly: within the images this worker finishes, at its own pace, while the stop is read (every 2 s);
    # the pace from its first sample to its last (the images before the click alone can be none: the
    # panel opens meanwhile, and the first images are the slowest)
    last_at = min(at for at, count in counts if count == counts[-1][1])
    per_s = max(done - first_written, 1) / max(last_at - first_at, 1e-3)
    assert done <= asked_at + math.ceil(per_s * (STOP_POLL_S + 1)) + 1, (asked_at, done, per_s)
    assert written() == done  # every finished image kept, nothing after the stop
    assert field_documents(dataset, "gt") == gt_before

    panel.get_by_role("button", name="Refresh").click()  # the stopped run is no longer listed
    expect(panel.get_by_role("button", name="Stop after this image")).to_have_count(0)
    expect(panel.get_by_role("button", name="Stop requested")).to_have_count(0)
