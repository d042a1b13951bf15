"""FiftyOne datasets of synthetic scenes for the adapter and plugin tests, and ground-truth snapshots."""

from __future__ import annotations

from pathlib import Path

import bson
import fiftyone as fo
from PIL import Image

from ntt_core.synthetic import make_dataset


def scenes_dataset(
    folder: Path, count: int = 4, size: tuple[int, int] = (72, 88), seed: int = 3, references: int = 1
) -> fo.Dataset:
    """A non-persistent dataset of ``count`` synthetic scenes with their exact masks in ``gt``.

    The first ``references`` instances of each class (in dataset order) carry the label tag
    ``reference``.
    """
    dataset = fo.Dataset()
    samples, tagged = [], {}
    for index, scene in enumerate(make_dataset(count, seed=seed, size=size)):
        path = Path(folder) / f"scene_{index:03d}.png"
        Image.fromarray(scene.image).save(path)
        height, width = scene.image.shape[:2]
        detections = []
        for mask, (x0, y0, x1, y1), name in zip(scene.masks, scene.boxes, scene.class_names):
            tags = ["reference"] if tagged.get(name, 0) < references else []
            tagged[name] = tagged.get(name, 0) + (1 if tags else 0)
            box = [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]
            detections.append(fo.Detection(label=name, bounding_box=box, mask=mask[y0:y1, x0:x1], tags=tags))
        samples.append(fo.Sample(filepath=str(path), gt=fo.Detections(detections=detections)))
    dataset.add_samples(samples)
    return dataset


def field_documents(dataset: fo.Dataset, field: str) -> dict[str, bytes]:
    """The raw BSON of ``field`` in every sample document, by sample id (a byte-exact snapshot)."""
    return {
        str(doc["_id"]): bson.encode({"v": doc.get(field)}) for doc in dataset._sample_collection.find({}, {field: 1})
    }


def without_eval_attributes(dataset: fo.Dataset, field: str, eval_key: str) -> dict[str, bytes]:
    """Like :func:`field_documents` with the ``<eval_key>*`` attributes of each label removed."""
    snapshot = {}
    for doc in dataset._sample_collection.find({}, {field: 1}):
        value = doc.get(field)
        if value is not None:
            for label in value["detections"]:
                for name in [k for k in label if k == eval_key or k.startswith(eval_key + "_")]:
                    del label[name]
        snapshot[str(doc["_id"])] = bson.encode({"v": value})
    return snapshot
