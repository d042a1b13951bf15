"""Synthetic scenes (ntt_core.synthetic) and the stand-in models (ntt_core.standins)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

from ntt_core.coco import load_coco
from ntt_core.models import FeatureEncoder, PromptSegmenter
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter, label_regions
from ntt_core.synthetic import (
    CLASS_STYLES,
    CLASSES,
    IMAGES_DIR,
    SceneError,
    make_dataset,
    make_scene,
    write_coco_folder,
)


def grow(mask: np.ndarray, steps: int = 1, diagonal: bool = False) -> np.ndarray:
    """Dilation by 4-neighbour (or 8-neighbour) steps."""
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1)
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if diagonal or abs(dy) + abs(dx) <= 1]
        out = np.any(
            [padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx] for dy, dx in shifts], axis=0
        )
    return out


def pieces(mask: np.ndarray) -> int:
    """Number of 8-connected pieces of a bool mask."""
    left, count = mask.copy(), 0
    while left.any():
        seed = np.zeros_like(left)
        seed[tuple(np.argwhere(left)[0])] = True
        while True:
            grown = grow(seed, diagonal=True) & left
            if (grown == seed).all():
                break
            seed = grown
        left &= ~seed
        count += 1
    return count


def hue_and_chroma(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 3]`` uint8 -> hue in degrees and chroma in [0, 1]."""
    rgb = pixels.astype(np.float64) / 255.0
    high, low = rgb.max(1), rgb.min(1)
    chroma = high - low
    red, green, blue = rgb.T
    safe = np.maximum(chroma, 1e-9)
    hue = np.where(
        high == red,
        ((green - blue) / safe) % 6,
        np.where(high == green, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    return hue * 60.0, chroma


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a pixel as deep inside the mask as possible."""
    inner = mask
    while True:
        eroded = ~grow(~inner) & inner
        if not eroded.any():
            y, x = np.argwhere(inner)[0]
            return int(x), int(y)
        inner = eroded


SCENES = make_dataset(12, seed=7, size=(120, 160))


# --- scenes ---


@pytest.mark.parametrize("index", range(len(SCENES)))
def test_masks_boxes_and_pixels_agree(index):
    scene = SCENES[index]
    height, width = scene.image.shape[:2]
    assert scene.image.dtype == np.uint8 and scene.image.shape == (120, 160, 3)
    assert scene.masks.shape == (len(scene), height, width) and scene.boxes.shape == (len(scene), 4)
    assert 1 <= len(scene) <= 6
    assert (scene.masks.sum(0) <= 1).all()  # visible parts never overlap
    for mask, box, name in zip(scene.masks, scene.boxes, scene.class_names):
        rows, cols = np.nonzero(mask)
        assert list(box) == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert pieces(mask) == 1
        hue, chroma = hue_and_chroma(scene.image[mask])
        difference = np.abs((hue - CLASS_STYLES[name].hue + 180.0) % 360.0 - 180.0)
        assert (chroma > 0.5).all() and (difference < 12.0).all(), name
    _, chroma = hue_and_chroma(scene.image[~scene.masks.any(0)])
    assert (chroma < 0.1).all()  # the background is grey
    for i in range(len(scene)):
        for j in range(i + 1, len(scene)):
            if scene.class_names[i] == scene.class_names[j]:
                assert not (grow(scene.masks[i], 3) & scene.masks[j]).any()  # same class: 3 px apart


def test_scenes_use_every_class_and_vary():
    names = [name for scene in SCENES for name in scene.class_names]
    assert set(names) == set(CLASSES)
    areas = [int(mask.sum()) for scene in SCENES for mask in scene.masks]
    assert min(areas) >= 60 and max(areas) > 3 * min(areas)


def test_generation_is_deterministic():
    again = make_dataset(12, seed=7, size=(120, 160))
    assert all(
        (a.image == b.image).all() and (a.masks == b.masks).all() and a.class_names == b.class_names
        for a, b in zip(SCENES, again)
    )
    shorter = make_dataset(3, seed=7, size=(120, 160))
    assert all((a.image == b.image).all() for a, b in zip(shorter, SCENES))
    other = make_dataset(3, seed=8, size=(120, 160))
    assert not any(a.image.shape == b.image.shape and (a.image == b.image).all() for a, b in zip(other, SCENES))
    rng_scene = make_scene(np.random.default_rng(3), size=(64, 80), classes=("disc",))
    assert (rng_scene.image == make_scene(np.random.default_rng(3), size=(64, 80), classes=("disc",)).image).all()
    assert set(rng_scene.class_names) == {"disc"}


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"classes": ("disc", "hexagon")},
            "unknown class(es) 'hexagon'; choose one or more of disc, square, triangle, star",
        ),
        ({"radius": (0.1, 0.6)}, "radius range (0.1, 0.6) does not fit a 100x100 image"),
        ({"instances": (3, 2)}, "instances range (3, 2) must satisfy 1 <= low <= high"),
    ],
)
def test_bad_scene_options_are_named(options, message):
    with pytest.raises(SceneError) as error:
        make_scene(np.random.default_rng(0), size=(100, 100), **options)
    assert str(error.value) == message


def test_coco_folder_round_trip(tmp_path):
    scenes = SCENES[:4]
    path = write_coco_folder(scenes, tmp_path)
    load_coco(path)  # valid for the project's own COCO reader
    coco = COCO(str(path))
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == [
        name for name in CLASSES if any(name in s.class_names for s in scenes)
    ]
    for image_id, scene in zip(sorted(coco.imgs), scenes):
        info = coco.imgs[image_id]
        pixels = np.asarray(Image.open(tmp_path / IMAGES_DIR / info["file_name"]).convert("RGB"))
        assert (pixels == scene.image).all() and (info["height"], info["width"]) == scene.image.shape[:2]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(annotations) == len(scene)
        for annotation, mask, box, name in zip(annotations, scene.masks, scene.boxes, scene.class_names):
            assert (coco.annToMask(annotation) == mask).all()
            x0, y0, x1, y1 = box
            assert annotation["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert annotation["area"] == mask.sum() and coco.cats[annotation["category_id"]]["name"] == name


def test_coco_folder_annotates_only_the_chosen_classes(tmp_path):
    path = write_coco_folder(SCENES[:4], tmp_path, classes=["square", "disc"])
    coco = COCO(str(path))
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == ["square", "disc"]
    expected = sum(name in ("square", "disc") for scene in SCENES[:4] for name in scene.class_names)
    assert len(coco.anns) == expected


# --- stand-in models ---


def frame_of(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def test_standins_follow_the_protocols():
    assert isinstance(ColourStatsEncoder(), FeatureEncoder)
    assert isinstance(ConnectedRegionSegmenter(), PromptSegmenter)
    assert ColourStatsEncoder().fingerprint != ColourStatsEncoder(hue_bins=8).fingerprint


def test_label_regions_finds_the_connected_regions_of_similar_colour():
    image = np.full((3, 12, 16), 0.5, dtype=np.float32)
    image[:, 2:6, 2:6] = [[[0.9]], [[0.1]], [[0.1]]]  # two red squares apart
    image[:, 2:6, 9:13] = [[[0.9]], [[0.1]], [[0.1]]]
    image[:, 8:11, 2:14] = np.linspace(0.2, 0.4, 12, dtype=np.float32)  # a smooth ramp: one region
    labels = label_regions(torch.from_numpy(image), tolerance=0.05).numpy()
    assert labels.max() == 3
    for region in (np.s_[2:6, 2:6], np.s_[2:6, 9:13], np.s_[8:11, 2:14]):
        assert len(np.unique(labels[region])) == 1
        assert (labels == labels[region][0, 0]).sum() == labels[region].size


def test_segmenter_answers_points_with_the_shape_under_them():
    scene = make_scene(np.random.default_rng(11), size=(128, 128))
    segmenter = ConnectedRegionSegmenter(input_size=128, mask_size=128)
    features = segmenter.embed(frame_of(scene.image))
    points = [interior_point(mask) for mask in scene.masks]
    background = interior_point(~grow(scene.masks.any(0), 4))
    logits, iou = segmenter.segment_points(features, torch.tensor([[*points, background]], dtype=torch.float32) + 0.5)
    assert logits.shape == (1, len(points) + 1, 3, 128, 128) and iou.shape == (1, len(points) + 1, 3)
    best = iou[0].argmax(1)
    assert best.tolist() == [p % 3 for p in range(len(points) + 1)]  # the best output's position rotates
    for p, truth in enumerate(scene.masks):
        region = (logits[0, p, best[p]] > 0).numpy()
        assert (region & truth).sum() / (region | truth).sum() > 0.98
        others = [(logits[0, p, k] > 0).numpy() for k in range(3) if k != best[p]]
        assert any((other >= region).all() and other.sum() > region.sum() for other in others)  # dilated
        assert any((other <= region).all() and 0 < other.sum() < region.sum() for other in others)  # a part
    assert iou[0, -1].max() < iou[0, :-1].max(1).values.min()  # the large background scores lowest


def test_segmenter_answers_boxes_with_the_shape_inside():
    scene = make_scene(np.random.default_rng(12), size=(96, 96))
    segmenter = ConnectedRegionSegmenter(input_size=192, mask_size=96)  # frame = 2x the image
    features = segmenter.embed(
        F.interpolate(frame_of(scene.image), size=(192, 192), mode="bilinear", align_corners=False)
    )
    logits, iou = segmenter.segment_boxes(features, torch.from_numpy(scene.boxes).float()[None] * 2.0)
    assert logits.shape == (1, len(scene), 96, 96) and iou.shape == (1, len(scene))
    for mask, truth in zip((logits[0] > 0).numpy(), scene.masks):
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9


@pytest.mark.bad_input
def test_standins_reject_wrong_shapes():
    segmenter = ConnectedRegionSegmenter(input_size=64)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 64, 64\], got \(1, 3, 32, 32\)"):
        segmenter.embed(torch.zeros(1, 3, 32, 32))
    features = segmenter.embed(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected points \[1, N, 2\], got \(2, 5, 2\)"):
        segmenter.segment_points(features, torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 112, 112\]"):
        ColourStatsEncoder().encode(torch.zeros(1, 3, 64, 64))


def test_encoder_features_separate_the_classes():
    """Mask-pooled, L2-normalised patch features: each instance is close to its class's mean and far
    from the others; the background is far from every class."""
    encoder = ColourStatsEncoder(input_size=120, grid_size=15)
    descriptors, names, backgrounds = [], [], []
    for scene in make_dataset(8, seed=5, size=(120, 120)):
        features = encoder.encode(frame_of(scene.image))
        assert features.shape == (1, 16, 15, 15)
        dense = F.interpolate(features, size=(120, 120), mode="bilinear", align_corners=False)[0].flatten(1)  # [C, H*W]
        for mask, name in zip(scene.masks, scene.class_names):
            descriptors.append(dense[:, torch.from_numpy(mask.flatten())].mean(1))
            names.append(name)
        backgrounds.append(dense[:, torch.from_numpy(~scene.masks.any(0).flatten())].mean(1))
    descriptors = F.normalize(torch.stack(descriptors), dim=1)
    assert set(names) == set(CLASSES)
    labels = torch.tensor([CLASSES.index(name) for name in names])
    prototypes = F.normalize(torch.stack([descriptors[labels == k].mean(0) for k in range(len(CLASSES))]), dim=1)
    cosine = descriptors @ prototypes.T  # [N, K]
    own = cosine.gather(1, labels[:, None])[:, 0]
    other = cosine.scatter(1, labels[:, None], -1.0).max(1).values
    assert own.min() > 0.9 and other.max() < 0.4
    assert (F.normalize(torch.stack(backgrounds), dim=1) @ prototypes.T).max() < 0.4
