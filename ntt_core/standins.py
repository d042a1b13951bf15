"""Deterministic stand-ins for SAM2 and DINOv2, for tests and the offline demo ONLY.

They follow :class:`~ntt_core.models.FeatureEncoder` and :class:`~ntt_core.models.PromptSegmenter`
and make sense on the scenes of :mod:`ntt_core.synthetic` (flat-ish coloured shapes on a grey
background), where they let the real pipeline be checked end to end against exact ground truth:

- :class:`ColourStatsEncoder` describes each patch by a soft colour histogram (hue bins for
  coloured pixels, brightness bins for grey ones), so different hues are nearly orthogonal under
  cosine similarity and a grey background resembles no coloured class.
- :class:`ConnectedRegionSegmenter` splits the frame into connected regions of similar colour
  and answers a point with the region under it, a box with the region that best fills it.

They know nothing about natural images: never use them for real predictions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .proposals import best_of_three


def _fingerprint(*values) -> str:
    return hashlib.sha256(repr(values).encode()).hexdigest()[:16]


def _check_frames(images: torch.Tensor, size: int, owner: str) -> None:
    """Refuse anything but a batch of RGB frames ``[B, 3, size, size]``."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
        raise ValueError(f"{owner}: expected images [B, 3, {size}, {size}], got {tuple(images.shape)}")


class ColourStatsEncoder:
    """A :class:`~ntt_core.models.FeatureEncoder` whose patch features are soft colour histograms.

    Per pixel: ``hue_bins`` circular triangular hue bins, each ``hue_spread`` bins wide on either
    side (hues a little apart stay similar, hues 90 degrees apart nearly orthogonal), weighted by
    how coloured the pixel is (chroma = max - min channel, ramping from ``grey_chroma`` to
    ``colour_chroma``), and ``grey_bins`` triangular brightness bins weighted by the rest times
    ``grey_weight``. A coloured pixel's weights sum to 1, a grey one's to ``grey_weight``: the grey
    background that every shape's edge patches take in weighs less than the shape's colour, yet a
    mostly grey region still points to the grey bins.
    Patch features are their means over each patch: ``[B, hue_bins + grey_bins, g, g]``.
    """

    def __init__(
        self,
        input_size: int = 112,
        grid_size: int = 14,
        hue_bins: int = 12,
        hue_spread: float = 2.0,
        grey_bins: int = 4,
        grey_weight: float = 0.3,
        grey_chroma: float = 0.08,
        colour_chroma: float = 0.25,
        device: str | torch.device = "cpu",
    ) -> None:
        if input_size % grid_size:
            raise ValueError(f"ColourStatsEncoder: input_size {input_size} is not a multiple of grid_size {grid_size}")
        valid = hue_bins >= 3 and 1.0 <= hue_spread <= hue_bins / 2 and grey_bins >= 2 and grey_weight > 0.0
        if not (valid and 0.0 <= grey_chroma < colour_chroma <= 1.0):
            raise ValueError(
                "ColourStatsEncoder: needs hue_bins >= 3, 1 <= hue_spread <= hue_bins / 2, grey_bins >= 2, "
                "grey_weight > 0 and 0 <= grey_chroma < colour_chroma <= 1"
            )
        self.input_size = input_size
        self.grid_size = grid_size
        self.hue_bins = hue_bins
        self.hue_spread = hue_spread
        self.grey_bins = grey_bins
        self.grey_weight = grey_weight
        self.grey_chroma = grey_chroma
        self.colour_chroma = colour_chroma
        self.device = torch.device(device)
        self.model_id = "standin:colour-stats"
        self.fingerprint = _fingerprint(
            self.model_id, hue_bins, hue_spread, grey_bins, grey_weight, grey_chroma, colour_chroma
        )

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` RGB in [0, 1] -> ``[B, hue_bins + grey_bins, g, g]`` float32."""
        _check_frames(images, self.input_size, "ColourStatsEncoder")
        pixels = self.pixel_histograms(images.to(self.device, torch.float32))
        return F.adaptive_avg_pool2d(pixels, self.grid_size)

    def pixel_histograms(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> per-pixel soft histograms ``[B, hue_bins + grey_bins, H, W]``."""
        red, green, blue = images.unbind(1)
        high, low = images.amax(1), images.amin(1)
        chroma = high - low
        safe = chroma.clamp(min=1e-6)
        hue = (
            torch.where(
                high == red,
                ((green - blue) / safe) % 6.0,
                torch.where(high == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
            )
            / 6.0
        )  # [B, H, W] in [0, 1)
        centres = torch.arange(self.hue_bins, device=images.device) / self.hue_bins
        distance = (hue[:, None] - centres.view(1, -1, 1, 1)).abs()
        distance = torch.minimum(distance, 1.0 - distance) * self.hue_bins  # in bin widths
        hue_weights = (1.0 - distance / self.hue_spread).clamp(min=0.0)
        hue_weights = hue_weights / hue_weights.sum(1, keepdim=True)
        levels = torch.linspace(0.0, 1.0, self.grey_bins, device=images.device)
        brightness = (high + low) / 2.0
        grey_weights = (1.0 - (brightness[:, None] - levels.view(1, -1, 1, 1)).abs() * (self.grey_bins - 1)).clamp(
            min=0.0
        )
        colour = ((chroma - self.grey_chroma) / (self.colour_chroma - self.grey_chroma)).clamp(0.0, 1.0)[:, None]
        return torch.cat([colour * hue_weights, (1.0 - colour) * self.grey_weight * grey_weights], dim=1)


@dataclass
class RegionFeatures:
    """What :class:`ConnectedRegionSegmenter` keeps of a batch of frames."""

    labels: torch.Tensor  # [B, S, S] int64, region index per pixel (0..K_b-1 in image b)
    areas: list[torch.Tensor]  # B tensors [K_b] int64, pixels per region
    outputs: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per image, filled on demand:
    # region -> its three point-prompt outputs, logits [3, m, m]


class ConnectedRegionSegmenter:
    """A :class:`~ntt_core.models.PromptSegmenter` that answers with connected regions of similar colour.

    ``embed`` labels each frame once: 4-neighbours whose colours differ by less than
    ``tolerance`` (largest channel difference) are joined; regions without any interior pixel
    (the one-pixel seams that resizing leaves along edges) or smaller than ``min_area`` pixels are
    dissolved into the neighbouring region of the closest colour.

    A point prompt gets three masks, in an order that rotates with the prompt's index (so a
    pipeline must pick by predicted IoU, not by position): the region, the region dilated by
    ``dilation`` pixels, and the region's half left of its centroid. The region's predicted IoU is
    ``0.96 - area fraction of the frame`` (large background regions score low), the others 0.8 and
    0.7 times that. Logits are ``sharpness * (coverage - 0.5)``, coverage being each mask pixel's
    covered fraction of frame pixels, so edges keep sub-pixel position when upsampled.
    """

    def __init__(
        self,
        input_size: int = 128,
        mask_size: int | None = None,
        tolerance: float = 0.05,
        min_area: int = 12,
        dilation: int = 2,
        sharpness: float = 20.0,
        device: str | torch.device = "cpu",
    ) -> None:
        mask_size = input_size // 4 if mask_size is None else mask_size
        if not (1 <= mask_size <= input_size):
            raise ValueError(
                f"ConnectedRegionSegmenter: mask_size {mask_size} must be between 1 and input_size {input_size}"
            )
        self.input_size = input_size
        self.mask_size = mask_size
        self.tolerance = tolerance
        self.min_area = min_area
        self.dilation = dilation
        self.sharpness = sharpness
        self.device = torch.device(device)
        self.model_id = "standin:connected-regions"
        self.fingerprint = _fingerprint(self.model_id, tolerance, min_area, dilation, sharpness)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> RegionFeatures:
        """``[B, 3, S, S]`` RGB in [0, 1] -> region labels of each frame."""
        _check_frames(images, self.input_size, "ConnectedRegionSegmenter")
        labels, areas = [], []
        for frame in images.to(self.device, torch.float32):
            regions = _dissolve(frame, label_regions(frame, self.tolerance), self.min_area)
            labels.append(regions)
            areas.append(torch.bincount(regions.flatten()))
        return RegionFeatures(labels=torch.stack(labels), areas=areas, outputs=[{} for _ in labels])

    @torch.inference_mode()
    def segment_points(self, features: RegionFeatures, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, P, 2]`` (x, y) frame pixels -> logits ``[B, P, 3, m, m]``, predicted IoUs ``[B, P, 3]``."""
        self._check_prompts(features, points, 2, "points")
        size = self.input_size
        cells = points.to(self.device, torch.float32).floor().long().clamp(0, size - 1)  # [B, P, 2]
        order = (
            torch.arange(3, device=self.device)[None] - torch.arange(cells.shape[1], device=self.device)[:, None]
        ) % 3
        logits, ious = [], []
        for labels, areas, outputs, where in zip(features.labels, features.areas, features.outputs, cells):
            chosen = labels[where[:, 1], where[:, 0]]  # [P]
            hit, index = torch.unique(chosen, return_inverse=True)
            missing = [region for region in hit.tolist() if region not in outputs]
            if missing:
                outputs.update(zip(missing, self._outputs(labels, torch.tensor(missing, device=self.device))))
            variants = torch.stack([outputs[region] for region in hit.tolist()])  # [U, 3, m, m]
            best = (0.96 - areas[hit].float() / size**2).clamp(min=0.05)
            scores = best[:, None] * torch.tensor([1.0, 0.8, 0.7], device=self.device)  # [U, 3]
            logits.append(variants[index[:, None], order])  # [P, 3, m, m]
            ious.append(scores[index[:, None], order])
        return torch.stack(logits), torch.stack(ious)

    def segment_best_points(
        self, features: RegionFeatures, points: torch.Tensor, iou_threshold: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`segment_points` followed by :func:`~ntt_core.proposals.best_of_three`."""
        return best_of_three(*self.segment_points(features, points), iou_threshold)

    def _outputs(self, labels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Labels ``[S, S]``, region indices ``[U]`` -> logits ``[U, 3, m, m]`` of the region, the
        region dilated, and its part left of its centroid."""
        region = (labels[None] == regions[:, None, None]).float()  # [U, S, S]
        dilated = F.max_pool2d(region[:, None], 2 * self.dilation + 1, stride=1, padding=self.dilation)[:, 0]
        columns = torch.arange(labels.shape[-1], device=self.device, dtype=torch.float32)
        centroid_x = (region.sum(1) * columns).sum(1) / region.sum((1, 2))  # [U]
        part = region * (columns.view(1, 1, -1) < centroid_x.view(-1, 1, 1))
        return self._logits(torch.stack([region, dilated, part], dim=1))

    @torch.inference_mode()
    def segment_boxes(self, features: RegionFeatures, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, 4]`` (x0, y0, x1, y1) frame pixels -> logits ``[B, N, m, m]``, predicted IoUs ``[B, N]``:
        per box, the region with the most pixels inside it minus outside it, cut to the box."""
        self._check_prompts(features, boxes, 4, "boxes")
        size = self.input_size
        centres = torch.arange(size, device=self.device, dtype=torch.float32) + 0.5
        logits, ious = [], []
        for labels, areas, frame_boxes in zip(features.labels, features.areas, boxes.to(self.device, torch.float32)):
            x0, y0, x1, y1 = frame_boxes.unbind(1)  # each [N]
            inside_x = (centres[None] >= x0[:, None]) & (centres[None] < x1[:, None])  # [N, S]
            inside_y = (centres[None] >= y0[:, None]) & (centres[None] < y1[:, None])
            inside = inside_y[:, :, None] & inside_x[:, None, :]  # [N, S, S]
            counts = torch.zeros(len(frame_boxes), len(areas), device=self.device)
            counts.scatter_add_(1, labels.flatten()[None].expand(len(frame_boxes), -1), inside.flatten(1).float())
            best = (2.0 * counts - areas[None].float()).argmax(1)  # [N]
            masks = (labels[None] == best[:, None, None]) & inside
            logits.append(self._logits(masks.float()))
            ious.append(counts.gather(1, best[:, None])[:, 0] / areas[best].float())
        return torch.stack(logits), torch.stack(ious)

    def _logits(self, masks: torch.Tensor) -> torch.Tensor:
        """``[..., S, S]`` masks in {0, 1} -> ``[..., m, m]`` logits from the covered fraction of each mask pixel."""
        shape = masks.shape[:-2]
        coverage = F.adaptive_avg_pool2d(masks.reshape(-1, 1, *masks.shape[-2:]), self.mask_size)
        return (self.sharpness * (coverage - 0.5)).reshape(*shape, self.mask_size, self.mask_size)

    def _check_prompts(self, features: RegionFeatures, prompts: torch.Tensor, width: int, name: str) -> None:
        batch = features.labels.shape[0]
        if prompts.ndim != 3 or prompts.shape[0] != batch or prompts.shape[2] != width:
            raise ValueError(
                f"ConnectedRegionSegmenter: expected {name} [{batch}, N, {width}], got {tuple(prompts.shape)}"
            )


def label_regions(frame: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``[3, H, W]`` colours -> ``[H, W]`` int64 labels of the 4-connected regions whose neighbouring
    pixels differ by less than ``tolerance`` in every channel; labels are 0..K-1 in raster order
    of each region's first pixel.

    Runs of joined pixels along rows are found at once (a cumulative sum); the runs joined
    vertically are then merged by a parallel union-find: each round hooks the root of the larger
    side of every still-split pair onto the smaller root and compresses the paths.
    """
    height, width = frame.shape[-2:]
    across = (frame[:, :, 1:] - frame[:, :, :-1]).abs().amax(0) < tolerance  # (y, x) ~ (y, x + 1)
    down = (frame[:, 1:] - frame[:, :-1]).abs().amax(0) < tolerance  # (y, x) ~ (y + 1, x)
    starts = torch.cat([torch.ones(height, 1, dtype=torch.bool, device=frame.device), ~across], dim=1)
    run = starts.flatten().cumsum(0).view(height, width) - 1  # raster-order run index of each pixel
    runs = int(run[-1, -1]) + 1
    keys = torch.unique(run[:-1][down] * runs + run[1:][down])  # vertically joined run pairs, upper first
    first, second = keys // runs, keys % runs
    parent = torch.arange(runs, device=frame.device)
    while first.numel():
        low, high = torch.minimum(parent[first], parent[second]), torch.maximum(parent[first], parent[second])
        split = low != high
        first, second = first[split], second[split]
        parent.scatter_reduce_(0, high[split], low[split], reduce="amin")
        while True:
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
    roots = parent == torch.arange(runs, device=frame.device)
    return (roots.cumsum(0) - 1)[parent][run]


_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _shift(tensor: torch.Tensor, dy: int, dx: int, fill) -> torch.Tensor:
    """``tensor[..., y + dy, x + dx]`` at (y, x), ``fill`` beyond the border."""
    out = torch.full_like(tensor, fill)
    height, width = tensor.shape[-2:]
    out[..., max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)] = tensor[
        ..., max(dy, 0) : height - max(-dy, 0), max(dx, 0) : width - max(-dx, 0)
    ]
    return out


def _dissolve(frame: torch.Tensor, labels: torch.Tensor, min_area: int) -> torch.Tensor:
    """Merge regions that have no interior pixel or fewer than ``min_area`` pixels into the
    neighbouring kept region of the closest colour, pixel by pixel; relabel 0..K-1."""
    interior = torch.ones_like(labels, dtype=torch.bool)
    for dy, dx in _NEIGHBOURS:
        neighbour = _shift(labels, dy, dx, -1)
        interior &= (neighbour == labels) | (neighbour == -1)
    count = int(labels.max()) + 1
    has_interior = torch.zeros(count, dtype=torch.bool, device=labels.device).index_fill_(0, labels[interior], True)
    keep = has_interior & (torch.bincount(labels.flatten(), minlength=count) >= min_area)
    if not bool(keep.any()):
        return labels
    labels = torch.where(keep[labels], labels, -1)
    distances = [(_shift(frame, dy, dx, 0.0) - frame).abs().amax(0) for dy, dx in _NEIGHBOURS]
    while bool((labels < 0).any()):
        best_label, best_distance = labels.clone(), torch.full(labels.shape, float("inf"), device=labels.device)
        for (dy, dx), distance in zip(_NEIGHBOURS, distances):
            neighbour = _shift(labels, dy, dx, -1)
            better = (labels < 0) & (neighbour >= 0) & (distance < best_distance)
            best_label = torch.where(better, neighbour, best_label)
            best_distance = torch.where(better, distance, best_distance)
        labels = best_label
    return (keep.cumsum(0) - 1)[labels]


class RegionPropagator:
    """A :class:`~ntt_core.propagation.Propagator` that follows connected regions of similar colour.

    Each frame is split into regions as :class:`ConnectedRegionSegmenter` splits it. A track keeps its
    last mask and the mean colour under its starting mask; on the next frame (either direction) it
    takes, among the regions whose mean colour is within ``colour_tolerance`` (largest channel
    difference) of its own, the one that overlaps its last mask grown by ``search`` pixels the most.
    With none, the object is absent (object score -1) and the last mask is kept, so the object is
    found again if it reappears where it vanished. ``released`` lists (track, last frame visited) in
    the order tracks were released.
    """

    def __init__(
        self,
        input_size: int = 128,
        mask_size: int | None = None,
        tolerance: float = 0.05,
        min_area: int = 12,
        search: int = 4,
        colour_tolerance: float = 0.12,
        device: str | torch.device = "cpu",
    ) -> None:
        self.regions = ConnectedRegionSegmenter(input_size, mask_size, tolerance, min_area, device=device)
        self.input_size, self.mask_size = input_size, self.regions.mask_size
        self.search, self.colour_tolerance = search, colour_tolerance
        self.device = torch.device(device)
        self.model_id = "standin:region-propagator"
        self.frames: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # index -> (labels [S, S], colours [K, 3])
        self.tracks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (last mask [S, S], colour [3])
        self.released: list[tuple[int, int]] = []
        self._visited: dict[int, int] = {}

    def add_frame(self, index: int, frame: torch.Tensor) -> None:
        frame = frame.to(self.device, torch.float32)
        labels = _dissolve(frame, label_regions(frame, self.regions.tolerance), self.regions.min_area)
        count = torch.bincount(labels.flatten()).clamp(min=1)
        sums = torch.zeros(len(count), 3, device=self.device).index_add_(0, labels.flatten(), frame.flatten(1).T)
        self.frames[index] = (labels, sums / count[:, None])

    def drop_frame(self, index: int) -> None:
        self.frames.pop(index, None)

    def start(self, track: int, index: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, colours = self.frames[index]
        mask = mask.to(self.device, torch.bool)
        weights = torch.bincount(labels[mask], minlength=len(colours)).float()
        self.tracks[track] = (mask, (weights[:, None] * colours).sum(0) / weights.sum().clamp(min=1))
        self._visited[track] = index
        return self.regions._logits(mask.float()), torch.tensor(1.0)

    def propagate(self, tracks: list[int], index: int, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        labels, colours = self.frames[index]
        logits, scores = [], []
        for track in tracks:
            last, colour = self.tracks[track]
            near = F.max_pool2d(last.float()[None, None], 2 * self.search + 1, stride=1, padding=self.search)[0, 0] > 0
            overlap = torch.bincount(labels[near], minlength=len(colours))
            similar = (colours - colour).abs().amax(1) < self.colour_tolerance
            overlap = torch.where(similar, overlap, torch.zeros_like(overlap))
            if int(overlap.max()) > 0:
                last = labels == overlap.argmax()
                self.tracks[track] = (last, colour)
                logits.append(self.regions._logits(last.float()))
                scores.append(1.0)
            else:
                logits.append(torch.full((self.mask_size, self.mask_size), -self.regions.sharpness / 2))
                scores.append(-1.0)
            self._visited[track] = index
        side = self.mask_size
        stacked = torch.stack(logits) if logits else torch.zeros(0, side, side)
        return stacked, torch.tensor(scores)

    def release(self, track: int) -> None:
        if self.tracks.pop(track, None) is not None:
            self.released.append((track, self._visited.pop(track)))
