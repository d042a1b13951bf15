"""Semantic matching: mask-pooled DINOv2 features of candidates, scored against the memory bank."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def _interpolation_matrix_cpu(source: int, target: int, mode: str, antialias: bool) -> torch.Tensor:
    # Interpolating the identity along its rows only (columns keep their size) gives U @ I = U.
    eye = torch.eye(source, dtype=torch.float64)[None, None]
    out = F.interpolate(eye, size=(target, source), mode=mode, align_corners=False, antialias=antialias)
    return out[0, 0].contiguous()  # [target, source]


def interpolation_matrix(
    source: int, target: int, mode: str = "bilinear", antialias: bool = True, device: torch.device | None = None
) -> torch.Tensor:
    """``[target, source]`` matrix U with ``F.interpolate(x, mode, align_corners=False, antialias)`` =
    U x U^T for a square ``[source, source]`` map: the very interpolation call applied to unit impulses."""
    return _interpolation_matrix_cpu(source, target, mode, antialias).to(device=device, dtype=torch.float32)


def pool_features(features: torch.Tensor, masks: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """Exact mean of the bilinearly upsampled features over each mask, without upsampling them.

    features ``[C, g, g]``, masks ``[N, m, m]`` bool -> ``[N, C]`` (unnormalised; rows of empty masks
    are zero). Upsampling is linear, F_up = U F U^T, so sum over the mask of F_up equals
    sum over the grid of F * (U^T M U).
    """
    grid, size = features.shape[-1], masks.shape[-1]
    up = interpolation_matrix(grid, size, "bilinear", antialias, features.device)  # [m, g]
    masks = masks.to(features.dtype)
    weights = up.T @ masks @ up  # [N, g, g]
    area = masks.flatten(1).sum(1).clamp(min=1.0)
    return (weights.flatten(1) @ features.flatten(1).T) / area[:, None]


def score_classes(
    descriptors: torch.Tensor,
    prototypes: torch.Tensor,
    negative_prototypes: torch.Tensor | None = None,
    has_negative: torch.Tensor | None = None,
    temperature: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 class of each candidate by :func:`class_similarity`: scores ``[N]``, labels ``[N]``."""
    return class_similarity(descriptors, prototypes, negative_prototypes, has_negative, temperature).max(dim=1)


def class_similarity(
    descriptors: torch.Tensor,
    prototypes: torch.Tensor,
    negative_prototypes: torch.Tensor | None = None,
    has_negative: torch.Tensor | None = None,
    temperature: float = 0.8,
) -> torch.Tensor:
    """Cosine similarity of each candidate to each class prototype, clamped at 0.

    descriptors ``[N, C]`` L2-normalised, prototypes ``[K, C]`` L2-normalised -> ``[N, K]``.
    Where a class has negative references, its similarity is damped (see :func:`negative_damping`).
    """
    similarity = (descriptors @ prototypes.T).clamp(min=0.0)  # [N, K]
    if negative_prototypes is not None and has_negative is not None:
        damped = negative_damping(similarity, descriptors @ negative_prototypes.T, temperature)
        similarity = torch.where(has_negative[None, :], damped, similarity)
    return similarity


def negative_damping(similarity: torch.Tensor, negative_similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """s = s_pos * exp(-max(0, s_neg - s_pos) / temperature), elementwise."""
    return similarity * torch.exp(-(negative_similarity - similarity).clamp(min=0.0) / temperature)


def best_references(
    descriptors: torch.Tensor, labels: torch.Tensor, references: torch.Tensor, reference_class: torch.Tensor
) -> torch.Tensor:
    """Index of the most similar reference of the predicted class for each candidate.

    descriptors ``[N, C]`` and references ``[R, C]``, both L2-normalised; labels ``[N]``,
    reference_class ``[R]`` -> ``[N]`` indices into the references.
    """
    similarity = descriptors @ references.T  # [N, R]
    same_class = labels[:, None] == reference_class[None, :]
    return similarity.masked_fill(~same_class, float("-inf")).argmax(dim=1)
