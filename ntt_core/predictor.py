"""The per-batch pipeline: SAM2 candidates, DINOv2 matching against the memory bank, NMS, soft
merging, top-k. One call segments every class of the bank in a batch of images."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .candidate_cache import CandidateCache, DescribedCandidates, context_key, image_key
from .frames import bicubic, square_frame
from .geometry import mask_boxes
from .images import ImageError, as_rgb_array, load_image
from .input_rules import check_count
from .instances import Instances
from .matching import best_references, pool_features, score_classes
from .memory_bank import MemoryBank
from .merging import crop_masks, full_resolution_stats, soft_merge_factors, window_bounds
from .models import FeatureEncoder, PromptSegmenter
from .proposals import Candidates, class_nms, point_grid, propose
from .settings import Settings
from .stages import stage


class Predictor:
    """Segment every instance of the bank's classes in images.

    ``predict(images)`` takes ``[H, W, 3]`` uint8 arrays and returns one :class:`Instances` each;
    ``predict_paths`` does the same for a batch of files; ``predict_stream`` runs a whole list of
    files batch by batch, the one loop the CLI, the benchmarks and FiftyOne segmentation share.
    With a ``cache``, each image's bank-independent results (:meth:`candidates`) are read from it
    when there and stored otherwise, so a bank edit re-runs only the bank-dependent finish.
    ``on_stage(stage, done, total)``, when set, is told each stage of a batch as it starts: "image
    encoders", "prompts" (after each prompt batch, with the prompts decoded of all), "post-processing"
    (progress for a person watching; an exception it raises stops the batch there); images served
    from the cache skip the first two.
    """

    on_stage: Callable[[str, int, int], None] | None = None

    def __init__(
        self,
        segmenter: PromptSegmenter,
        encoder: FeatureEncoder,
        bank: MemoryBank,
        settings: Settings | None = None,
        cache: CandidateCache | None = None,
    ) -> None:
        bank.check_encoder(encoder)
        self.segmenter, self.encoder, self.bank = segmenter, encoder, bank
        self.settings = settings or Settings()
        device = encoder.device
        self.prototypes = bank.prototypes().to(device)  # [K, C]
        negative, has_negative = bank.negative_prototypes()
        if has_negative.any():
            self.negative_prototypes, self.has_negative = negative.to(device), has_negative.to(device)
        else:  # the default: no negative references, no damping
            self.negative_prototypes = self.has_negative = None
        positive = ~bank.negative
        self.reference_rows = torch.nonzero(positive).flatten()
        self.references = F.normalize(bank.descriptors[positive].float(), dim=1).to(device)  # [R, C]
        self.reference_class = bank.class_index[positive].to(device)
        self.points = point_grid(self.settings.points_per_side, segmenter.input_size, segmenter.device)
        self.min_side = max(1, encoder.input_size // encoder.grid_size)
        self.cache = cache
        self.cache_context = None if cache is None else context_key(segmenter, encoder, self.settings)
        self.cache_hits = 0  # images served from the cache so far

    def predict(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None) -> list[Instances]:
        """Instances for each image of the batch; raises :class:`ImageError` on an unusable image.

        The masks are at each image's own size unless ``sizes`` gives the (height, width) to
        upsample them to (the authors take it from the annotation json).
        """
        arrays = [self._check(as_rgb_array(image, f"image {i}"), f"image {i}") for i, image in enumerate(images)]
        if not arrays:
            return []
        sizes = [a.shape[:2] for a in arrays] if sizes is None else [tuple(int(v) for v in size) for size in sizes]
        if len(sizes) != len(arrays) or any(len(size) != 2 or min(size) < 1 for size in sizes):
            raise ValueError(f"sizes must be one (height, width) of positive integers per image, got {sizes}")
        found = self.candidates(arrays, sizes)
        if self.on_stage is not None:
            self.on_stage("post-processing", 0, 1)
        return [self._instances(entry, size) for entry, size in zip(found, sizes)]

    def candidates(self, arrays: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[DescribedCandidates]:
        """The bank-independent part of :meth:`predict` for checked images and their mask sizes: from
        the cache where it holds them, computed (and stored) for the others."""
        if self.cache is None:
            return self._describe_candidates(arrays)
        keys = [image_key(self.cache_context, array) for array in arrays]
        found = [self.cache.load(key, size, self.encoder.device) for key, size in zip(keys, sizes)]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.cache_hits += len(found) - len(missing)
        for i, computed in zip(missing, self._describe_candidates([arrays[i] for i in missing])):
            self.cache.store(keys[i], computed, sizes[i])
            found[i] = computed
        return found

    def _describe_candidates(self, arrays: Sequence[np.ndarray]) -> list[DescribedCandidates]:
        """SAM2's candidates of each image and their DINOv2 descriptors (nothing here reads the bank)."""
        if not arrays:
            return []
        frame, size = self.segmenter.input_size, self.encoder.input_size
        progress = self.on_stage or (lambda name, done, total: None)
        progress("image encoders", 0, 1)
        with stage("preprocess"):
            frames = torch.cat([square_frame(a, frame) for a in arrays]).to(self.segmenter.device)
        with stage("sam2_encoder"):
            sam_features = self.segmenter.embed(frames)
        with stage("preprocess"):
            resized = bicubic(frames.to(self.encoder.device), (size, size))
        with stage("dinov2_encoder"):
            dense = self.encoder.encode(resized)  # [B, C, g, g]
        with stage("mask_postprocess"):  # gathering the kept candidates; decoding is its own stage inside
            candidates = propose(
                self.segmenter,
                sam_features,
                len(arrays),
                self.points,
                self.settings.prompt_batch(self.segmenter.device.type),
                self.settings.sam_iou_threshold,
                on_batch=None if self.on_stage is None else lambda done, total: progress("prompts", done, total),
            )
        return [describe(c, dense[i]) for i, c in enumerate(candidates)]

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        exif_orientation: bool = True,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Instances | ImageError]:
        """Like :meth:`predict` for image files (read upright by their EXIF tag unless
        ``exif_orientation`` is False); an unreadable or unusable image gives its
        :class:`ImageError` in its place instead of failing the batch."""
        results: list[Instances | ImageError | None] = [None] * len(paths)
        good, arrays = [], []
        for i, path in enumerate(paths):
            try:
                with stage("decode"):
                    image = load_image(path, exif_orientation)
                arrays.append(self._check(image, name=str(path)))
                good.append(i)
            except ImageError as error:
                results[i] = error
        chosen = None if sizes is None else [sizes[i] for i in good]
        for i, instances in zip(good, self.predict(arrays, chosen)):
            results[i] = instances
        return results

    def predict_stream(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 1,
        *,
        first_batch_size: int | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
        should_stop: Callable[[], bool] | None = None,
        **read_options,
    ) -> Iterator[tuple[int, Instances | ImageError]]:
        """Yield ``(index in paths, Instances or ImageError)`` for each image, in order, as soon as
        its batch is done: :meth:`predict_paths` on batches of ``batch_size`` (the first one of
        ``first_batch_size``: 1 gives a first result, and a time estimate, soonest).

        ``sizes`` gives each path's mask size (see :meth:`predict`); ``read_options``
        (``exif_orientation``) go to :meth:`predict_paths`. ``should_stop()`` is asked before each
        batch: once it is true the stream ends, the images of the batches done all yielded. An error
        other than an image's own ends the stream. What is done per image (records, progress) is the
        consumer's loop body.
        """
        check_count(batch_size, "batch_size")
        if sizes is not None and len(sizes) != len(paths):
            raise ValueError(f"sizes must be one (height, width) per path: {len(sizes)} for {len(paths)} paths")
        first = check_count(first_batch_size, "first_batch_size") if first_batch_size is not None else batch_size
        starts = [0, *range(first, len(paths), batch_size)]
        for start, end in zip(starts, [*starts[1:], len(paths)]):
            if start >= end or (should_stop is not None and should_stop()):
                return
            options = read_options if sizes is None else {**read_options, "sizes": sizes[start:end]}
            yield from enumerate(self.predict_paths(paths[start:end], **options), start)

    def _check(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        if min(image.shape[:2]) < self.min_side:
            raise ImageError(
                f"{name}: {image.shape[1]}x{image.shape[0]} px is smaller than one {self.min_side}-px encoder patch"
            )
        return image

    def _instances(self, found: DescribedCandidates, image_size: tuple[int, int]) -> Instances:
        """Finish one image against the bank: classify, NMS, soft-merge, top-k."""
        s = self.settings
        classes = self.bank.classes
        logits, sam_iou, descriptors = found.logits, found.sam_iou, found.descriptors
        if logits.shape[0] == 0:
            return Instances.empty(image_size, classes)
        with stage("mask_postprocess"):  # its candidates were counted where they were described
            low_boxes = mask_boxes(logits > 0)  # [N, 4] at SAM2's mask resolution
        with stage("matching", items=logits.shape[0]):
            semantic, labels = score_classes(
                descriptors, self.prototypes, self.negative_prototypes, self.has_negative, s.negative_temperature
            )
        with stage("nms", items=logits.shape[0]):
            keep = class_nms(low_boxes, sam_iou, labels, s.nms_iou_threshold, s.pre_merge_keep)
            keep = keep[semantic[keep] > 0]  # in decreasing SAM-IoU order
            if keep.numel() == 0:
                return Instances.empty(image_size, classes)
            logits, sam_iou, low_boxes = logits[keep], sam_iou[keep], low_boxes[keep]
            descriptors, semantic, labels = descriptors[keep], semantic[keep], labels[keep]

        with stage("merge", items=logits.shape[0]):
            windows = window_bounds(low_boxes, logits.shape[-1], image_size)
            areas, boxes, intersections = full_resolution_stats(logits, labels, windows, image_size)
            factors = soft_merge_factors(areas, intersections, descriptors, s.soft_merge_exponent)
            scores = semantic * factors
            valid = (areas > 0) & (scores >= s.score_threshold)
            order = torch.nonzero(valid).flatten()
            order = order[scores[order].argsort(descending=True, stable=True)][: s.max_detections]
        with stage("matching"):
            reference = best_references(descriptors[order], labels[order], self.references, self.reference_class)
        with stage("merge"):
            boxes = boxes[order]
            crops = crop_masks(logits[order], boxes, image_size)
        rows = self.reference_rows[reference.cpu()].tolist()
        return Instances(
            image_size=tuple(image_size),
            boxes=boxes.cpu().numpy().astype(np.int64),
            masks=crops,
            labels=labels[order].cpu().numpy().astype(np.int64),
            class_names=list(classes),
            scores=scores[order].cpu().numpy().astype(np.float32),
            semantic_scores=semantic[order].cpu().numpy().astype(np.float32),
            sam_iou=sam_iou[order].cpu().numpy().astype(np.float32),
            merge_factors=factors[order].cpu().numpy().astype(np.float32),
            reference_ids=[self.bank.reference_ids[row] for row in rows],
        )


def describe(candidates: Candidates, dense: torch.Tensor) -> DescribedCandidates:
    """The non-empty candidates of one image with their L2-normalised descriptors pooled from its
    dense features ``[C, g, g]`` (on the features' device)."""
    with stage("mask_postprocess", items=candidates.logits.shape[0]):
        logits = candidates.logits.to(dense.device)
        sam_iou = candidates.sam_iou.to(dense.device)
        masks = logits > 0  # [N, m, m]
        nonempty = masks.flatten(1).any(1)
        logits, sam_iou, masks = logits[nonempty], sam_iou[nonempty], masks[nonempty]
    with stage("matching", items=logits.shape[0]):
        descriptors = F.normalize(pool_features(dense, masks), dim=1)  # [N, C]
    return DescribedCandidates(logits, sam_iou, descriptors)
