"""Windowed full-resolution masks and soft merging against full-size naive computations.

The full-resolution masks are defined as the authors compute them:
``F.interpolate(logits, size, mode="bilinear", align_corners=False, antialias=True) > 0``."""

import pytest
import torch
import torch.nn.functional as F

from ntt_core.geometry import mask_boxes
from ntt_core.merging import crop_masks, full_resolution_stats, soft_merge_factors, taps, upsample_window, window_bounds


def upsampled(logits, image_size):
    """The authors' full-resolution logits ``[N, H, W]``."""
    return F.interpolate(logits[:, None], size=image_size, mode="bilinear", align_corners=False, antialias=True)[:, 0]


def random_logits(count, size, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, size, size, generator=generator) - 1.0
    blobs = F.avg_pool2d(logits[:, None], 5, 1, 2)[:, 0] * 8  # smooth blobs, some empty
    return blobs


@pytest.mark.parametrize("image_size", [(50, 70), (13, 9), (64, 64)])
def test_upsample_window_equals_interpolate(image_size):
    logits = random_logits(3, 16, 0)
    full = upsampled(logits, image_size)
    rows, cols = taps(16, image_size[0], logits.device), taps(16, image_size[1], logits.device)
    window = upsample_window(logits, rows, cols, 2, image_size[0] - 1, 1, image_size[1] - 3)
    assert torch.allclose(window, full[:, 2 : image_size[0] - 1, 1 : image_size[1] - 3], atol=1e-5)


@pytest.mark.parametrize("image_size", [(50, 70), (13, 9), (97, 31)])
def test_windows_contain_every_full_resolution_mask(image_size):
    logits = random_logits(12, 16, 1)
    low = logits > 0
    logits, low = logits[low.flatten(1).any(1)], low[low.flatten(1).any(1)]
    full = upsampled(logits, image_size) > 0
    windows = window_bounds(mask_boxes(low), 16, image_size)
    for mask, (x0, y0, x1, y1) in zip(full, windows.tolist()):
        inside = torch.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert not (mask & ~inside).any()


@pytest.mark.parametrize(("chunk", "tile"), [(1 << 26, 1024), (64, 1024), (1 << 26, 16), (1 << 26, 7)])
def test_full_resolution_stats_equal_naive(monkeypatch, chunk, tile):
    import ntt_core.merging as merging

    monkeypatch.setattr(merging, "CHUNK_ELEMENTS", chunk)  # tiny chunks or tiles exercise the tile loop
    monkeypatch.setattr(merging, "TILE_SIDE", tile)
    image_size = (45, 61)
    logits = random_logits(10, 16, 2)
    keep = (logits > 0).flatten(1).any(1)
    logits = logits[keep]
    labels = torch.arange(logits.shape[0]) % 2
    windows = window_bounds(mask_boxes(logits > 0), 16, image_size)
    areas, boxes, inter = full_resolution_stats(logits, labels, windows, image_size)
    full = (upsampled(logits, image_size) > 0).float()
    flat = full.flatten(1)
    naive_inter = (flat @ flat.T) * (labels[:, None] == labels[None, :])
    assert torch.equal(areas, flat.sum(1).double())
    assert torch.equal(inter, naive_inter.double())
    for mask, box, area in zip(full.bool(), boxes.tolist(), areas.tolist()):
        if area == 0:
            assert box == [0, 0, 0, 0]
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_soft_merge_damps_a_part_inside_a_similar_better_ranked_whole():
    # 0: whole (area 100); 1: part of 0 (area 20, fully inside), same look; 2: part with orthogonal look
    areas = torch.tensor([100.0, 20.0, 20.0], dtype=torch.float64)
    inter = torch.tensor([[100, 20, 20], [20, 20, 0], [20, 0, 20]], dtype=torch.float64)
    descriptors = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    factors = soft_merge_factors(areas, inter, descriptors, exponent=0.5)
    assert factors[0].item() == pytest.approx(1.0)  # nothing ranks before it
    assert factors[1].item() == pytest.approx((1 - 1.0 * 0.8) ** 0.5)  # IoS = 20/20 x cos 0.8
    assert factors[2].item() == pytest.approx(1.0)  # inside 0 but cosine 0
    # a better-ranked part does not damp the whole that comes after it
    reversed_order = soft_merge_factors(areas.flip(0), inter.flip(0).flip(1), descriptors.flip(0), 0.5)
    assert reversed_order[2].item() == pytest.approx((1 - 0.2 * 0.8) ** 0.5)  # 20/100 x cos 0.8


@pytest.mark.parametrize("chunk", [1 << 26, 1])  # one batch of windows; one window per batch
def test_crop_masks_equal_full_masks_cut_to_their_boxes(monkeypatch, chunk):
    import ntt_core.merging as merging

    monkeypatch.setattr(merging, "CHUNK_ELEMENTS", chunk)
    image_size = (40, 33)
    logits = random_logits(6, 16, 3)
    logits = logits[(logits > 0).flatten(1).any(1)]
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    windows = window_bounds(mask_boxes(logits > 0), 16, image_size)
    areas, boxes, _ = full_resolution_stats(logits, labels, windows, image_size)
    keep = areas > 0
    full = upsampled(logits[keep], image_size) > 0
    crops = crop_masks(logits[keep], boxes[keep], image_size)
    for mask, crop, (x0, y0, x1, y1) in zip(full, crops, boxes[keep].tolist()):
        assert crop.shape == (y1 - y0, x1 - x0)
        assert (torch.from_numpy(crop) == mask[y0:y1, x0:x1]).all()
        assert mask.sum().item() == crop.sum()


def test_full_resolution_masks_are_antialiased_where_a_side_shrinks():
    """The authors' antialiased upsampling differs from plain bilinear once a side of the image is
    under the mask size (here 48 < 64); our windowed masks follow theirs."""
    generator = torch.Generator().manual_seed(4)
    centres, radii = (
        torch.rand(12, 2, 1, 1, generator=generator) * 64,
        torch.rand(12, 1, 1, generator=generator) * 6 + 1,
    )
    grid = torch.arange(64.0)
    # discs [12, 64, 64]
    logits = radii**2 - (grid[:, None] - centres[:, 0]) ** 2 - (grid[None, :] - centres[:, 1]) ** 2
    image_size = (48, 90)
    authors = upsampled(logits, image_size) > 0
    plain = F.interpolate(logits[:, None], size=image_size, mode="bilinear", align_corners=False)[:, 0] > 0
    assert (authors != plain).any()  # the two definitions disagree on this image, so the test can fail
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    windows = window_bounds(mask_boxes(logits > 0), 64, image_size)
    areas, boxes, _ = full_resolution_stats(logits, labels, windows, image_size)
    assert torch.equal(areas, authors.flatten(1).sum(1).double())
    keep = areas > 0
    for mask, crop, (x0, y0, x1, y1) in zip(
        authors[keep], crop_masks(logits[keep], boxes[keep], image_size), boxes[keep].tolist()
    ):
        assert torch.equal(torch.from_numpy(crop), mask[y0:y1, x0:x1]) and crop.sum() == mask.sum()


def test_crop_masks_of_empty_and_clipped_boxes():
    """A box of no pixels gives an empty crop; any box gives exactly its pixels of the full mask."""
    logits = random_logits(2, 16, 5)
    image_size = (30, 20)
    full = upsampled(logits, image_size) > 0
    boxes = torch.tensor([[3, 4, 9, 4], [0, 25, 20, 30]])  # no rows; the last rows, every column
    empty, bottom = crop_masks(logits, boxes, image_size)
    assert empty.shape == (0, 6) and empty.dtype == bool
    assert torch.equal(torch.from_numpy(bottom), full[1, 25:30, 0:20])
