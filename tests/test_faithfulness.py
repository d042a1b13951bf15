"""The authors' input and output conventions (README, "Faithfulness"), each checked against its
definition (Pillow's output, torch's interpolation, a box computed by hand), never against our own
code. Full-resolution mask upsampling is in test_merging.py, the inclusive results box in
test_coco.py, the authors' sampling in test_coco.py and test_benchmarks.py."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ntt_core.frames import square_frame
from ntt_core.geometry import reference_crop_box
from ntt_core.images import load_image
from ntt_core.memory_bank import build_memory_bank
from ntt_core.predictor import Predictor
from ntt_core.references import ReferenceImage, ReferenceInstance
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter

#: sha256 of ``pattern(w, h).resize((1024, 1024), Image.BICUBIC).tobytes()``, computed once with
#: Pillow 10.4.0 (the authors' pin; ``pip download pillow==10.4.0`` into a throwaway venv).
PILLOW_10_4_SHA256 = {
    (97, 61): "f4a2923e2ff51a8055ffb83501215dfc89eca3a65b0fb8e54aea53c5ce259ac7",  # enlarged
    (1500, 1100): "36f0ddd0ca9d4749a61bc410632152dee4e328d515a34e472bf292ba3a32bf7d",  # shrunk (antialiased)
}


def pattern(width: int, height: int) -> Image.Image:
    """A deterministic RGB test image, made without numpy so any Pillow can rebuild it."""
    data = bytes(
        (x * 7 + y * 13 + c * 50 + (x * y) % 31) % 256 for y in range(height) for x in range(width) for c in range(3)
    )
    return Image.frombytes("RGB", (width, height), data)


def authors_tensor(array: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[1, 3, H, W]`` as their loader does it: ``array / 255.0`` (float64), then float32."""
    return torch.from_numpy(array / 255.0).permute(2, 0, 1)[None].to(torch.float32)


# --- 1. SAM2's frame ---


@pytest.mark.parametrize("size", list(PILLOW_10_4_SHA256))
def test_frame_is_pillows_bicubic_resize_of_the_uint8_image(size):
    image = np.asarray(pattern(*size))
    expected = np.asarray(Image.fromarray(image).resize((1024, 1024), Image.BICUBIC))
    assert torch.equal(square_frame(image, 1024), authors_tensor(expected))


def test_frame_by_hand():
    """2 x 2 black | white to 4 x 4. Pillow's bicubic (a = -0.5) at scale 1/2: output centres at
    0.25, 0.75, 1.25, 1.75 source px; kernel at the two source pixels, normalised:
    (0.8672, -0.0703) / 0.7969, (0.8672, 0.2266) / 1.0938, mirrored for the last two, so
    255 x (-0.088, 0.207, 0.793, 1.088) = (-22.5, 52.8, 202.2, 277.5) -> clipped and rounded."""
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[:, 1] = 255
    frame = square_frame(image, 4)
    assert frame.shape == (1, 3, 4, 4)
    assert (frame * 255).round().to(torch.uint8).tolist() == [[[[0, 53, 202, 255]] * 4] * 3]


@pytest.mark.parametrize("size", list(PILLOW_10_4_SHA256))
def test_pillow_bicubic_is_the_same_as_in_pillow_10_4(size):
    """The installed Pillow resizes bit for bit as Pillow 10.4, the version the authors pinned."""
    resized = pattern(*size).resize((1024, 1024), Image.BICUBIC)
    assert hashlib.sha256(resized.tobytes()).hexdigest() == PILLOW_10_4_SHA256[size]


def test_normalisation_is_torchvisions_normalize_after_the_division_by_255():
    """Their loader divides by 255 in float64, casts to float32, then applies torchvision's
    ``Normalize`` (ImageNet mean and std) on float32: bit for bit what our models get."""
    Normalize = pytest.importorskip("torchvision.transforms").Normalize
    from ntt_core.frames import image_tensor
    from ntt_core.models import normalize

    image = np.asarray(pattern(97, 61))
    theirs = Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(authors_tensor(image))
    assert torch.equal(normalize(image_tensor(image)), theirs)


# --- 2. DINOv2's input of the target ---


def recorded(method, calls: list):
    def record(images, *args):
        calls.append(images.clone())
        return method(images, *args)

    return record


def test_target_inputs_are_the_pillow_frame_and_its_torch_bicubic_without_antialias_or_clamp():
    segmenter, encoder = (
        ConnectedRegionSegmenter(input_size=96, mask_size=48),
        ColourStatsEncoder(input_size=42, grid_size=7),
    )
    reference = np.zeros((60, 80, 3), dtype=np.uint8)
    reference[10:40, 20:50] = (200, 30, 30)
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:40, 20:50] = True
    settings = Settings(points_per_side=4)
    bank = build_memory_bank(
        [ReferenceImage(reference, [ReferenceInstance("red", mask=mask)])], encoder, settings=settings
    )
    image = (np.random.default_rng(0).random((90, 130, 3)) > 0.5).astype(np.uint8) * 255  # bicubic overshoots it
    frames, inputs = [], []
    segmenter.embed, encoder.encode = recorded(segmenter.embed, frames), recorded(encoder.encode, inputs)
    Predictor(segmenter, encoder, bank, settings).predict([image])
    frame = authors_tensor(np.asarray(Image.fromarray(image).resize((96, 96), Image.BICUBIC)))
    assert torch.equal(frames[0], frame)
    expected = F.interpolate(frame, size=(42, 42), mode="bicubic", align_corners=False)  # antialias off
    assert torch.equal(inputs[0], expected)
    assert expected.min() < 0 and expected.max() > 1  # kept out of range, as theirs


# --- 3-5. The reference crop: its box, its rounding, its resizing ---


@pytest.mark.parametrize(
    ("box", "image_size", "crop"),
    [
        # corners int()-ed: 10, 20, 50, 41 -> side 40 x 1.2 = 48, centre (30, 30.5):
        # int(30 - 24) = 6, int(30.5 - 24) = 6, int(30 + 24) = 54, int(30.5 + 24) = 54
        ((10.7, 20.2, 50.9, 41.6), (80, 100), (6, 6, 54, 54)),
        # 2, 3, 30, 12 -> side 33.6, centre (16, 7.5): int(-0.8) = 0, int(-9.3) -> 0, int(32.8) = 32, int(24.3) = 24
        ((2.0, 3.0, 30.0, 12.0), (25, 40), (0, 0, 32, 24)),
        # clipped at the far edges: 60, 40, 98, 78 -> side 45.6, centre (79, 59): 56, 36, min(100, 101), min(80, 81)
        ((60.5, 40.5, 98.9, 78.9), (80, 100), (56, 36, 100, 80)),
    ],
)
def test_reference_crop_box_floors_every_edge(box, image_size, crop):
    assert reference_crop_box(box, image_size, 0.2) == crop


def test_memory_fill_crops_around_the_given_box_and_resizes_by_bicubic_without_antialias():
    rng = np.random.default_rng(0)
    image = (rng.random((80, 100, 3)) * 255).astype(np.uint8)
    mask = np.zeros((80, 100), dtype=bool)
    mask[25:35, 15:45] = True  # its tight box (15, 25, 45, 35) would give another crop
    encoder = ColourStatsEncoder(input_size=42, grid_size=7)
    crops = []
    encoder.encode = recorded(encoder.encode, crops)
    instance = ReferenceInstance("thing", mask=mask, box=(10.7, 20.2, 50.9, 41.6))  # the annotation's bbox
    build_memory_bank([ReferenceImage(image, [instance])], encoder, settings=Settings())
    x0, y0, x1, y1 = 6, 6, 54, 54  # by hand, first case of test_reference_crop_box_floors_every_edge
    expected = F.interpolate(
        authors_tensor(image)[:, :, y0:y1, x0:x1], size=(42, 42), mode="bicubic", align_corners=False
    )
    assert torch.equal(crops[0], expected)
    assert expected.min() < 0 or expected.max() > 1  # noise overshoots: not clamped


def test_reference_descriptor_weights_patches_by_the_bilinear_mask_crop_sampled_nearest():
    """The authors resize the mask crop bilinearly to 518, sample it nearest at the patch grid and
    average the patch features weighted by those values (their ``mem_feats_ins_avg``)."""
    rng = np.random.default_rng(1)
    image = (rng.random((80, 100, 3)) * 255).astype(np.uint8)
    mask = np.zeros((80, 100), dtype=bool)
    mask[22:41, 13:47] = rng.random((19, 34)) > 0.3  # speckled: bilinear gives fractional weights
    encoder = ColourStatsEncoder(input_size=42, grid_size=7)
    bank = build_memory_bank(
        [ReferenceImage(image, [ReferenceInstance("thing", mask=mask, box=(13, 22, 47, 41))])],
        encoder,
        settings=Settings(),
    )
    # side 34 x 1.2 = 40.8 around (30, 31.5): int(9.6), int(11.1), int(50.4), int(51.9)
    x0, y0, x1, y1 = 9, 11, 50, 51
    crop = F.interpolate(authors_tensor(image)[:, :, y0:y1, x0:x1], size=(42, 42), mode="bicubic", align_corners=False)
    soft = F.interpolate(torch.from_numpy(mask[y0:y1, x0:x1]).float()[None, None], size=(42, 42), mode="bilinear")
    weights = F.interpolate(soft, size=(7, 7), mode="nearest")[0, 0]
    assert ((weights > 0) & (weights < 1)).any()  # a binary resize would weigh those patches 0 or 1
    features = encoder.encode(crop)[0]  # [C, 7, 7]
    expected = (features * weights).sum((1, 2)) / weights.sum()
    assert torch.allclose(bank.descriptors[0], expected, atol=1e-6)


# --- EXIF orientation ---


def test_exif_rotated_jpeg_fiftyone_metadata_and_our_masks_share_one_frame(tmp_path):
    """FiftyOne's metadata (and the App, which shows the browser's upright decoding) give an EXIF-
    rotated JPEG its upright size; our images are read upright too, so masks line up. The authors'
    loader (benchmarks/fsod.py) reads the stored pixels."""
    fom = pytest.importorskip("fiftyone.core.metadata")
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:10, :20] = 255  # top-left block of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    metadata = fom.ImageMetadata.build_for(str(path))
    assert (metadata.height, metadata.width) == (60, 40)  # upright
    upright = load_image(path)
    assert upright.shape == (60, 40, 3) and upright[:20, -10:].mean() > 200  # the block turned to the top right
    assert load_image(path, exif_orientation=False).shape == (40, 60, 3)


def test_a_fiftyone_reference_crops_around_its_own_box_in_pixels():
    """A label imported from a COCO bbox (10.7, 20.2, 40.2, 21.4) px in a 100 x 80 image gives that box
    back in pixels, so the crop is the authors' (hand-computed above: 6, 6, 54, 54)."""
    fo = pytest.importorskip("fiftyone")
    from ntt_core.fiftyone.references import reference_instance

    label = fo.Detection(label="thing", bounding_box=[10.7 / 100, 20.2 / 80, 40.2 / 100, 21.4 / 80])
    instance, reason = reference_instance(label, (80, 100))
    assert reason == "" and instance.box == (10.7, 20.2, 50.9, 41.6)
    assert reference_crop_box(instance.box, (80, 100), 0.2) == (6, 6, 54, 54)


def test_masks_are_upsampled_to_the_size_given_as_the_authors_take_it_from_the_json():
    segmenter, encoder = ConnectedRegionSegmenter(input_size=96, mask_size=48), ColourStatsEncoder(42, grid_size=7)
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    image[10:40, 20:50] = (200, 30, 30)
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:40, 20:50] = True
    settings = Settings(points_per_side=4)
    bank = build_memory_bank([ReferenceImage(image, [ReferenceInstance("red", mask=mask)])], encoder, settings=settings)
    predictor = Predictor(segmenter, encoder, bank, settings)
    (own,), (given,) = predictor.predict([image]), predictor.predict([image], sizes=[(120, 160)])
    assert own.image_size == (60, 80) and given.image_size == (120, 160)
    assert len(given) and given.boxes[0].tolist() == [2 * v for v in own.boxes[0].tolist()]
    for sizes in ([(120, 160), (120, 160)], [(0, 160)]):
        with pytest.raises(ValueError, match=r"^sizes must be one \(height, width\) of positive integers per image"):
            predictor.predict([image], sizes=sizes)
