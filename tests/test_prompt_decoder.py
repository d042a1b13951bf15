"""The shared-image mask decoder against transformers' Sam2MaskDecoder, which copies the image per prompt."""

import pytest
import torch

from ntt_core.models import autocast, load_segmenter
from ntt_core.prompt_decoder import decode_multimask


@pytest.fixture(scope="module")
def segmenter(tiny_models):
    segmenter = load_segmenter(str(tiny_models[0]), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random init gives logits near 0; larger weights make every difference visible
        for parameter in segmenter.model.mask_decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    return segmenter


def decoder_inputs(segmenter, batch: int, prompts: int, seed: int):
    """Image features of random images and random prompt embeddings (two sparse tokens per prompt, as
    a point prompt has), so that every prompt's output differs visibly."""
    generator = torch.Generator().manual_seed(seed)
    features = segmenter.embed(torch.rand(batch, 3, 128, 128, generator=generator))
    channels, height, width = features.embeddings.shape[1:]
    sparse = torch.randn(batch, prompts, 2, channels, generator=generator)
    dense = torch.randn(batch, channels, height, width, generator=generator)
    return features, sparse, dense


def both_decoders(segmenter, features, sparse, dense):
    decoder, batch = segmenter.model.mask_decoder, features.embeddings.shape[0]
    with torch.no_grad():
        ours = decode_multimask(
            decoder, features.embeddings, segmenter._positional, features.high_resolution, sparse, dense
        )
        logits, iou, _, _ = decoder(
            image_embeddings=features.embeddings,
            image_positional_embeddings=segmenter._positional.expand(batch, -1, -1, -1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            high_resolution_features=list(features.high_resolution),
        )
    return ours, (logits, iou)


@pytest.mark.parametrize(("batch", "prompts"), [(1, 1), (1, 9), (3, 7)])
def test_matches_transformers_decoder(segmenter, batch, prompts):
    features, sparse, dense = decoder_inputs(segmenter, batch, prompts, seed=batch * 10 + prompts)
    (logits, iou), (reference_logits, reference_iou) = both_decoders(segmenter, features, sparse, dense)
    assert logits.shape == reference_logits.shape == (batch, prompts, 3, 32, 32)
    assert reference_logits.abs().max() > 1.0  # the weights above make the comparison meaningful
    if prompts > 1:  # prompts' outputs differ far beyond the tolerance: a mix-up between prompts would show
        assert reference_logits[:, 0].sub(reference_logits[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou, reference_iou, rtol=1e-5, atol=1e-6)


def test_matches_transformers_decoder_under_bfloat16_autocast(segmenter):
    """The bf16 option: the same operations run in the same dtypes, so bf16 rounding is all that differs."""
    features, sparse, dense = decoder_inputs(segmenter, 2, 5, seed=1)
    with autocast(torch.device("cpu"), torch.bfloat16):
        (logits, iou), (reference_logits, reference_iou) = both_decoders(segmenter, features, sparse, dense)
    assert logits.dtype == reference_logits.dtype
    scale = reference_logits.float().abs().max()
    assert (logits.float() - reference_logits.float()).abs().max() < 0.02 * scale
    assert (iou.float() - reference_iou.float()).abs().max() < 0.02
