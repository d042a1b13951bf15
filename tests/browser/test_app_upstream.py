"""Console errors that come from FiftyOne's own App, shown on a server with no plugin loaded
before they go on the known-error list (``app_pages.KNOWN_CONSOLE_ERRORS``)."""

from __future__ import annotations

import pytest
from app_pages import DETACHED_BITMAP, KNOWN_CONSOLE_ERRORS, filter_reset_and_open
from fiftyone_scenes import scenes_dataset

pytestmark = pytest.mark.browser


def test_detached_image_bitmap_errors_come_from_fiftyone_without_any_plugin(plain_app, tmp_path):
    """FiftyOne 1.22 alone, on detections with masks and a confidence: filtering, resetting the
    filter and opening a sample logs "An ImageBitmap is detached" from its looker's ``loadSample``."""
    dataset = scenes_dataset(tmp_path, count=8, size=(96, 128))
    dataset.name = "browser-upstream-detached-bitmap"
    for index, sample in enumerate(dataset):
        for rank, detection in enumerate(sample.gt.detections):
            detection.confidence = 0.5 + 0.45 * ((index + rank) % 2)  # masks from fiftyone_scenes
        sample.save()
    dataset.add_dynamic_sample_fields()  # gt.detections.confidence in the schema: a sidebar filter
    try:
        assert dataset.count("gt.detections.mask") > 0
        plain_app.open(dataset)
        filter_reset_and_open(plain_app, "gt")
        logged = plain_app.console_errors
        detached = [error for error in logged if DETACHED_BITMAP.match(error)]
        assert detached, f"FiftyOne logged no detached-ImageBitmap error (remove it from the known ones): {logged}"
        assert [e for e in logged if not any(known.match(e) for known in KNOWN_CONSOLE_ERRORS)] == []
    finally:
        dataset.delete()
