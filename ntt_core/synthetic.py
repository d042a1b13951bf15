"""Synthetic scenes with exact instance masks, for tests, benchmarks and the offline demo.

Each scene is a textured grey background with a few coloured shapes pasted on it. Every class
has its own hue (90 degrees apart) and a faint texture of its own, so a colour-statistics encoder
can tell the classes apart; instances of one class vary a little in hue, saturation, brightness,
size and rotation. Later shapes may hide a little of earlier ones (of another class only); masks are the
visible parts, each kept connected and mostly visible. Same-class instances never touch.
Everything is deterministic for a given random generator or seed.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .coco import encode_mask
from .errors import NttError
from .geometry import mask_box
from .input_rules import check_seed
from .references import ReferenceImage, ReferenceInstance

ANNOTATIONS_NAME = "annotations.json"
IMAGES_DIR = "images"


class SceneError(NttError):
    """Scene parameters that cannot make a scene; the message names the parameter and the reason."""


@dataclass
class Scene:
    """One synthetic image and its instances (visible parts), in paste order."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    masks: np.ndarray  # [N, H, W] bool, visible part of each instance (pairwise disjoint)
    boxes: np.ndarray  # [N, 4] int64, (x0, y0, x1, y1) end-exclusive bounds of each mask
    class_names: list[str]  # [N] class of each instance

    def __len__(self) -> int:
        return len(self.class_names)


def _radial(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness falling off from the centre of the shape (yy, xx relative to it, in radii)."""
    return -0.08 * np.clip(yy**2 + xx**2, 0.0, 1.0)


def _stripes(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faint parallel stripes at a random angle."""
    angle = rng.uniform(0.0, np.pi)
    return 0.03 * np.sin(8.0 * (np.cos(angle) * xx + np.sin(angle) * yy))


def _grain(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fine per-pixel grain."""
    return rng.uniform(-0.015, 0.015, size=yy.shape)


def _flat(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.zeros_like(yy)


@dataclass(frozen=True)
class ClassStyle:
    """How a class looks: a shape, a base hue and a brightness texture."""

    shape: str  # "disc", "square", "triangle" or "star"
    hue: float  # degrees
    texture: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


#: The classes the generator can draw, by name.
CLASS_STYLES: dict[str, ClassStyle] = {
    "disc": ClassStyle("disc", 0.0, _radial),  # red
    "square": ClassStyle("square", 180.0, _stripes),  # cyan
    "triangle": ClassStyle("triangle", 270.0, _grain),  # violet
    "star": ClassStyle("star", 90.0, _flat),  # lime
}
CLASSES: tuple[str, ...] = tuple(CLASS_STYLES)


def _outline(shape: str, centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (x, y) of a shape of circumradius ``radius``."""
    corners = {"square": (4, 1.0), "triangle": (3, 1.0), "star": (10, 0.45)}[shape]
    count, inner = corners
    steps = np.arange(count)
    radii = np.where(steps % 2 == 1, radius * inner, radius) if shape == "star" else np.full(count, radius)
    angles = angle + 2.0 * np.pi * steps / count
    return [(centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for r, a in zip(radii, angles)]


def _shape_mask(
    shape: str, size: tuple[int, int], centre: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    """``[H, W]`` bool mask of one shape, hard edges."""
    height, width = size
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "disc":
        x, y = centre
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=1)
    else:
        draw.polygon(_outline(shape, centre, radius, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _dilate(mask: np.ndarray, steps: int, diagonal: bool = False) -> np.ndarray:
    """4-neighbour (or, with ``diagonal``, 8-neighbour) dilation of a bool mask, ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        vertical = out.copy()
        vertical[1:] |= out[:-1]
        vertical[:-1] |= out[1:]
        source = vertical if diagonal else out  # 8-neighbour dilation is separable
        grown = vertical.copy()
        grown[:, 1:] |= source[:, :-1]
        grown[:, :-1] |= source[:, 1:]
        out = grown
    return out


def _is_connected(mask: np.ndarray) -> bool:
    """Whether the set pixels of a non-empty bool mask form one 8-connected piece."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return False
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    region = mask[y0:y1, x0:x1]
    reached = np.zeros_like(region)
    reached[rows[0] - y0, cols[0] - x0] = True
    while True:
        grown = _dilate(reached, 1, diagonal=True) & region
        if (grown == reached).all():
            return bool((reached == region).all())
        reached = grown


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int, amplitude: float) -> np.ndarray:
    """``[H, W]`` low-frequency noise in [-amplitude, amplitude]: a random coarse grid, bicubically upsampled."""
    coarse = rng.uniform(-amplitude, amplitude, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize(size[::-1], Image.BICUBIC), dtype=np.float64)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, 3]`` float in [0.3, 0.7]: grey with a gradient, soft blotches, a faint tint and grain."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(direction) * xx / width + np.sin(direction) * yy / height) * rng.uniform(-0.16, 0.16)
    grey = rng.uniform(0.42, 0.58) + ramp + _smooth_noise(rng, size, 6, 0.05)
    tint = rng.uniform(-0.02, 0.02, size=3)
    grain = rng.uniform(-0.012, 0.012, size=(height, width, 1))
    return np.clip(grey[:, :, None] + tint + grain, 0.3, 0.7)


def _paint(rng: np.random.Generator, style: ClassStyle, mask: np.ndarray, centre, radius) -> np.ndarray:
    """``[H, W, 3]`` float colour of one instance (meaningful where ``mask``): jittered hue,
    saturation and brightness, times the class texture."""
    hue = (style.hue + rng.uniform(-8.0, 8.0)) % 360.0
    rgb = np.array(colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(0.75, 0.9), rng.uniform(0.78, 0.9)))
    height, width = mask.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    shade = 1.0 + style.texture((yy - centre[1]) / radius, (xx - centre[0]) / radius, rng)
    return np.clip(rgb[None, None, :] * shade[:, :, None], 0.0, 1.0)


def make_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (160, 192),
    classes: Sequence[str] = CLASSES,
    instances: tuple[int, int] = (3, 6),
    radius: tuple[float, float] = (0.08, 0.16),
    min_visible: float = 0.75,
    gap: int = 3,
    attempts: int = 60,
) -> Scene:
    """One scene of ``size`` (H, W) with between ``instances[0]`` and ``instances[1]`` shapes
    (fewer if they do not fit) of the given classes.

    ``radius`` is the range of a shape's circumradius as a fraction of min(H, W); every shape
    stays inside the image, keeps at least ``min_visible`` of itself visible and in one piece,
    and stays ``gap`` pixels away from instances of its own class.
    """
    height, width = (int(v) for v in size)
    unknown = [name for name in classes if name not in CLASS_STYLES]
    if unknown or not classes:
        what = f"unknown class(es) {', '.join(map(repr, unknown))}" if unknown else "no classes given"
        raise SceneError(f"{what}; choose one or more of {', '.join(CLASSES)}")
    if not (0.0 < radius[0] <= radius[1]) or 2.0 * radius[1] * min(height, width) + 2 > min(height, width):
        raise SceneError(f"radius range {radius!r} does not fit a {height}x{width} image")
    if min(height, width) < 16:
        raise SceneError(f"size {size!r}: images need at least 16 pixels per side")
    if not (1 <= instances[0] <= instances[1]):
        raise SceneError(f"instances range {instances!r} must satisfy 1 <= low <= high")

    image = _background(rng, (height, width))
    shapes: list[np.ndarray] = []  # full shapes, paste order
    visible: list[np.ndarray] = []
    names: list[str] = []
    for _ in range(int(rng.integers(instances[0], instances[1] + 1))):
        name = str(rng.choice(list(classes)))
        style = CLASS_STYLES[name]
        for _ in range(attempts):
            r = rng.uniform(*radius) * min(height, width)
            centre = (rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1))
            shape = _shape_mask(style.shape, (height, width), centre, r, rng.uniform(0.0, 2.0 * np.pi))
            near = _dilate(shape, gap)
            if any((near & mask).any() for mask, other in zip(visible, names) if other == name):
                continue
            remaining = [mask & ~shape for mask in visible]
            if all(
                rest.sum() >= min_visible * whole.sum() and _is_connected(rest)
                for rest, whole in zip(remaining, shapes)
            ):
                break
        else:
            continue
        image = np.where(shape[:, :, None], _paint(rng, style, shape, centre, r), image)
        shapes.append(shape)
        visible = [*remaining, shape]
        names.append(name)

    masks = np.stack(visible) if visible else np.zeros((0, height, width), dtype=bool)
    return Scene(
        image=np.round(image * 255.0).astype(np.uint8),
        masks=masks,
        boxes=np.array([mask_box(mask) for mask in masks], dtype=np.int64).reshape(-1, 4),
        class_names=names,
    )


def make_dataset(n: int, seed: int = 0, **scene_options) -> list[Scene]:
    """``n`` scenes; scene ``i`` depends only on (seed, i), so a longer dataset extends a shorter one.
    ``scene_options`` go to :func:`make_scene`."""
    check_seed(seed)
    return [make_scene(np.random.default_rng([seed, index]), **scene_options) for index in range(n)]


def reference_images(scenes: Sequence[Scene], prefix: str = "scene") -> list[ReferenceImage]:
    """Every instance of the scenes as a masked reference: image ids ``{prefix}-{i}``, reference ids
    ``{prefix}-{i}-{j}`` (scene i, instance j)."""
    return [
        ReferenceImage(
            image=scene.image,
            instances=[
                ReferenceInstance(name, mask=mask, reference_id=f"{prefix}-{i}-{j}")
                for j, (name, mask) in enumerate(zip(scene.class_names, scene.masks))
            ],
            image_id=f"{prefix}-{i}",
        )
        for i, scene in enumerate(scenes)
    ]


def coco_ground_truth(scenes: Sequence[Scene], classes: Sequence[str] | None = None) -> dict:
    """The scenes as a COCO instances dict: image ids 1.. with file names ``000000.png ...``,
    category ids 1.. in ``classes`` order, masks as compressed RLE.

    ``classes`` are the annotated classes: instances of other classes stay in the images but are
    not annotated (distractors). It defaults to every class in the scenes, in :data:`CLASSES` order.
    """
    present = {name for scene in scenes for name in scene.class_names}
    classes = list(classes) if classes is not None else [name for name in CLASSES if name in present]
    unknown = [name for name in classes if name not in CLASS_STYLES]
    if unknown or len(set(classes)) != len(classes):
        raise SceneError(f"classes {classes!r}: expected distinct names among {', '.join(CLASSES)}")
    category = {name: index + 1 for index, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        height, width = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": f"{image_id - 1:06d}.png", "height": height, "width": width})
        for mask, box, name in zip(scene.masks, scene.boxes, scene.class_names):
            if name not in category:
                continue
            x0, y0, x1, y1 = (int(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category[name],
                    "segmentation": encode_mask(mask),
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "ntt_core.synthetic scenes"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category[name], "name": name, "supercategory": "shape"} for name in classes],
    }


def write_coco_folder(scenes: Sequence[Scene], folder: str | Path, classes: Sequence[str] | None = None) -> Path:
    """Write ``folder/images/000000.png ...`` and ``folder/annotations.json`` from
    :func:`coco_ground_truth` (same ``classes``). Returns the json path."""
    document = coco_ground_truth(scenes, classes)
    folder = Path(folder)
    (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for scene, image in zip(scenes, document["images"]):
        Image.fromarray(scene.image).save(folder / IMAGES_DIR / image["file_name"])
    path = folder / ANNOTATIONS_NAME
    path.write_text(json.dumps(document))
    return path


@dataclass(frozen=True)
class MovingShape:
    """One object of a synthetic video: a class's shape moving in a straight line, drawn from
    frame ``first`` to frame ``last`` (inclusive); later objects are drawn on top."""

    name: str  # a class of CLASS_STYLES
    start: tuple[float, float]  # (x, y) centre at frame ``first``
    velocity: tuple[float, float]  # pixels per frame
    radius: float
    first: int = 0
    last: int = 10**9


@dataclass
class SyntheticVideo:
    """Frames and the exact visible mask and identity of every object in each."""

    frames: list[np.ndarray]  # T x [H, W, 3] uint8
    masks: list[np.ndarray]  # T x [N_t, H, W] bool, visible parts (empty ones left out)
    object_ids: list[np.ndarray]  # T x [N_t] int64, index into ``objects``
    objects: list[MovingShape]

    def scene(self, index: int) -> Scene:
        """Frame ``index`` as a :class:`Scene` (for COCO ground truth)."""
        masks = self.masks[index]
        return Scene(
            image=self.frames[index],
            masks=masks,
            boxes=np.array([mask_box(mask) for mask in masks], dtype=np.int64).reshape(-1, 4),
            class_names=[self.objects[i].name for i in self.object_ids[index]],
        )


def make_video(
    objects: Sequence[MovingShape], frames: int, size: tuple[int, int] = (96, 128), seed: int = 0
) -> SyntheticVideo:
    """A video of ``frames`` frames of ``size`` (H, W): one textured background, ``objects`` moving
    over it (each keeps its colour and texture; shapes leaving the frame are cut at its border)."""
    check_seed(seed)
    unknown = [o.name for o in objects if o.name not in CLASS_STYLES]
    if unknown:
        raise SceneError(
            f"unknown class(es) {', '.join(map(repr, unknown))}; choose one or more of {', '.join(CLASSES)}"
        )
    height, width = size
    background = _background(np.random.default_rng([seed, 0]), size)
    video = SyntheticVideo([], [], [], list(objects))
    for t in range(frames):
        image, shapes = background.copy(), []
        for i, shape in enumerate(objects):
            step = t - shape.first
            if not shape.first <= t <= shape.last:
                shapes.append(np.zeros(size, dtype=bool))
                continue
            centre = (shape.start[0] + step * shape.velocity[0], shape.start[1] + step * shape.velocity[1])
            style = CLASS_STYLES[shape.name]
            mask = _shape_mask(style.shape, size, centre, shape.radius, 0.3)
            colour = _paint(np.random.default_rng([seed, 1 + i]), style, mask, centre, shape.radius)
            image = np.where(mask[:, :, None], colour, image)
            shapes.append(mask)
        visible = [
            mask & ~np.any(shapes[i + 1 :], axis=0) if i + 1 < len(shapes) else mask for i, mask in enumerate(shapes)
        ]
        present = [i for i, mask in enumerate(visible) if mask.any()]
        video.frames.append(np.round(image * 255.0).astype(np.uint8))
        video.masks.append(np.stack([visible[i] for i in present]) if present else np.zeros((0, height, width), bool))
        video.object_ids.append(np.array(present, dtype=np.int64))
    return video
