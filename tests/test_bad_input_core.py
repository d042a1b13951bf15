"""Bad input to the engine: image files and arrays of every awkward kind, and settings out of range.

Each case either works (the image is read upright as RGB uint8) or fails with an :class:`ImageError`
or ``ValueError`` whose message names the input and the reason; in a batch, a bad image is reported
in its place and the others are still processed.
"""

import numpy as np
import pytest
from PIL import Image

from ntt_core.images import ImageError, as_rgb_array, load_image
from ntt_core.instances import Instances
from ntt_core.memory_bank import build_memory_bank
from ntt_core.predictor import Predictor
from ntt_core.settings import Settings
from ntt_core.standins import ColourStatsEncoder, ConnectedRegionSegmenter
from ntt_core.synthetic import make_dataset, reference_images

pytestmark = pytest.mark.bad_input


@pytest.fixture(scope="module")
def predictor():
    segmenter, encoder = ConnectedRegionSegmenter(input_size=96), ColourStatsEncoder(input_size=56, grid_size=7)
    settings = Settings(points_per_side=6)
    bank = build_memory_bank(reference_images(make_dataset(1, seed=1, size=(64, 80))), encoder, settings=settings)
    return Predictor(segmenter, encoder, bank, settings)


def marked_image() -> np.ndarray:
    """A 20x30 RGB image whose corners tell every rotation and flip apart."""
    image = np.full((20, 30, 3), 90, dtype=np.uint8)
    image[:5, :6] = (255, 0, 0)
    image[-4:, :3] = (0, 0, 255)
    image[:2, -8:] = (0, 255, 0)
    return image


# --- image files ---


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (2, lambda a: a[:, ::-1]),  # mirrored
        (3, lambda a: np.rot90(a, 2)),
        (5, lambda a: np.rot90(a, 1)[::-1]),  # transposed
        (6, lambda a: np.rot90(a, -1)),  # the usual phone photo held upright: 90 degrees clockwise
        (8, lambda a: np.rot90(a, 1)),
    ],
)
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_rotated_images_are_read_upright(tmp_path, orientation, upright, suffix):
    stored = marked_image()
    pil = Image.fromarray(stored)
    exif = pil.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{suffix}"
    pil.save(path, exif=exif, quality=100, subsampling=0) if suffix == ".jpg" else pil.save(path, exif=exif)
    image = load_image(path)
    expected = upright(stored)
    assert image.shape == expected.shape and image.dtype == np.uint8
    tolerance = 0 if suffix == ".png" else 40  # JPEG blurs the colour edges a little
    assert np.abs(image.astype(int) - expected).max() <= tolerance


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)), [[0, 100], [255, 7]]),
        (lambda: Image.fromarray(np.array([[0, 100], [255, 7]], dtype=np.uint8), mode="L"), [[0, 100], [255, 7]]),
        (lambda: Image.fromarray(np.array([[0, 1], [1, 0]], dtype=bool)), [[0, 255], [255, 0]]),
        (lambda: Image.fromarray(np.array([[0, 100], [255, 7]], dtype=np.uint8)).convert("LA"), [[0, 100], [255, 7]]),
        (lambda: Image.fromarray(np.array([[0, 100], [255, 7]], dtype=np.uint8)).convert("P"), [[0, 100], [255, 7]]),
    ],
    ids=["16-bit", "grayscale", "1-bit", "grayscale+alpha", "palette"],
)
def test_deep_grey_and_palette_files_become_rgb(tmp_path, make, expected):
    path = tmp_path / "image.png"
    make().save(path)
    image = load_image(path)
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    assert (image == np.array(expected, dtype=np.uint8)[:, :, None]).all()


def test_rgba_and_cmyk_files_become_rgb(tmp_path):
    rgb = marked_image()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, dtype=np.uint8)])  # nearly transparent: alpha is dropped
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert np.abs(load_image(tmp_path / "cmyk.tif").astype(int) - rgb).max() <= 1


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "image file not found"),
        (lambda p: p.mkdir(), "image file not found"),
        (lambda p: p.write_bytes(b""), "unreadable or corrupt image (cannot identify image file"),
        (lambda p: p.write_text("name,value\n"), "unreadable or corrupt image (cannot identify image file"),
        (lambda p: p.write_bytes(png_bytes()[:60]), "unreadable or corrupt image ("),
        (lambda p: p.write_bytes(png_bytes()[:-30]), "unreadable or corrupt image ("),
    ],
    ids=["missing", "folder", "empty", "text", "truncated header", "truncated data"],
)
def test_unreadable_files_name_the_file_and_the_reason(tmp_path, write, message):
    path = tmp_path / "image.png"
    if write is not None:
        write(path)
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert str(error.value).startswith(f"{path}: {message}")


def png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decompression_bombs_are_refused_and_the_batch_goes_on(tmp_path, predictor, monkeypatch):
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    Image.fromarray(make_dataset(1, seed=2, size=(40, 48))[0].image).save(good)
    Image.new("RGB", (100, 100)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)  # PIL refuses images over twice this many pixels
    with pytest.raises(ImageError) as error:
        load_image(bomb)
    assert str(error.value).startswith(f"{bomb}: too large to decode safely (Image size (10000 pixels) exceeds limit")
    assert str(error.value).endswith("if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS")
    results = predictor.predict_paths([bomb, good])
    assert isinstance(results[0], ImageError) and "too large to decode safely" in str(results[0])
    assert isinstance(results[1], Instances) and results[1].image_size == (40, 48)


# --- arrays ---


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((8, 8, 3), np.nan), "image 1: image holds NaN or infinite values"),
        (np.full((8, 8), np.inf, dtype=np.float32), "image 1: image holds NaN or infinite values"),
        (np.zeros((8, 8, 3), dtype=np.complex64), "image 1: unsupported pixel type complex64"),
        (np.zeros((8, 8, 3), dtype=object), "image 1: unsupported pixel type object"),
        (
            np.zeros((8, 8, 2), dtype=np.uint8),
            "image 1: expected an image of shape [H, W] or [H, W, 1|3|4], got (8, 8, 2)",
        ),
        (
            np.zeros((1, 8, 8, 3), dtype=np.uint8),
            "image 1: expected an image of shape [H, W] or [H, W, 1|3|4], got (1, 8, 8, 3)",
        ),
        (np.zeros((0, 8, 3), dtype=np.uint8), "image 1: image has no pixels (shape (0, 8, 3))"),
        (np.zeros((1, 1, 3), dtype=np.uint8), "image 1: 1x1 px is smaller than one 8-px encoder patch"),
        (np.zeros((5000, 7, 3), dtype=np.uint8), "image 1: 7x5000 px is smaller than one 8-px encoder patch"),
    ],
    ids=["nan", "inf", "complex", "object", "two channels", "batch axis", "empty", "1x1", "thin strip"],
)
def test_arrays_that_are_not_usable_images_are_refused_by_position(predictor, array, message):
    good = make_dataset(1, seed=2, size=(40, 48))[0].image
    with pytest.raises(ImageError) as error:
        predictor.predict([good, array])
    assert str(error.value) == message


def test_float_and_16_bit_arrays_are_scaled_not_clipped():
    ramp = np.linspace(0.0, 1.0, 256).reshape(16, 16)
    assert np.array_equal(as_rgb_array(ramp)[:, :, 0], np.round(ramp * 255).astype(np.uint8))
    assert np.array_equal(as_rgb_array(ramp * 255.0), as_rgb_array(ramp))  # 0..255 floats are taken as they are
    deep = (ramp * 65535).astype(np.uint16)
    assert np.abs(as_rgb_array(deep).astype(int) - as_rgb_array(ramp)).max() <= 1


# --- settings ---


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"score_threshold": 1.5}, "Invalid settings: score_threshold=1.5 (must be in [0, 1])"),
        ({"score_threshold": -0.01}, "Invalid settings: score_threshold=-0.01 (must be in [0, 1])"),
        ({"score_threshold": float("nan")}, "Invalid settings: score_threshold=nan (must be in [0, 1])"),
        ({"sam_iou_threshold": 1.01}, "Invalid settings: sam_iou_threshold=1.01 (must be in [0, 1])"),
        ({"nms_iou_threshold": 0.0}, "Invalid settings: nms_iou_threshold=0.0 (must be in (0, 1])"),
        ({"negative_temperature": 0.0}, "Invalid settings: negative_temperature=0.0 (must be > 0 and finite)"),
        ({"soft_merge_exponent": float("inf")}, "Invalid settings: soft_merge_exponent=inf (must be >= 0 and finite)"),
        ({"context_ratio": -1.0}, "Invalid settings: context_ratio=-1.0 (must be >= 0 and finite)"),
        ({"points_per_side": 0}, "Invalid settings: points_per_side=0 (must be >= 1)"),
        ({"max_detections": 0}, "Invalid settings: max_detections=0 (must be >= 1)"),
        ({"encoder_size": 0}, "Invalid settings: encoder_size=0 (must be >= 1 or None)"),
        (
            {"score_threshold": 2.0, "sam_iou_threshold": -1.0},
            "Invalid settings: sam_iou_threshold=-1.0 (must be in [0, 1]), score_threshold=2.0 (must be in [0, 1])",
        ),
    ],
)
def test_settings_out_of_range_name_the_value_and_the_rule(changes, message):
    with pytest.raises(ValueError) as error:
        Settings(**changes)
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        Settings.from_dict({**Settings().to_dict(), **changes})
    assert str(error.value) == message


def test_unknown_settings_are_named():
    with pytest.raises(ValueError, match="^Unknown settings: score_treshold$"):
        Settings.from_dict({"score_treshold": 0.5})
