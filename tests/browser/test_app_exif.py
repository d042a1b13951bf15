"""An EXIF-rotated JPEG in the App: FiftyOne shows it upright (its metadata swaps width and height,
the browser's ``<img>`` applies the orientation), and a mask written in the frame our images are
read in (upright, ``ntt_core.images.load_image``) lands on what it covers."""

from __future__ import annotations

import fiftyone as fo
import numpy as np
import pytest
from app_pages import pixels
from PIL import Image

from ntt_core.fiftyone.labels import instances_to_detections
from ntt_core.images import load_image
from ntt_core.instances import Instances

pytestmark = pytest.mark.browser


def test_a_mask_of_an_exif_rotated_jpeg_covers_its_object_in_the_app(app, tmp_path):
    stored = np.zeros((80, 160, 3), dtype=np.uint8)
    stored[5:35, 10:50] = 255  # a white block near the top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": upright it is 80 wide, 160 tall
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    upright = load_image(path)
    block = upright.mean(axis=2) > 128  # the block, now near the top right
    rows, cols = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
    box = np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]])
    one = np.ones(1, dtype=np.float32)
    instances = Instances(
        image_size=upright.shape[:2],
        boxes=box,
        masks=[block[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]],
        labels=np.zeros(1, dtype=np.int64),
        class_names=["block"],
        scores=one,
        semantic_scores=one,
        sam_iou=one,
        merge_factors=one,
    )
    dataset = fo.Dataset("browser-exif")
    try:
        sample = fo.Sample(filepath=str(path), pred=instances_to_detections(instances))
        dataset.add_sample(sample)
        dataset.compute_metadata()
        assert (sample.metadata.width, sample.metadata.height) == (80, 160)  # FiftyOne's upright size

        app.open(dataset)
        modal = app.open_sample(0)
        canvas = modal.get_by_test_id("looker").last
        app.page.wait_for_timeout(500)
        shot = pixels(app.screenshot("modal", canvas))
        height, width = shot.shape[:2]
        scale = min(width / 80, height / 160)  # the upright image fit inside the canvas
        left, top = (width - 80 * scale) / 2, (height - 160 * scale) / 2

        def at(x: float, y: float) -> np.ndarray:  # the screenshot's pixel at upright image pixel (x, y)
            return shot[int(top + y * scale), int(left + x * scale)]

        (x0, y0, x1, y1) = box[0]
        inside = at((x0 + x1) / 2, (y0 + y1) / 2)
        assert inside.min() > 60 and inside.max() - inside.min() > 30, inside  # white block under the mask's tint
        for x, y in ((20, 80), (40, 140), (x0 / 2, y0 + 5)):  # dark, untinted: no block, no mask
            assert at(x, y).max() < 60, (x, y, at(x, y))
        # No part of the block is left uncovered (white, untinted) below the label drawn above the box.
        image = shot[int(top + y0 * scale) : int(top + 160 * scale), int(left) : int(left + 80 * scale)]
        assert not (image.min(axis=2) > 200).any()
    finally:
        dataset.delete()
