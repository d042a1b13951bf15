"""Exact mask pooling and scoring against their naive forms and hand-computed answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from ntt_core.matching import best_references, interpolation_matrix, pool_features, score_classes


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("grid,size", [(4, 32), (37, 256), (5, 3)])
def test_interpolation_matrix_reproduces_interpolate(grid, size, antialias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, grid, grid)
    up = interpolation_matrix(grid, size, "bilinear", antialias)
    expected = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    assert torch.allclose(up @ x @ up.T, expected, atol=1e-5)


@pytest.mark.parametrize("grid,size", [(4, 32), (37, 256)])
def test_exact_pooling_equals_mean_of_upsampled_features(grid, size):
    torch.manual_seed(1)
    features = torch.randn(16, grid, grid)
    masks = torch.rand(5, size, size) > 0.7
    masks[3] = False
    masks[4, 10:12, 3:9] = True
    upsampled = F.interpolate(features[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[
        0
    ]
    naive = torch.stack([upsampled[:, m].mean(dim=1) if m.any() else torch.zeros(16) for m in masks])
    assert torch.allclose(pool_features(features, masks), naive, atol=1e-4)


def test_pooling_with_a_downsampled_mask_is_not_the_same():
    torch.manual_seed(2)
    features = torch.randn(8, 4, 4)
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 3:13, 5:20] = True
    small = F.interpolate(masks[:, None].float(), size=(4, 4), mode="nearest")[0, 0]
    crude = (features * small).flatten(1).sum(1) / small.sum()
    assert not torch.allclose(pool_features(features, masks)[0], crude, atol=1e-3)


def test_score_classes_takes_top1_cosine_clamped_at_zero():
    prototypes = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    descriptors = F.normalize(torch.tensor([[0.8, 0.6], [-1.0, -0.1], [0.6, 0.8]]), dim=1)
    scores, labels = score_classes(descriptors, prototypes)
    assert labels.tolist()[0] == 0 and labels.tolist()[2] == 1
    assert scores[0].item() == pytest.approx(0.8) and scores[2].item() == pytest.approx(0.8)
    assert scores[1].item() == 0.0  # every cosine negative -> clamped


def test_negative_prototypes_damp_by_the_formula():
    prototypes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    negatives = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    has_negative = torch.tensor([True, False])
    descriptor = F.normalize(torch.tensor([[0.5, 0.1, 0.8]]), dim=1)
    s_pos, s_neg = descriptor[0, 0].item(), descriptor[0, 2].item()
    scores, labels = score_classes(descriptor, prototypes, negatives, has_negative, temperature=0.8)
    damped = s_pos * math.exp(-max(0.0, s_neg - s_pos) / 0.8)
    expected_other = descriptor[0, 1].item()
    assert scores.item() == pytest.approx(max(damped, expected_other), rel=1e-5)
    assert labels.item() == (0 if damped > expected_other else 1)


def test_best_reference_is_searched_within_the_predicted_class():
    references = torch.eye(3)
    reference_class = torch.tensor([0, 1, 1])
    descriptors = F.normalize(torch.tensor([[0.9, 0.1, 0.3], [0.9, 0.1, 0.3]]), dim=1)
    index = best_references(descriptors, torch.tensor([0, 1]), references, reference_class)
    assert index.tolist() == [0, 2]
