"""A tiny COCO folder for the CLI tests (the ``folder`` fixture of conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SIZE = 96  # image side


def write_coco_folder(root: Path) -> Path:
    """Four 96 x 96 images, each with a red and a blue 36-px square; red as polygons, blue as RLE,
    except one box-only blue and one extra crowd red: ``root/images/`` and ``root/annotations.json``."""
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(4):
        pixels = rng.integers(100, 140, (SIZE, SIZE, 3), dtype=np.uint8)
        red, blue = (12 + 4 * i, 12), (48, 44 - 2 * i)
        pixels[red[1] : red[1] + 36, red[0] : red[0] + 36] = (220, 30, 30)
        pixels[blue[1] : blue[1] + 36, blue[0] : blue[0] + 36] = (30, 30, 220)
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        images.append({"id": 10 + i, "file_name": f"img{i}.png", "width": SIZE, "height": SIZE})
        x, y = red
        polygon = [[x, y, x + 36, y, x + 36, y + 36, x, y + 36]]
        annotations.append(
            {"id": 100 + i, "image_id": 10 + i, "category_id": 1, "bbox": [x, y, 36, 36], "segmentation": polygon}
        )
        blue_annotation = {"id": 200 + i, "image_id": 10 + i, "category_id": 2, "bbox": [*blue, 36, 36]}
        if i > 0:  # the first blue one is box-only
            mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
            mask[blue[1] : blue[1] + 36, blue[0] : blue[0] + 36] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            blue_annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        annotations.append(blue_annotation)
    annotations.append(
        {
            "id": 300,
            "image_id": 10,
            "category_id": 1,
            "bbox": [0, 0, 8, 8],
            "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]],
            "iscrowd": 1,
        }
    )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
    }
    (root / "annotations.json").write_text(json.dumps(coco))
    return root
