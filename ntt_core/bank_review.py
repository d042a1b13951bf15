"""Reviewing a memory bank: leave-one-out scores and per-class threshold suggestions, and
thumbnails of reference instances (adding and removing references are the bank's own edits, in
:mod:`ntt_core.memory_bank`).

Every function takes and returns plain :class:`~ntt_core.memory_bank.MemoryBank` objects; the
dataset side lives in :mod:`ntt_core.fiftyone.review`.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .geometry import reference_crop_box
from .matching import class_similarity, negative_damping
from .memory_bank import MemoryBank
from .settings import Settings

#: Percentile of a class's leave-one-out scores that :func:`suggest_thresholds` proposes.
SUGGESTION_PERCENTILE = 10.0
POSITIVE_OUTLINE = (255, 214, 0)  # yellow
NEGATIVE_OUTLINE = (235, 40, 40)  # red


@dataclass
class LeaveOneOut:
    """How each reference scores against the bank built from the others.

    ``scores[r]``: the score the predictor would give reference ``r`` for its own class (cosine
    of its normalised descriptor to its class prototype recomputed without it, clamped at 0 and
    damped by that class's negative references as in :func:`~ntt_core.matching.class_similarity`).
    ``top_class[r]``: the class the predictor would label it with (its own class with that
    prototype, every other class with its full prototype). Both are undefined (NaN and -1) for
    negative references and for the only positive reference of its class.
    """

    scores: torch.Tensor  # [R] float32
    top_class: torch.Tensor  # [R] int64


def leave_one_out(bank: MemoryBank, temperature: float | None = None) -> LeaveOneOut:
    """Leave-one-out scores of every reference, vectorised: leaving reference ``r`` out changes
    only its own class's prototype, normalise(sum of the class's descriptors - d_r), so no model
    runs and no per-reference loop are needed. ``temperature`` defaults to the bank's
    ``negative_temperature`` setting."""
    if temperature is None:
        temperature = bank.settings.get("negative_temperature", Settings.negative_temperature)
    descriptors = bank.descriptors.float()
    unit = F.normalize(descriptors, dim=1)
    own, positive = bank.class_index, ~bank.negative
    classes = len(bank.classes)
    sums = torch.zeros(classes, descriptors.shape[1]).index_add_(0, own[positive], descriptors[positive])
    shots = torch.bincount(own[positive], minlength=classes)
    negatives, has_negative = bank.negative_prototypes()

    similarity = class_similarity(unit, bank.prototypes(), negatives, has_negative, temperature)  # [R, K]
    others = F.normalize(sums[own] - descriptors, dim=1)  # own class without the reference itself
    kept = (unit * others).sum(1).clamp(min=0.0)
    damped = negative_damping(kept, (unit * negatives[own]).sum(1), temperature)
    own_score = torch.where(has_negative[own], damped, kept)
    rows = torch.arange(len(own))
    similarity[rows, own] = own_score
    defined = positive & (shots[own] >= 2)
    return LeaveOneOut(
        scores=torch.where(defined, own_score, torch.full_like(own_score, float("nan"))),
        top_class=torch.where(defined, similarity.argmax(dim=1), torch.full_like(own, -1)),
    )


def suggest_thresholds(bank: MemoryBank, percentile: float = SUGGESTION_PERCENTILE) -> dict[str, dict]:
    """A score threshold per class from its references' leave-one-out scores (:func:`leave_one_out`).

    Rule: threshold = the ``percentile``-th percentile (numpy's default linear interpolation)
    of the class's leave-one-out scores, rounded down to 2 decimals; None for a class with fewer
    than 2 positive references. Such a threshold would keep about 90% of instances that look like
    the references. It compares with a prediction's ``semantic_score``; its ``confidence`` is that
    times the soft-merge factor (at most 1). Reference descriptors come from a crop around each
    instance while targets pool whole-image features, so the match is approximate. A suggestion
    only: nothing applies it.

    Returns, per class: ``shots``, ``negatives``, ``scores`` (its positive references' scores, bank
    order), ``threshold``, ``confused`` (references whose top-1 class is another class, by that
    class) and ``note`` (a short explanation when no threshold or a warning).
    """
    loo = leave_one_out(bank)
    positives, negatives = bank.counts(), bank.counts(negative=True)
    result = {}
    for index, name in enumerate(bank.classes):
        rows = torch.nonzero((bank.class_index == index) & ~bank.negative).flatten()
        scores = [float(loo.scores[row]) for row in rows]
        confused: dict[str, int] = {}
        for row in rows:
            top = int(loo.top_class[row])
            if top not in (-1, index):
                confused[bank.classes[top]] = confused.get(bank.classes[top], 0) + 1
        threshold, note = None, ""
        if len(rows) < 2:
            scores, note = [], "needs 2 or more references"
        else:
            threshold = float(np.floor(np.percentile(scores, percentile) * 100.0) / 100.0)
            if confused:
                others = ", ".join(f"'{other}' ({count})" for other, count in sorted(confused.items()))
                note = f"some references score higher for {others}"
        result[name] = {
            "shots": positives[name],
            "negatives": negatives[name],
            "scores": scores,
            "threshold": threshold,
            "confused": confused,
            "note": note,
        }
    return result


def thumbnail(
    image: np.ndarray,
    box: tuple[int, int, int, int],
    mask: np.ndarray | None = None,
    size: int = 96,
    colour: tuple[int, int, int] = POSITIVE_OUTLINE,
    context_ratio: float = 0.2,
) -> str:
    """A PNG data URI of a reference instance: the crop the bank describes (square around the
    box with ``context_ratio`` context, clipped), scaled to fit ``size`` px, with the instance's
    outline (its mask's border, or the box when there is no mask) drawn in ``colour``.

    image ``[H, W, 3]`` uint8, box (x0, y0, x1, y1) end-exclusive pixels, mask ``[H, W]`` bool.
    """
    x0, y0, x1, y1 = reference_crop_box(box, image.shape[:2], context_ratio)
    scale = size / max(x1 - x0, y1 - y0)
    out_size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    crop = np.asarray(Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])).resize(out_size, Image.BILINEAR))
    if mask is None:
        mask = np.zeros(image.shape[:2], dtype=bool)
        bx0, by0, bx1, by1 = (int(v) for v in box)
        mask[by0:by1, bx0:bx1] = True
    small = Image.fromarray(np.ascontiguousarray(mask[y0:y1, x0:x1]).astype(np.uint8) * 255)
    inside = np.asarray(small.resize(out_size, Image.NEAREST)) > 0
    crop = crop.copy()
    outer = _border(inside)
    crop[outer | _border(inside & ~outer)] = colour  # 2 px wide
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _border(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch a pixel outside it (4-neighbourhood; the frame counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior
