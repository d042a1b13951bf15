"""The demo's FiftyOne dataset: made (replacing an earlier demo's, refusing any other) and filled
with images and ground-truth masks from the source the options choose."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import GT_FIELD, DemoError
from .sources import COCO_CLASSES, OFFLINE_CLASSES, coco_folder, download_coco, write_scenes

DEMO_MARK = "ntt_demo"  # key in dataset.info of the datasets this command made (and may replace)


def earlier_demo_exists(name: str) -> bool:
    """Whether dataset ``name`` exists (made by an earlier demo, so it may be replaced); any other
    dataset of that name is refused."""
    import fiftyone as fo

    if not fo.dataset_exists(name):
        return False
    if DEMO_MARK not in fo.load_dataset(name).info:
        raise DemoError(f"dataset '{name}' exists and was not made by `ntt demo`: choose another --dataset name")
    return True


def create_dataset(name: str, replacing: bool, offline: bool):
    """A new persistent dataset marked as the demo's, replacing an earlier demo's."""
    import fiftyone as fo

    if replacing:
        fo.delete_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    dataset.info[DEMO_MARK] = "offline: generated scenes, stand-in models" if offline else "SAM2 + DINOv2"
    if offline:
        dataset.description = "OFFLINE DEMO: generated scenes, stand-in models (not SAM2/DINOv2)"
    dataset.save()
    print(f"dataset '{name}': " + ("replaces the one an earlier demo run made" if replacing else "created"))
    return dataset


def load_data(
    dataset,
    classes: str | Sequence[str] | None,
    max_samples: int,
    *,
    offline: bool,
    coco_dir: Path | None,
    zoo: str | None,
    seed: int,
) -> list[str]:
    """Images and ground truth into ``dataset`` from the source the options choose (generated
    scenes, a ``coco_dir``, or the zoo, had as ``zoo`` says); returns the classes."""
    if offline:
        images, labels = write_scenes(dataset.name, max_samples, seed)
        classes = classes or list(OFFLINE_CLASSES)
    elif coco_dir is not None:
        images, labels = coco_folder(coco_dir)
    else:
        classes = classes or list(COCO_CLASSES)
        images, labels = download_coco(classes, max_samples, download=zoo == "download")
    return import_coco(dataset, images, labels, classes, max_samples)


def import_coco(dataset, images: Path, labels: Path, classes: Sequence[str] | None, max_samples: int) -> list[str]:
    """Up to ``max_samples`` images holding ``classes`` (None: every category) into ``dataset``,
    their masks in ``ground_truth``; returns the classes."""
    import fiftyone as fo

    from ..coco import load_coco, resolve_classes

    categories = resolve_classes(load_coco(labels), classes, str(labels))
    names = [category["name"] for category in categories]
    dataset.add_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=str(images),
        labels_path=str(labels),
        label_types=["segmentations"],
        label_field=GT_FIELD,
        classes=names,
        only_matching=True,
        max_samples=max_samples,
    )
    if len(dataset) == 0:
        raise DemoError(f"{labels}: no image with any of the classes {', '.join(names)}")
    dataset.compute_metadata()
    print(f"loaded {len(dataset)} image(s) from {images}")
    return names
