"""COCO-format json in and out: validation, references for the memory bank, few-shot reference
sampling with the paper's protocol, predictions as COCO results (RLE). Evaluating results is
:mod:`ntt_core.coco_evaluation`."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

from .errors import NttError
from .input_rules import check_count, check_seed, is_crowd

if TYPE_CHECKING:
    from .instances import Instances
    from .references import ReferenceImage

logger = logging.getLogger(__name__)

#: The COCO-FSOD novel classes: the 20 PASCAL VOC classes under their COCO names.
FEW_SHOT_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "boat", "bird", "cat",
    "dog", "horse", "sheep", "cow", "bottle", "chair", "couch", "potted plant", "dining table", "tv",
)  # fmt: skip
MIN_REFERENCE_SIDE = 32  # a sampled reference's box must be at least this wide and tall (pixels)
MIN_BORDER_DISTANCE = 10  # ... and at least this far from every image border (pixels)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class CocoFormatError(NttError):
    """A COCO json (annotations, targets or results) that is malformed; the message names the file
    and the problem."""


# --- reading and validating ---


def load_coco(source: str | Path | dict, require_annotations: bool = True) -> dict:
    """Read a COCO instances json (path) or take one (dict) and validate it.

    Checks the keys, duplicate ids and category names, annotations pointing at unknown images or
    categories, and bboxes. ``require_annotations=False`` accepts a targets file without them.
    Returns the dict (``annotations`` set to ``[]`` when absent).
    """
    if isinstance(source, dict):
        return _validate(source, "COCO dict", require_annotations)
    name = str(source)
    data = read_json(source)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{name}: a COCO json must be an object with images, categories and annotations")
    return _validate(data, name, require_annotations)


def read_json(path: str | Path):
    """Parse a json file; a missing or corrupt file raises :class:`CocoFormatError`."""
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{path}: not valid json ({error})") from None


def write_json(data, path: str | Path) -> Path:
    """Write ``data`` as json, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _validate(data: dict, name: str, require_annotations: bool) -> dict:
    required = ("images", "categories") + (("annotations",) if require_annotations else ())
    missing = [key for key in required if key not in data]
    if missing:
        raise CocoFormatError(f"{name}: missing key(s) {', '.join(missing)}")
    data.setdefault("annotations", [])
    for key in ("images", "categories", "annotations"):
        if not isinstance(data[key], list) or not all(isinstance(item, dict) for item in data[key]):
            raise CocoFormatError(f"{name}: '{key}' must be a list of objects")
    _check_entries(data["images"], ("id", "file_name", "width", "height"), "image", name)
    _check_entries(data["categories"], ("id", "name"), "category", name)
    _check_entries(data["annotations"], ("id", "image_id", "category_id", "bbox"), "annotation", name)
    for image in data["images"]:
        if not all(isinstance(image[k], int) and image[k] > 0 for k in ("width", "height")):
            raise CocoFormatError(
                f"{name}: image {image['id']!r} has width/height {image['width']!r}/{image['height']!r}; expected positive integers"
            )
    duplicates = sorted(n for n, count in Counter(c["name"] for c in data["categories"]).items() if count > 1)
    if duplicates:
        raise CocoFormatError(f"{name}: duplicate category name(s) {', '.join(map(repr, duplicates))}")
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    for annotation in data["annotations"]:
        where = f"{name}: annotation {annotation['id']!r}"
        if annotation["image_id"] not in image_ids:
            raise CocoFormatError(f"{where} points at unknown image id {annotation['image_id']!r}")
        if annotation["category_id"] not in category_ids:
            raise CocoFormatError(f"{where} points at unknown category id {annotation['category_id']!r}")
        check_box(annotation["bbox"], where)
    return data


def _check_entries(entries: list[dict], keys: tuple[str, ...], what: str, name: str) -> None:
    for index, entry in enumerate(entries):
        missing = [key for key in keys if key not in entry]
        if missing:
            raise CocoFormatError(f"{name}: {what} #{index} (id {entry.get('id')!r}) lacks {', '.join(missing)}")
    repeated = sorted((i for i, n in Counter(entry["id"] for entry in entries).items() if n > 1), key=str)
    if repeated:
        raise CocoFormatError(f"{name}: duplicate {what} id(s) {', '.join(map(repr, repeated))}")


def check_box(box, where: str) -> None:
    """Raise unless ``box`` is a COCO box: four finite numbers ``[x, y, w, h]``, ``w, h >= 0``."""
    ok = isinstance(box, (list, tuple)) and len(box) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    if not ok or box[2] < 0 or box[3] < 0:
        raise CocoFormatError(
            f"{where} has bad bbox {box!r}; expected [x, y, width, height], finite, width and height >= 0"
        )


def resolve_classes(coco: dict, classes: str | Sequence[str] | None, name: str = "COCO json") -> list[dict]:
    """The categories chosen by ``classes``, in the file's category order.

    ``classes``: ``"few-shot"`` (the 20 COCO-FSOD novel classes), ``"all"`` or None, or a list of
    category names. A name not among the categories raises :class:`CocoFormatError`.
    """
    if classes is None or classes == "all":
        return list(coco["categories"])
    wanted = (
        list(FEW_SHOT_CLASSES) if classes == "few-shot" else [classes] if isinstance(classes, str) else list(classes)
    )
    known = {category["name"] for category in coco["categories"]}
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise CocoFormatError(
            f"{name}: unknown class(es) {', '.join(map(repr, unknown))}; categories are {', '.join(sorted(known))}"
        )
    return [category for category in coco["categories"] if category["name"] in wanted]


# --- references for the memory bank ---


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray | None:
    """Decode an annotation's polygons / RLE / compressed RLE to ``[height, width]`` bool, or None
    when it has no segmentation (a box-only annotation)."""
    segmentation = annotation.get("segmentation")
    if segmentation is None or (isinstance(segmentation, list) and len(segmentation) == 0):
        return None
    where = f"annotation {annotation.get('id')!r}"
    try:
        if isinstance(segmentation, list):
            if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
                raise CocoFormatError(f"{where}: polygons must be lists of at least 3 (x, y) pairs")
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and {"counts", "size"} <= set(segmentation):
            if list(segmentation["size"]) != [height, width]:
                raise CocoFormatError(
                    f"{where}: RLE size {segmentation['size']} differs from the image size {[height, width]}"
                )
            counts = segmentation["counts"]
            rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(counts, list) else segmentation
        else:
            raise CocoFormatError(f"{where}: segmentation is neither polygons nor an RLE dict with counts and size")
        return mask_utils.decode(rle).astype(bool)
    except CocoFormatError:
        raise
    except (TypeError, ValueError) as error:
        raise CocoFormatError(f"{where}: undecodable segmentation ({error})") from None


def references_from_coco(
    annotations: str | Path | dict,
    image_dir: str | Path,
    classes: str | Sequence[str] | None = None,
    max_per_class: int | None = None,
    exif_orientation: bool = True,
) -> list[ReferenceImage]:
    """Reference images for :func:`ntt_core.memory_bank.build_memory_bank` from a COCO json.

    Masks come from the annotation's polygons or RLE at the image size; every instance keeps the
    annotation's ``bbox`` as its box (x0, y0, x1, y1), which the reference crop follows, as the
    authors' crop does; annotations without a segmentation become box references (mask None);
    crowd annotations are skipped. ``exif_orientation`` says how the images will be read (see
    :func:`ntt_core.images.load_image`; the authors do not apply EXIF orientation). ``classes``
    picks categories by name (see :func:`resolve_classes`); ``max_per_class`` keeps the first that
    many instances of each class, in file order.
    Images (loaded later, by the bank builder) are ``image_dir / file_name``.
    """
    from .references import ReferenceImage, ReferenceInstance

    if max_per_class is not None:
        check_count(max_per_class, "max_per_class")
    name = str(annotations) if not isinstance(annotations, dict) else "COCO dict"
    coco = load_coco(annotations)
    chosen = {category["id"]: category["name"] for category in resolve_classes(coco, classes, name)}
    images = {image["id"]: image for image in coco["images"]}
    per_image: dict = {}
    taken: dict[str, int] = {}
    for annotation in coco["annotations"]:
        class_name = chosen.get(annotation["category_id"])
        if class_name is None or is_crowd(annotation):
            continue
        if max_per_class is not None and taken.get(class_name, 0) >= max_per_class:
            continue
        taken[class_name] = taken.get(class_name, 0) + 1
        image = images[annotation["image_id"]]
        try:
            mask = annotation_mask(annotation, image["height"], image["width"])
        except CocoFormatError as error:
            raise CocoFormatError(f"{name}: {error}") from None
        x, y, w, h = annotation["bbox"]
        per_image.setdefault(annotation["image_id"], []).append(
            ReferenceInstance(
                class_name=class_name,
                mask=mask,
                box=(x, y, x + w, y + h),
                reference_id=str(annotation["id"]),
            )
        )
    return [
        ReferenceImage(
            image=str(Path(image_dir) / image["file_name"]),
            instances=per_image[image["id"]],
            image_id=str(image["id"]),
            exif_orientation=exif_orientation,
        )
        for image in coco["images"]
        if image["id"] in per_image
    ]


# --- few-shot sampling (docs/method.md, "Evaluation protocols") ---


def is_valid_reference(annotation: dict, image: dict) -> bool:
    """The paper's rule for a sampled reference: not crowd, box at least 32 x 32 px and at least
    10 px from every image border."""
    x, y, w, h = annotation["bbox"]
    return (
        not is_crowd(annotation)
        and w >= MIN_REFERENCE_SIDE
        and h >= MIN_REFERENCE_SIDE
        and x >= MIN_BORDER_DISTANCE
        and y >= MIN_BORDER_DISTANCE
        and image["width"] - (x + w) >= MIN_BORDER_DISTANCE
        and image["height"] - (y + h) >= MIN_BORDER_DISTANCE
    )


def sample_references(
    coco_dict: dict,
    shots: int,
    seed: int,
    classes: str | Sequence[str] = "few-shot",
    seed_scope: str = "run",
) -> dict:
    """K-shot references per class, the COCO-FSOD way; returns an ordinary COCO dict.

    For each chosen class: take the class's annotations in file order, shuffle them, then walk
    the shuffled list keeping the first valid instance (:func:`is_valid_reference`) of each image
    not yet used by this class, until ``shots`` are kept.

    Where the seed goes (``seed_scope``):

    - ``"run"`` (default, the authors' ``few_shot_sampling.py``, so their published reference sets
      are reproduced): ``random.seed(seed)`` once, then the classes are shuffled one after another
      in the order of their first annotation in the file.
    - ``"class"``: ``random.seed(seed)`` right before each class's shuffle, so a class's sample does
      not depend on which other classes are sampled.

    Both use a private ``random.Random(seed)``, which shuffles exactly like ``random.seed(seed)``
    followed by ``random.shuffle`` but leaves the global generator alone.

    A class with fewer than ``shots`` valid instances keeps what it has; a warning is logged and
    listed in ``info["ntt_sampling"]["warnings"]``. The result keeps the chosen categories, the
    kept annotations (by class, in sampled order) and their images (in file order).
    """
    check_count(shots, "shots")
    check_seed(seed)
    if seed_scope not in ("class", "run"):
        raise ValueError(f"seed_scope must be 'class' or 'run', got {seed_scope!r}")
    coco = load_coco(coco_dict)
    categories = resolve_classes(coco, classes)
    images = {image["id"]: image for image in coco["images"]}
    per_class: dict = {category["id"]: [] for category in categories}
    for annotation in coco["annotations"]:
        if annotation["category_id"] in per_class:
            per_class[annotation["category_id"]].append(annotation)

    if seed_scope == "run":
        first_seen = list(dict.fromkeys(a["category_id"] for a in coco["annotations"] if a["category_id"] in per_class))
        order = first_seen + [c["id"] for c in categories if c["id"] not in first_seen]
        generator = random.Random(seed)
    else:
        order = [category["id"] for category in categories]
    names = {category["id"]: category["name"] for category in categories}

    sampled, warnings = {}, []
    for category_id in order:
        candidates = list(per_class[category_id])
        if seed_scope == "class":
            generator = random.Random(seed)
        generator.shuffle(candidates)
        kept, used_images = [], set()
        for annotation in candidates:
            if annotation["image_id"] in used_images or not is_valid_reference(
                annotation, images[annotation["image_id"]]
            ):
                continue
            kept.append(annotation)
            used_images.add(annotation["image_id"])
            if len(kept) == shots:
                break
        if len(kept) < shots:
            message = (
                f"class {names[category_id]!r}: only {len(kept)} valid instance(s) in distinct images, {shots} asked"
            )
            logger.warning(message)
            warnings.append(message)
        sampled[category_id] = kept

    annotations = [a for category in categories for a in sampled[category["id"]]]
    used = {a["image_id"] for a in annotations}
    info = dict(coco["info"]) if isinstance(coco.get("info"), dict) else {}
    info["ntt_sampling"] = {
        "shots": shots,
        "seed": seed,
        "seed_scope": seed_scope,
        "classes": [category["name"] for category in categories],
        "warnings": warnings,
    }
    return {
        "info": info,
        "images": [image for image in coco["images"] if image["id"] in used],
        "categories": categories,
        "annotations": annotations,
    }


# --- predictions as COCO results ---


def encode_mask(mask: np.ndarray) -> dict:
    """``[H, W]`` bool -> compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_crop(crop: np.ndarray, box: Sequence[int], image_size: tuple[int, int]) -> dict:
    """A mask given by its crop ``[y1 - y0, x1 - x0]`` at the end-exclusive ``box`` (x0, y0, x1, y1)
    of an image of ``image_size`` (H, W) -> the compressed RLE of the full-size mask, which is never built.

    RLE runs alternate background and foreground in column-major order: the runs come from each
    crop column padded with background above and below; a run that ends at the image's bottom
    edge joins one that starts at the top of the next column.
    """
    height, width = (int(v) for v in image_size)
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = np.asarray(crop, dtype=bool)
    if crop.shape != (y1 - y0, x1 - x0) or not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"mask crop of shape {crop.shape} does not fit box {box} in a {width}x{height} image")
    padded = np.zeros((crop.shape[0] + 2, crop.shape[1]), dtype=np.int8)
    padded[1:-1] = crop
    columns, rows = np.nonzero(np.diff(padded, axis=0).T)  # per column, in order: run start, run end, ...
    edges = (x0 + columns).astype(np.int64) * height + y0 + rows
    joined = np.flatnonzero(edges[1:-1:2] == edges[2::2])  # end of run i == start of run i + 1
    edges = np.delete(edges, np.concatenate([2 * joined + 1, 2 * joined + 2]))
    counts = np.diff(np.concatenate([[0], edges, [height * width]]))
    if len(counts) > 1 and counts[-1] == 0:  # a last run that reaches the end has no background after it
        counts = counts[:-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def result_box(box: Sequence[int]) -> list[float]:
    """The authors' COCO result box of a mask whose pixel extent is ``box`` (x0, y0, x1, y1,
    end-exclusive): ``[x0, y0, x1 - 1 - x0, y1 - 1 - y0]``, from SAM's inclusive mask box (last
    column and row with a pixel), one pixel narrower and shorter than the extent."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return [float(x0), float(y0), float(x1 - 1 - x0), float(y1 - 1 - y0)]


def instances_to_coco_results(instances: Instances, image_id, category_ids: Mapping[str, int]) -> list[dict]:
    """COCO result dicts (RLE segmentation, bbox [x, y, w, h] by :func:`result_box`, score,
    category_id) of one image.

    ``category_ids`` maps class name -> category id. Masks are encoded from their crops: no
    full-size mask is built.
    """
    missing = sorted(set(instances.class_names) - set(category_ids))
    if missing:
        raise CocoFormatError(f"no category id for class(es) {', '.join(map(repr, missing))}")
    return [
        {
            "image_id": image_id,
            "category_id": category_ids[instances.class_names[int(instances.labels[i])]],
            "bbox": result_box(instances.boxes[i]),
            "score": float(instances.scores[i]),
            "segmentation": encode_crop(instances.masks[i], instances.boxes[i], instances.image_size),
        }
        for i in range(len(instances))
    ]


class ResultsWriter:
    """Writes a COCO results json (a list) as results come, so a long run never holds them all.

    Use as a context manager; the file appears under its name only when the block ends without
    an error (until then it is ``<name>.partial``, removed on error).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file = self._partial.open("w", encoding="utf-8")
        self._file.write("[")

    def write(self, results: Sequence[dict]) -> None:
        for result in results:
            self._file.write(("," if self.count else "") + json.dumps(result))
            self.count += 1

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._file.write("]")
        self._file.close()
        if kind is None:
            self._partial.replace(self.path)
        else:
            self._partial.unlink()


def list_images(directory: str | Path) -> list[str]:
    """Image files under ``directory`` (recursively) as sorted relative posix paths."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CocoFormatError(f"{directory}: image folder not found")
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def make_targets(images: Sequence[tuple[int, str, tuple[int, int]]], class_names: Sequence[str]) -> dict:
    """A targets COCO dict without annotations: ``images`` as (id, file_name, (height, width)),
    category ids 1, 2, ... in ``class_names`` order."""
    return {
        "images": [{"id": i, "file_name": f, "height": int(s[0]), "width": int(s[1])} for i, f, s in images],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
        "annotations": [],
    }
