"""Full-resolution masks from SAM2's low-resolution logits, computed only where needed, and the
method's semantic-aware soft merging.

The authors upsample with ``F.interpolate(bilinear, align_corners=False, antialias=True)``: separable,
a few taps per output pixel (two when a side grows, more when it shrinks below the mask size), so
any window of the full-resolution mask can be computed from the logits alone: a 10,000 x 10,000
image never needs hundreds of full-size masks in memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Elements of float32 scratch per chunk of upsampled masks (256 MB).
CHUNK_ELEMENTS = 1 << 26
#: Largest side of the square tiles :func:`full_resolution_stats` works in (smaller with many masks):
#: small tiles upsample each mask over little more than its own window (benchmarks/RESULTS.md).
TILE_SIDE = 128


@dataclass(frozen=True)
class Taps:
    """Taps of one axis: output pixel i = sum over k of weight[i, k] * source[index[i, k]]; the
    nonzero weights (all positive) sit at source pixels first[i] .. last[i]."""

    index: torch.Tensor  # [out, K] int64
    weight: torch.Tensor  # [out, K] float32, 0 past a pixel's last tap
    first: torch.Tensor  # [out] int64, non-decreasing
    last: torch.Tensor  # [out] int64, non-decreasing


@functools.lru_cache(maxsize=32)
def _taps_cpu(source: int, target: int) -> Taps:
    # The weights of the very interpolation call, read off an identity resized along one axis only
    # (the other keeps its size, which the antialiased kernel copies exactly).
    matrix = F.interpolate(
        torch.eye(source)[None, None], size=(target, source), mode="bilinear", align_corners=False, antialias=True
    )[0, 0]  # [target, source]
    nonzero = (matrix != 0).int()
    first = nonzero.argmax(1)
    last = source - 1 - nonzero.flip(1).argmax(1)
    position = first[:, None] + torch.arange(int((last - first).max()) + 1)
    index = position.clamp(max=source - 1)
    weight = matrix.gather(1, index) * (position <= last[:, None])
    return Taps(index, weight, first, last)


def taps(source: int, target: int, device: torch.device) -> Taps:
    """The weights of ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)``
    along one axis of ``source`` -> ``target`` pixels."""
    cpu = _taps_cpu(source, target)
    return Taps(*(t.to(device) for t in (cpu.index, cpu.weight, cpu.first, cpu.last)))


def _resample_rows(values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over k of weight[:, k] * values[:, index[:, k]] along dim 1 of ``values`` ``[N, A, B]`` -> ``[N, n, B]``
    (whole rows copied per tap, so the cost is a few passes over memory, not a gather per pixel)."""
    out = values.index_select(1, index[:, 0]) * weight[:, 0, None]
    for k in range(1, index.shape[1]):  # over taps, a handful, never over masks
        out = out + values.index_select(1, index[:, k]) * weight[:, k, None]
    return out


def upsample_window(
    logits: torch.Tensor,
    rows: Taps,
    cols: Taps,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    members: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows y0:y1 and columns x0:x1 of the upsampled logits ``[N, m, m]`` (of ``logits[members]``
    ``[A]`` only, when given) -> ``[N or A, y1-y0, x1-x0]`` (columns first, then rows, like PyTorch's
    separable kernel). Only the low-resolution rows and columns the window reads are copied."""
    row_index, col_index = rows.index[y0:y1], cols.index[x0:x1]
    low, high = int(rows.first[y0]), int(row_index.max()) + 1  # the low-resolution rows this window reads
    left, right = int(cols.first[x0]), int(col_index.max()) + 1  # and columns
    read = logits[:, low:high, left:right]
    if members is not None:
        read = read.index_select(0, members)
    band = _resample_rows(read.transpose(1, 2), col_index - left, cols.weight[x0:x1])  # [N, x1-x0, rows read]
    return _resample_rows(band.transpose(1, 2), row_index - low, rows.weight[y0:y1])


def window_bounds(low_boxes: torch.Tensor, mask_size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """Full-resolution windows ``[N, 4]`` (x0, y0, x1, y1), end-exclusive, certain to contain the
    upsampled masks whose low-resolution inclusive boxes are ``low_boxes`` ``[N, 4]``.

    The weights are positive and sum to one, so an output pixel is positive only if one of its taps
    is: the window is every output pixel whose taps reach into the box.
    """
    height, width = image_size
    device = low_boxes.device
    rows, cols = taps(mask_size, height, device), taps(mask_size, width, device)
    boxes = low_boxes.long()
    return torch.stack(
        [
            torch.searchsorted(cols.last, boxes[:, 0].contiguous()),
            torch.searchsorted(rows.last, boxes[:, 1].contiguous()),
            torch.searchsorted(cols.first, boxes[:, 2].contiguous(), right=True),
            torch.searchsorted(rows.first, boxes[:, 3].contiguous(), right=True),
        ],
        dim=1,
    )


def full_resolution_stats(
    logits: torch.Tensor, labels: torch.Tensor, windows: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Areas, tight boxes and same-class intersections of the upsampled masks (logit > 0), computed
    tile by tile without holding the full-size masks.

    logits ``[N, m, m]``, labels ``[N]``, windows ``[N, 4]`` from :func:`window_bounds` ->
    areas ``[N]`` float64, boxes ``[N, 4]`` int64 (x0, y0, x1, y1 end-exclusive; zeros if empty),
    intersections ``[N, N]`` float64 (zero across classes).

    Each square tile upsamples only the masks whose windows reach into it, and only over the part
    of the tile those windows cover, so the work follows the masks' windows, not the image's size.
    """
    height, width = image_size
    count, device = logits.shape[0], logits.device
    rows, cols = taps(logits.shape[1], height, device), taps(logits.shape[2], width, device)
    areas = torch.zeros(count, dtype=torch.float64, device=device)
    intersections = torch.zeros(count, count, dtype=torch.float64, device=device)
    y_min = torch.full((count,), height, dtype=torch.int64, device=device)
    y_max = torch.full((count,), -1, dtype=torch.int64, device=device)
    x_min = torch.full((count,), width, dtype=torch.int64, device=device)
    x_max = torch.full((count,), -1, dtype=torch.int64, device=device)
    side = max(1, min(TILE_SIDE, math.isqrt(CHUNK_ELEMENTS // max(1, count))))  # exact float counts: side**2 < 2**24
    for top in range(0, height, side):
        in_rows = (windows[:, 1] < top + side) & (windows[:, 3] > top)
        for left in range(0, width, side):
            active = torch.nonzero(in_rows & (windows[:, 0] < left + side) & (windows[:, 2] > left)).flatten()
            if active.numel() == 0:
                continue
            reach = windows[active]
            y0, y1 = max(top, int(reach[:, 1].min())), min(top + side, height, int(reach[:, 3].max()))
            x0, x1 = max(left, int(reach[:, 0].min())), min(left + side, width, int(reach[:, 2].max()))
            if y1 <= y0 or x1 <= x0:
                continue
            active = active[labels[active].argsort(stable=True)]  # each class's members side by side
            masks = upsample_window(logits, rows, cols, y0, y1, x0, x1, active) > 0  # [A, y1 - y0, x1 - x0]
            flat = masks.flatten(1).float()
            areas[active] += flat.sum(1).double()
            start = 0
            for size in torch.unique_consecutive(labels[active], return_counts=True)[1].tolist():  # same-class pairs
                if size > 1:
                    of_class, index = flat[start : start + size], active[start : start + size]
                    intersections[index[:, None], index[None, :]] += (of_class @ of_class.T).double()
                start += size
            in_tile_rows, in_tile_cols = masks.any(dim=2), masks.any(dim=1)  # [A, y1 - y0], [A, x1 - x0]
            row_index = torch.arange(y0, y1, device=device)
            col_index = torch.arange(x0, x1, device=device)
            y_min[active] = torch.minimum(y_min[active], torch.where(in_tile_rows, row_index, height).min(1).values)
            y_max[active] = torch.maximum(y_max[active], torch.where(in_tile_rows, row_index, -1).max(1).values)
            x_min[active] = torch.minimum(x_min[active], torch.where(in_tile_cols, col_index, width).min(1).values)
            x_max[active] = torch.maximum(x_max[active], torch.where(in_tile_cols, col_index, -1).max(1).values)
    intersections.diagonal().copy_(areas)  # a mask alone in its class in a tile adds no product there
    boxes = torch.stack([x_min, y_min, x_max + 1, y_max + 1], dim=1) * (areas > 0)[:, None]
    return areas, boxes, intersections


def soft_merge_factors(
    areas: torch.Tensor, intersections: torch.Tensor, descriptors: torch.Tensor, exponent: float = 0.5
) -> torch.Tensor:
    """(1 - IoS)^exponent for candidates in rank order (best first).

    IoS_i = max over earlier candidates j of the same class of |m_i & m_j| / |m_i| x max(0, cos(f_i, f_j)).
    areas ``[N]``, intersections ``[N, N]`` (zero across classes), descriptors ``[N, C]`` L2-normalised
    -> ``[N]``.
    """
    count = areas.shape[0]
    if count == 0:
        return areas.new_zeros(0, dtype=torch.float32)
    cosine = (descriptors @ descriptors.T).clamp(min=0.0).double()
    overlap = intersections / areas.clamp(min=1.0)[:, None] * cosine
    earlier = torch.ones(count, count, dtype=torch.bool, device=areas.device).tril(diagonal=-1)  # j < i
    ios = overlap.masked_fill(~earlier, 0.0).max(dim=1).values.clamp(0.0, 1.0)
    return (1.0 - ios).pow(exponent).float()


def crop_masks(logits: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> list:
    """Full-resolution masks of ``logits`` ``[K, m, m]`` cropped to their end-exclusive ``boxes``
    ``[K, 4]``, as bool numpy arrays ``[y1 - y0, x1 - x0]`` (one window each, never the whole image).

    Windows of similar height are upsampled together, padded to the batch's largest (at most 1.5 x
    the pixels they hold, and ``CHUNK_ELEMENTS`` unless one window alone is larger), each from only
    the low-resolution rows it reads; one copy to the host per batch, none per mask.
    """
    height, width = image_size
    count = logits.shape[0]
    rows, cols = taps(logits.shape[1], height, logits.device), taps(logits.shape[2], width, logits.device)
    bounds = boxes.to("cpu", torch.int64).reshape(-1, 4)
    heights = (bounds[:, 3] - bounds[:, 1]).clamp(min=0).tolist()
    widths = (bounds[:, 2] - bounds[:, 0]).clamp(min=0).tolist()
    crops: list = [np.zeros((h, w), dtype=bool) for h, w in zip(heights, widths)]
    order = sorted((i for i in range(count) if heights[i] and widths[i]), key=lambda i: -heights[i])
    start = 0
    while start < len(order):
        tallest, widest, pixels, end = heights[order[start]], widths[order[start]], 0, start
        while end < len(order):
            grown, area = max(widest, widths[order[end]]), heights[order[end]] * widths[order[end]]
            padded = (end + 1 - start) * tallest * grown
            if end > start and (padded > 1.5 * (pixels + area) or padded > CHUNK_ELEMENTS):
                break
            widest, pixels, end = grown, pixels + area, end + 1
        members = order[start:end]
        start = end
        for crop, i in zip(_upsample_windows(logits, members, rows, cols, bounds[members], tallest, widest), members):
            crops[i] = np.ascontiguousarray(crop[: heights[i], : widths[i]])
    return crops


def _upsample_windows(
    logits: torch.Tensor, members: list[int], rows: Taps, cols: Taps, bounds: torch.Tensor, tallest: int, widest: int
) -> np.ndarray:
    """Upsampled masks (logit > 0) of ``logits[members]`` (``logits`` ``[K, m, m]``, G members) over
    their own windows ``bounds`` ``[G, 4]`` (CPU, non-empty), padded to ``[G, tallest, widest]`` bool (numpy)."""
    device = logits.device
    last_y, last_x = bounds[:, 3:4] - 1, bounds[:, 2:3] - 1
    y = torch.minimum(bounds[:, 1:2] + torch.arange(tallest), last_y).to(device)  # [G, tallest]
    x = torch.minimum(bounds[:, 0:1] + torch.arange(widest), last_x).to(device)  # [G, widest]
    row_index = rows.index[y]  # [G, tallest, K]
    low = rows.first[y[:, :1]]  # [G, 1]: the first low-resolution row each window reads
    read = int((row_index.amax((1, 2)) - low[:, 0]).max()) + 1  # the most rows one window reads
    band_rows = (low + torch.arange(read, device=device)).clamp(max=logits.shape[1] - 1)  # [G, read]
    band = logits[torch.tensor(members, device=device)[:, None], band_rows]  # [G, read, m]
    band = _gather_resample(band, 2, cols.index[x], cols.weight[x])  # [G, read, widest]
    upsampled = _gather_resample(band, 1, row_index - low[:, :, None], rows.weight[y])  # [G, tallest, widest]
    return (upsampled > 0).cpu().numpy()


def _gather_resample(values: torch.Tensor, dim: int, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each item's own taps along ``dim`` (1 or 2) of ``values`` ``[G, A, B]``: index, weight ``[G, n, K]``
    -> ``[G, n, B]`` (dim 1) or ``[G, A, n]`` (dim 2); the same sums, in the same order, as :func:`_resample_rows`."""

    def tap(k: int) -> torch.Tensor:
        if dim == 1:
            at = index[:, :, k, None].expand(-1, -1, values.shape[2])
            return values.gather(1, at) * weight[:, :, k, None]
        at = index[:, None, :, k].expand(-1, values.shape[1], -1)
        return values.gather(2, at) * weight[:, None, :, k]

    out = tap(0)
    for k in range(1, index.shape[2]):  # over taps, a handful, never over masks
        out = out + tap(k)
    return out
