"""Where the demo's images and labels come from: the FiftyOne zoo's COCO-2017 validation split
(downloaded when the COCO site answers), a local COCO folder, or generated scenes; and a check,
before anything heavy, that the data and the models can be had."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from . import DemoError

COCO_CLASSES = ("cat", "dog", "bus")
COCO_HOST = "http://images.cocodataset.org"
OFFLINE_CLASSES = ("disc", "square", "triangle")  # stars are drawn too, unannotated: distractors
OFFLINE_SCENE_SIZE = (144, 192)

#: Layouts of a ``--coco-dir`` folder: FiftyOne's export, ``ntt_core.synthetic``, COCO's own.
COCO_LABELS = ("labels.json", "annotations.json", "annotations/instances_val2017.json")
COCO_IMAGES = ("data", "images", "val2017")


def check_downloads(coco_dir: Path | None, sam2: str | None, dinov2: str | None) -> str | None:
    """How the zoo's COCO subset is had ("download" or "local"; None with a ``coco_dir``); raises
    one :class:`DemoError` naming everything that can be neither found locally nor downloaded."""
    from ..models import DINOV2, SAM2, ModelNotFoundError, resolve_model

    missing, zoo = [], None
    if coco_dir is None:
        zoo = coco_source()
        if zoo is None:
            missing.append(
                f"COCO-2017 validation (FiftyOne zoo): not downloaded and {COCO_HOST} unreachable; "
                "give a local COCO folder with --coco-dir DIR (images and an instances json)"
            )
    for kind, given in ((SAM2, sam2), (DINOV2, dinov2)):
        try:
            resolve_model(kind, given).check()
        except ModelNotFoundError as error:
            missing.append(str(error))
    if missing:
        raise DemoError(
            f"the demo cannot get what it needs: {'; '.join(missing)}. "
            "(`ntt demo --offline` runs the flow on generated scenes with stand-in models)"
        )
    return zoo


def coco_source() -> str | None:
    """How to get COCO-2017 validation: "download" when the COCO site answers, "local" when the
    zoo holds a copy, else None."""
    import fiftyone.zoo as foz

    if reachable(COCO_HOST):
        return "download"
    try:
        foz.find_zoo_dataset("coco-2017", split="validation")
    except ValueError:
        return None
    return "local"


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url``'s server answers an HTTP request within ``timeout`` seconds (proxies honoured;
    name resolution included, which socket timeouts do not bound)."""
    import requests

    answered = []

    def ask() -> None:
        try:
            requests.head(url, timeout=timeout, allow_redirects=False)
            answered.append(True)
        except requests.RequestException:
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def coco_folder(folder: Path) -> tuple[Path, Path]:
    """(images, labels json) of a ``--coco-dir`` folder in one of the known layouts."""
    if not folder.is_dir():
        raise DemoError(f"--coco-dir {folder}: no such folder")
    labels = next((folder / name for name in COCO_LABELS if (folder / name).is_file()), None)
    images = next((folder / name for name in COCO_IMAGES if (folder / name).is_dir()), None)
    missing = [f"labels json ({' / '.join(COCO_LABELS)})"] if labels is None else []
    missing += [f"images folder ({' / '.join(COCO_IMAGES)})"] if images is None else []
    if missing:
        raise DemoError(f"--coco-dir {folder}: no {' and no '.join(missing)} in it")
    return images, labels


def download_coco(classes: str | Sequence[str], max_samples: int, download: bool) -> tuple[Path, Path]:
    """The zoo's COCO-2017 validation split, downloading the images the subset needs if ``download``."""
    import fiftyone.zoo as foz

    from ..coco import FEW_SHOT_CLASSES

    if download:
        names = list(FEW_SHOT_CLASSES) if classes == "few-shot" else None if classes == "all" else list(classes)
        print(f"downloading COCO-2017 validation: up to {max_samples} images of {', '.join(names or ['any class'])}")
        try:
            foz.download_zoo_dataset(
                "coco-2017", split="validation", label_types=["segmentations"], classes=names, max_samples=max_samples
            )
        except Exception as error:  # any failed download ends the same way: say what is missing
            reason = " ".join(str(error).split())
            raise DemoError(
                f"COCO-2017 validation could not be downloaded ({reason}); give a local COCO folder with --coco-dir DIR"
            ) from None
    split = Path(foz.find_zoo_dataset("coco-2017", split="validation"))
    return split / "data", split / "labels.json"


def write_scenes(name: str, count: int, seed: int) -> tuple[Path, Path]:
    """``count`` generated scenes as a COCO folder under FiftyOne's dataset folder; (images, labels)."""
    import fiftyone as fo

    from ..synthetic import CLASSES, IMAGES_DIR, make_dataset, write_coco_folder

    folder = Path(fo.config.default_dataset_dir) / "ntt-demo-scenes" / "".join(c if c.isalnum() else "_" for c in name)
    scenes = make_dataset(count, seed=seed, size=OFFLINE_SCENE_SIZE, classes=CLASSES)
    labels = write_coco_folder(scenes, folder)
    return folder / IMAGES_DIR, labels
