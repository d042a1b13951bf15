"""Large images: a 10,000 x 10,000 image goes through the predictor and the COCO export without
full-size masks (docs/method.md, stage 3.8), and the crop-based mask paths equal the full-size ones.

The large run happens in a subprocess, so that its peak resident memory (Linux ``VmHWM``, reset
just before predicting) measures that run alone. The stand-in models find the 64 discs of the
scene exactly, so the run is also checked for being right at that size, not only for fitting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ntt_core.box_prompts import _box_logits, box_mask_crops
from ntt_core.coco import encode_crop, encode_mask
from ntt_core.standins import ConnectedRegionSegmenter
from ntt_core.synthetic import make_scene

SIDE = 10_000  # pixels per side of the large image
SMALL, GRID = 500, 8  # the scene is drawn at 500 x 500 with 8 x 8 discs, then scaled up 20 times
HUES = {"red": 0.0, "lime": 90.0, "cyan": 180.0, "violet": 270.0}  # one class per hue


def disc_scene() -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """A ``SMALL`` x ``SMALL`` grey image with ``GRID`` x ``GRID`` discs of the four hues, and each
    disc's centre (x, y) and class."""
    import colorsys

    image = np.full((SMALL, SMALL, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[:SMALL, :SMALL] + 0.5
    cell, discs = SMALL / GRID, []
    names = list(HUES)
    for row in range(GRID):
        for col in range(GRID):
            name = names[(row + col) % len(names)]
            x, y = (col + 0.5) * cell, (row + 0.5) * cell
            colour = np.round(np.array(colorsys.hsv_to_rgb(HUES[name] / 360.0, 0.75, 0.85)) * 255)
            image[(xx - x) ** 2 + (yy - y) ** 2 <= (0.36 * cell) ** 2] = colour.astype(np.uint8)
            discs.append((x, y, name))
    return image, discs


def measure() -> None:
    """Run in a subprocess: build a bank on the small scene, predict on it scaled to ``SIDE`` px,
    write COCO results; print one JSON line with the peak memory growth and what was found."""
    from ntt_core import merging, predictor
    from ntt_core.coco import instances_to_coco_results
    from ntt_core.memory_bank import build_memory_bank
    from ntt_core.predictor import Predictor
    from ntt_core.references import ReferenceImage, ReferenceInstance
    from ntt_core.settings import Settings
    from ntt_core.standins import ColourStatsEncoder

    torch.set_num_threads(2)
    small, discs = disc_scene()
    segmenter = ConnectedRegionSegmenter(input_size=192, mask_size=96)
    encoder = ColourStatsEncoder(input_size=112, grid_size=14)
    settings = Settings(points_per_side=32)
    yy, xx = np.mgrid[:SMALL, :SMALL] + 0.5
    first = {name: (x, y) for x, y, name in reversed(discs)}  # one reference disc per class
    references = [
        ReferenceInstance(name, mask=(xx - x) ** 2 + (yy - y) ** 2 <= (0.3 * SMALL / GRID) ** 2, reference_id=name)
        for name, (x, y) in first.items()
    ]
    bank = build_memory_bank([ReferenceImage(small, references)], encoder, settings=settings, classes=list(HUES))
    model = Predictor(segmenter, encoder, bank, settings)
    scale = SIDE // SMALL
    large = np.repeat(np.repeat(small, scale, axis=0), scale, axis=1)
    del yy, xx

    candidates = []
    full_resolution_stats = predictor.full_resolution_stats

    def counted(logits, *args):  # the real function; only the number of candidates is noted
        candidates.append(logits.shape[0])
        return full_resolution_stats(logits, *args)

    predictor.full_resolution_stats = counted
    Path("/proc/self/clear_refs").write_text("5")  # restart the kernel's peak-RSS counter (Linux)
    before = _status_kib("VmRSS")
    found = model.predict([large])[0]
    results = instances_to_coco_results(found, 1, {name: i + 1 for i, name in enumerate(HUES)})
    growth = (_status_kib("VmHWM") - before) * 1024
    print(
        json.dumps(
            {
                "peak_growth_bytes": growth,
                "candidates": candidates[0],
                "chunk_elements": merging.CHUNK_ELEMENTS,
                "image_size": list(found.image_size),
                "boxes": found.boxes.tolist(),
                "labels": found.labels_as_names,
                "crop_shapes": [list(mask.shape) for mask in found.masks],
                "rle_sizes": [r["segmentation"]["size"] for r in results],
                "rle_areas": [int(_rle_area(r["segmentation"])) for r in results],
                "crop_areas": [int(mask.sum()) for mask in found.masks],
            }
        )
    )


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _rle_area(rle: dict) -> float:
    from pycocotools import mask as mask_utils

    return mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})


@pytest.mark.bad_input
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_a_10000_px_image_is_segmented_without_full_size_masks():
    paths = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(
        [sys.executable, "-c", "from test_large_images import measure; measure()"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    pixels = SIDE * SIDE

    # right at that size: each disc found once, with its class, where it is
    _, discs = disc_scene()
    assert report["image_size"] == [SIDE, SIDE] and len(report["boxes"]) == len(discs) == GRID * GRID
    scale = SIDE / SMALL
    unmatched = {(round(x * scale), round(y * scale)): name for x, y, name in discs}
    for (x0, y0, x1, y1), name, shape in zip(report["boxes"], report["labels"], report["crop_shapes"]):
        assert shape == [y1 - y0, x1 - x0]  # masks are kept as crops of their boxes
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        nearest = min(unmatched, key=lambda c: (c[0] - centre[0]) ** 2 + (c[1] - centre[1]) ** 2)
        assert abs(nearest[0] - centre[0]) < 0.01 * SIDE and abs(nearest[1] - centre[1]) < 0.01 * SIDE
        assert unmatched.pop(nearest) == name
    assert report["rle_sizes"] == [[SIDE, SIDE]] * len(discs)
    assert report["rle_areas"] == report["crop_areas"]  # the COCO masks are the crops, placed

    # without full-size masks: one float copy of the image (resizing it for the models) and the
    # merging's row bands are all the full-resolution memory the run may take
    allowed = 3 * 4 * pixels + 4 * 4 * report["chunk_elements"]
    assert report["candidates"] * pixels > 2 * allowed  # full-size bool masks of the candidates would not fit
    assert report["peak_growth_bytes"] < allowed, report["peak_growth_bytes"] / 2**20


def test_crop_encoding_equals_encoding_the_full_mask():
    """Random crops anywhere, including runs that wrap from the bottom of one column to the top
    of the next (boxes spanning the full height) and empty or full crops."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(1, 13, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, width + 1, 2))
        y0, y1 = (0, height) if rng.random() < 0.3 else sorted(int(v) for v in rng.integers(0, height + 1, 2))
        crop = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.0, 0.5, 0.9, 1.0])
        full = np.zeros((height, width), dtype=bool)
        full[y0:y1, x0:x1] = crop
        assert encode_crop(crop, (x0, y0, x1, y1), (height, width)) == encode_mask(full)
    with pytest.raises(ValueError, match=r"mask crop of shape \(2, 2\) does not fit box \(0, 0, 3, 2\) in a 3x2 image"):
        encode_crop(np.ones((2, 2), dtype=bool), (0, 0, 3, 2), (2, 3))


def test_box_masks_cut_to_their_boxes_equal_the_full_size_masks():
    scene = make_scene(np.random.default_rng(5), size=(90, 130))
    segmenter = ConnectedRegionSegmenter(input_size=64, mask_size=16)
    boxes = [tuple(int(v) for v in box) for box in scene.boxes] + [(0, 0, 130, 90), (129, 89, 130, 90)]
    logits = _box_logits(segmenter, scene.image, boxes)  # [N, 16, 16]
    full = F.interpolate(logits[:, None], (90, 130), mode="bilinear", align_corners=False, antialias=True)[:, 0] > 0
    full = full.numpy()
    crops = box_mask_crops(segmenter, scene.image, boxes)
    assert len(crops) == len(boxes)
    for (x0, y0, x1, y1), mask, crop in zip(boxes, full, crops):
        assert np.array_equal(crop, mask[y0:y1, x0:x1])
    assert sum(crop.any() for crop in crops) >= len(scene)
    windows = [(max(0, x0 - 7), max(0, y0 - 5), min(130, x1 + 9), min(90, y1 + 3)) for x0, y0, x1, y1 in boxes]
    for (x0, y0, x1, y1), mask, crop in zip(windows, full, box_mask_crops(segmenter, scene.image, boxes, windows)):
        assert np.array_equal(crop, mask[y0:y1, x0:x1])  # another window than the prompt box
