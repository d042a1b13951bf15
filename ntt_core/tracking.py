"""Instance tracks through a video: the image pipeline on key frames, a :class:`Propagator` between them.

Frames stream in once each. Key frames are the first frame and every ``key_frame_stride``-th one.
Between key frames every live track is propagated forwards. On a key frame the bank's instances are
found with the image pipeline (:class:`~ntt_core.predictor.Predictor`); each detection is matched to
the live track whose propagated mask overlaps it most (mask IoU >= ``match_iou`` on SAM2's
low-resolution mask grid over the square input frame, one-to-one, best
pairs first; a matched track keeps following its own mask, the detection adds its score); an
unmatched detection starts a new track, which is also propagated backwards over the
frames since the previous key frame (an object that entered between two key frames is found from
its entry). A track whose object score stays <= 0 for ``lost_frames`` frames in a row ends and its
propagator state is released. Only the frames since the previous key frame are held.

Rules of a finished track: its **class** is the class with the highest sum of its key-frame scores
(the scores of the detections matched to it); its **confidence**, carried by each of its detections,
is the mean of those key-frame scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import NttError
from .frames import square_frame
from .geometry import mask_boxes
from .instances import Instances
from .predictor import Predictor
from .propagation import Propagator


class VideoError(NttError):
    """A video or tracking option that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class TrackingSettings:
    """Options of the video pipeline (the image pipeline's own come from its :class:`~ntt_core.settings.Settings`)."""

    key_frame_stride: int = 10  # the image pipeline runs on frame 0 and every k-th frame
    match_iou: float = 0.5  # mask IoU from which a key-frame detection continues a live track
    lost_frames: int = 10  # a track ends after this many frames in a row without its object

    def __post_init__(self) -> None:
        if isinstance(self.key_frame_stride, bool) or not isinstance(self.key_frame_stride, int):
            raise VideoError(f"key_frame_stride must be a whole number >= 1, got {self.key_frame_stride!r}")
        if self.key_frame_stride < 1:
            raise VideoError(
                f"key_frame_stride must be >= 1 (1: the image pipeline on every frame), got {self.key_frame_stride}"
            )
        if not 0.0 < float(self.match_iou) <= 1.0:
            raise VideoError(f"match_iou must be in (0, 1], got {self.match_iou!r}")
        if isinstance(self.lost_frames, bool) or not isinstance(self.lost_frames, int) or self.lost_frames < 1:
            raise VideoError(f"lost_frames must be a whole number >= 1, got {self.lost_frames!r}")


@dataclass
class Track:
    """One followed instance; ``class_scores`` sums its key-frame scores per class."""

    id: int
    class_scores: np.ndarray  # [K] float64
    key_scores: list[float] = field(default_factory=list)
    first_frame: int = 0
    last_frame: int = 0
    missed: int = 0  # frames in a row without the object
    ended: bool = False

    @property
    def label(self) -> int:
        return int(np.argmax(self.class_scores))

    @property
    def confidence(self) -> float:
        return float(np.mean(self.key_scores))

    def add_key_detection(self, label: int, score: float) -> None:
        self.class_scores[label] += score
        self.key_scores.append(float(score))


@dataclass
class TrackedFrame:
    """The tracked instances of one frame (masks at the frame's size, cropped to their boxes)."""

    index: int
    image_size: tuple[int, int]  # (height, width)
    track_ids: np.ndarray  # [N] int64
    boxes: np.ndarray  # [N, 4] int64, x0, y0, x1, y1 end-exclusive
    masks: list[np.ndarray]  # N bool crops
    object_scores: np.ndarray  # [N] float32, the propagator's object score logit (key-frame starts: its own)
    key_frame: bool

    def __len__(self) -> int:
        return len(self.masks)

    def full_mask(self, i: int) -> np.ndarray:
        """Mask ``i`` at the frame size, ``[H, W]`` bool."""
        full = np.zeros(self.image_size, dtype=bool)
        x0, y0, x1, y1 = self.boxes[i]
        full[y0:y1, x0:x1] = self.masks[i]
        return full

    def instances(self, tracks: dict[int, Track], class_names: list[str]) -> Instances:
        """The frame as :class:`Instances`: each detection with its track's class and confidence
        (the image pipeline's per-candidate scores do not exist on propagated frames: zeros)."""
        chosen = [tracks[int(t)] for t in self.track_ids]
        zeros = np.zeros(len(chosen), dtype=np.float32)
        return Instances(
            image_size=self.image_size,
            boxes=self.boxes,
            masks=self.masks,
            labels=np.array([t.label for t in chosen], dtype=np.int64),
            class_names=list(class_names),
            scores=np.array([t.confidence for t in chosen], dtype=np.float32),
            semantic_scores=zeros,
            sam_iou=zeros.copy(),
            merge_factors=zeros.copy(),
        )


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` and ``[M, H, W]`` bool -> ``[N, M]`` IoU (0 where both are empty)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def _squared(mask: np.ndarray, side: int) -> torch.Tensor:
    """``[H, W]`` bool -> ``[side, side]`` bool on the square input frame (bilinear, >= 0.5)."""
    full = torch.from_numpy(mask)[None, None].float()
    return F.interpolate(full, size=(side, side), mode="bilinear", align_corners=False)[0, 0] >= 0.5


def greedy_matches(iou: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs with IoU >= ``threshold``, highest IoU first."""
    pairs = torch.nonzero(iou >= threshold)
    order = iou[pairs[:, 0], pairs[:, 1]].argsort(descending=True, stable=True)
    used_rows, used_cols, matches = set(), set(), []
    for row, col in pairs[order].tolist():
        if row not in used_rows and col not in used_cols:
            used_rows.add(row)
            used_cols.add(col)
            matches.append((row, col))
    return matches


class VideoTracker:
    """Tracks of the bank's instances through one video; see the module docstring.

    ``run(frames)`` takes ``[H, W, 3]`` uint8 frames (any iterable: they are read one at a time) and
    yields a :class:`TrackedFrame` per frame, in order, each once the next key frame has settled it.
    ``tracks`` holds every track (its final class and confidence) once the run is over.
    """

    def __init__(self, predictor: Predictor, propagator: Propagator, settings: TrackingSettings | None = None):
        self.predictor, self.propagator = predictor, propagator
        self.settings = settings or TrackingSettings()
        self.tracks: dict[int, Track] = {}
        self.class_names = list(predictor.bank.classes)

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[TrackedFrame]:
        s, p = self.settings, self.propagator
        self.tracks = {}
        pending: dict[int, dict[int, tuple[torch.Tensor, float]]] = {}  # frame -> track -> (logits, score)
        sizes: dict[int, tuple[int, int]] = {}
        size = None
        for index, frame in enumerate(frames):
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise VideoError(
                    f"frame {index}: expected an [H, W, 3] uint8 RGB frame, got {frame.shape} {frame.dtype}"
                )
            if size is None:
                size = frame.shape[:2]
            elif frame.shape[:2] != size:
                raise VideoError(
                    f"frame {index} is {frame.shape[1]}x{frame.shape[0]} px but the video's first frame is "
                    f"{size[1]}x{size[0]}: frame sizes vary inside one video"
                )
            sizes[index] = size
            p.add_frame(index, square_frame(frame, p.input_size)[0])
            pending[index] = self._forward(index)
            if index % s.key_frame_stride == 0:
                self._key_frame(index, frame, pending)
                yield from self._emit(pending, sizes, key=index)
        yield from self._emit(pending, sizes, key=None)
        for track in self.tracks.values():
            if not track.ended:
                self._end(track)

    def _live(self) -> list[int]:
        return [t.id for t in self.tracks.values() if not t.ended]

    def _forward(self, index: int) -> dict[int, tuple[torch.Tensor, float]]:
        """Propagate the live tracks onto frame ``index``; end those lost for too long."""
        live = [t for t in self._live() if self.tracks[t].first_frame < index]
        if not live:
            return {}
        logits, scores = self.propagator.propagate(live, index)
        found = {}
        for track_id, logit, score in zip(live, logits, scores.tolist()):
            track = self.tracks[track_id]
            if score > 0:
                track.missed, track.last_frame = 0, index
                found[track_id] = (logit, score)
            else:
                track.missed += 1
                if track.missed >= self.settings.lost_frames:
                    self._end(track)
        return found

    def _end(self, track: Track) -> None:
        track.ended = True
        self.propagator.release(track.id)

    def _key_frame(self, index: int, frame: np.ndarray, pending: dict) -> None:
        """Detect on frame ``index``, continue matched tracks, start (and propagate back) new ones."""
        found = pending[index]
        instances = self.predictor.predict([frame])[0]
        if len(instances) == 0:
            return
        side, low = self.propagator.input_size, self.propagator.mask_size
        # [D, S, S] on the square input frame, one full-size mask at a time
        squares = torch.stack([_squared(instances.full_mask(i), side) for i in range(len(instances))])
        live = list(found)
        matches = []
        if live:  # IoU on SAM2's low-resolution grid: cheap for any frame size
            detected = F.adaptive_avg_pool2d(squares[:, None].float(), low)[:, 0] >= 0.5
            propagated = torch.stack([found[t][0] for t in live]).cpu() > 0
            matches = greedy_matches(mask_iou(detected, propagated), self.settings.match_iou)
        matched = {d for d, _ in matches}
        for d, col in matches:
            self.tracks[live[col]].add_key_detection(int(instances.labels[d]), float(instances.scores[d]))
        for d in range(len(instances)):
            if d not in matched and bool(squares[d].any()):
                self._start(d, index, squares[d], instances, pending)

    def _start(self, d: int, index: int, square: torch.Tensor, instances: Instances, pending: dict) -> None:
        track_id = len(self.tracks) + 1
        track = Track(track_id, np.zeros(len(self.class_names)), first_frame=index, last_frame=index)
        track.add_key_detection(int(instances.labels[d]), float(instances.scores[d]))
        self.tracks[track_id] = track
        logits, score = self.propagator.start(track_id, index, square.to(torch.bool))
        pending[index][track_id] = (logits, float(score))
        missed = 0
        for earlier in sorted((f for f in pending if f < index), reverse=True):
            logits, scores = self.propagator.propagate([track_id], earlier, reverse=True)
            if float(scores[0]) > 0:
                pending[earlier][track_id] = (logits[0], float(scores[0]))
                track.first_frame, missed = earlier, 0
            else:
                missed += 1
                if missed >= self.settings.lost_frames:
                    break

    def _frame_masks(self, logits: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits ``N x [m, m]`` -> ``[N, H, W]`` bool masks at the frame size (bilinear, > 0)."""
        stacked = torch.stack(logits)[:, None].float()
        return F.interpolate(stacked, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].cpu() > 0

    def _emit(self, pending: dict, sizes: dict, key: int | None) -> Iterator[TrackedFrame]:
        """Yield every pending frame up to ``key`` (all with None) and forget them."""
        for index in sorted(f for f in pending if key is None or f <= key):
            found = pending.pop(index)
            size = sizes.pop(index)
            self.propagator.drop_frame(index)
            ids = sorted(found)
            masks = (
                self._frame_masks([found[t][0] for t in ids], size) if ids else torch.zeros(0, *size, dtype=torch.bool)
            )
            keep = masks.flatten(1).any(1)
            ids = [t for t, k in zip(ids, keep.tolist()) if k]
            masks = masks[keep]
            boxes = (mask_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])).numpy().astype(np.int64)  # end-exclusive
            yield TrackedFrame(
                index=index,
                image_size=tuple(size),
                track_ids=np.array(ids, dtype=np.int64),
                boxes=boxes,
                masks=[m[y0:y1, x0:x1].numpy() for m, (x0, y0, x1, y1) in zip(masks, boxes)],
                object_scores=np.array([found[t][1] for t in ids], dtype=np.float32),
                key_frame=index % self.settings.key_frame_stride == 0,
            )
