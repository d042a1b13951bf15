"""The shared-image mask decoder against transformers' Sam2MaskDecoder, which copies the image per prompt."""

import copy

import pytest
import torch

from ntt_core import prompt_decoder
from ntt_core.models import autocast, load_segmenter
from ntt_core.prompt_decoder import decode_best, decode_multimask
from ntt_core.proposals import best_of_three


@pytest.fixture(scope="module")
def segmenter(tiny_models):
    segmenter = copy.deepcopy(load_segmenter(str(tiny_models[0]), device="cpu"))  # the loaded model is shared
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random init gives logits near 0; larger weights make every difference visible
        for parameter in segmenter.model.mask_decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    spread_iou_head(segmenter)
    return segmenter


def spread_iou_head(segmenter) -> None:
    """Random weights give every prompt nearly the same predicted IoUs; rescale the IoU head's last
    layer so that its logits have mean 0 and a spread of 0.05 over prompts: prompts then choose
    different outputs and pass or fail a threshold clearly (a larger gain would magnify float rounding)."""
    features, sparse, dense = decoder_inputs(segmenter, 2, 16, seed=99)
    decoder = segmenter.model.mask_decoder
    with torch.no_grad():
        _, iou = decode_multimask(
            decoder, features.embeddings, segmenter._positional, features.high_resolution, sparse, dense
        )
        logit = torch.logit(iou.flatten(0, 1).double())  # [prompts, 3]: proj_out's outputs 1..3
        mean, std = logit.mean(dim=0), logit.std(dim=0) / 0.05
        head = decoder.iou_prediction_head.proj_out
        head.weight[1:] /= std[:, None].float()
        head.bias[1:] = ((head.bias[1:] - mean) / std).float()


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


def best_outputs(segmenter, features, sparse, dense, threshold: float):
    with torch.no_grad():
        return decode_best(
            segmenter.model.mask_decoder,
            features.embeddings,
            segmenter._positional,
            features.high_resolution,
            sparse,
            dense,
            threshold,
        )


def split_threshold(iou: torch.Tensor) -> float:
    """A threshold in the widest gap between the prompts' best IoUs ranked in their middle half: about
    half pass and no prompt is borderline."""
    best = iou.max(dim=2).values.flatten().sort().values
    low, high = best.numel() // 4, max(best.numel() // 4 + 1, 3 * best.numel() // 4)
    gaps = best[low + 1 : high + 1] - best[low:high]
    index = low + int(gaps.argmax())
    assert gaps.max() > 1e-4  # the prompts' IoUs differ: the split is meaningful
    return float(best[index] + best[index + 1]) / 2


@pytest.mark.parametrize(("batch", "prompts", "share"), [(1, 9, "all"), (3, 7, "half"), (2, 6, "none")])
def test_best_outputs_match_transformers_after_best_of_three_and_filter(segmenter, batch, prompts, share):
    """Only the chosen output of the passing prompts is upscaled; it equals transformers' multimask
    output after the method's best-of-three choice and IoU filter (``best_of_three``)."""
    features, sparse, dense = decoder_inputs(segmenter, batch, prompts, seed=batch * 10 + prompts + 1)
    _, (reference_logits, reference_iou) = both_decoders(segmenter, features, sparse, dense)
    threshold = split_threshold(reference_iou) if share == "half" else {"all": 0.0, "none": 1.0}[share]
    expected = best_of_three(reference_logits, reference_iou, threshold)
    chosen = best_outputs(segmenter, features, sparse, dense, threshold)
    passed = [len(iou) for _, iou in expected]
    assert [len(iou) for _, iou in chosen] == passed
    if share == "half":
        assert 0 < sum(passed) < batch * prompts
    else:
        assert sum(passed) == (batch * prompts if share == "all" else 0)
    if share == "half":  # the prompts chose different outputs: a mix-up of the three would show
        assert len(set(reference_iou.argmax(dim=2).flatten().tolist())) > 1
    for (logits, iou), (reference_logits, reference_iou) in zip(chosen, expected):
        assert logits.shape == reference_logits.shape == (len(reference_iou), 32, 32)
        torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(iou, reference_iou, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("prompts_per_piece", "pieces", "upscaled_per_piece"), [(1, [1] * 8, 1), (3, [3, 3, 2], 1), (4, [4, 4], 2)]
)
def test_prompts_decoded_in_pieces_give_the_outputs_of_one_piece(
    segmenter, monkeypatch, prompts_per_piece, pieces, upscaled_per_piece
):
    """On CPU each image's prompts go through the decoder a few at a time (``PIECE_BYTES`` of a prompt's
    pixels) and the passing ones through the upscaling likewise (twice a prompt's pixels each): masks
    and IoUs of every image of a batch equal those of one piece, with about half the prompts failing
    the filter (so pieces pass different numbers of prompts, some none)."""
    features, sparse, dense = decoder_inputs(segmenter, 2, 8, seed=5)
    (_, iou), _ = both_decoders(segmenter, features, sparse, dense)
    threshold = split_threshold(iou)
    whole = best_outputs(segmenter, features, sparse, dense, threshold)  # tiny sizes: one piece
    pixel_bytes = features.embeddings[0].numel() * features.embeddings.element_size()
    monkeypatch.setattr(prompt_decoder, "PIECE_BYTES", prompts_per_piece * pixel_bytes)
    decoded, upscaled = [], []
    two_way_layers, masks = prompt_decoder._two_way_layers, prompt_decoder._masks

    def recording_layers(decoder, image_wide, sparse):
        decoded.append(tuple(sparse.shape[:2]))
        return two_way_layers(decoder, image_wide, sparse)

    def recording_masks(decoder, pixels, *arguments):
        upscaled.append(pixels.shape[0])
        return masks(decoder, pixels, *arguments)

    monkeypatch.setattr(prompt_decoder, "_two_way_layers", recording_layers)
    monkeypatch.setattr(prompt_decoder, "_masks", recording_masks)
    in_pieces = best_outputs(segmenter, features, sparse, dense, threshold)
    assert decoded == [(1, size) for size in pieces] * 2  # one image at a time, its prompts in pieces
    passed = sum(len(iou) for _, iou in whole)
    assert 0 < passed < 16 and sum(upscaled) == passed
    assert max(upscaled) == upscaled_per_piece
    for (logits, iou), (expected_logits, expected_iou) in zip(in_pieces, whole):
        assert len(iou) == len(expected_iou)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(iou, expected_iou, rtol=1e-5, atol=1e-7)


def test_pieces_only_on_cpu():
    """Elsewhere a decoder call keeps its prompts together (a piece more would be a host sync more)."""
    assert prompt_decoder._pieces(10, prompt_decoder.PIECE_BYTES, torch.device("meta")) == [slice(0, 10)]
    assert prompt_decoder._pieces(10, prompt_decoder.PIECE_BYTES // 4, torch.device("cpu")) == [
        slice(0, 4),
        slice(4, 8),
        slice(8, 10),
    ]


def test_segmenter_best_points_equal_best_of_three_of_all_outputs(segmenter):
    """The PromptSegmenter path the predictor takes against the full three outputs of the same points."""
    features = segmenter.embed(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3)))
    points = torch.rand(2, 12, 2, generator=torch.Generator().manual_seed(4)) * 128
    logits, iou = segmenter.segment_points(features, points)
    threshold = split_threshold(iou)
    for (chosen, chosen_iou), (expected, expected_iou) in zip(
        segmenter.segment_best_points(features, points, threshold), best_of_three(logits, iou, threshold)
    ):
        assert chosen.dtype == chosen_iou.dtype == torch.float32
        torch.testing.assert_close(chosen, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chosen_iou, expected_iou)


def test_best_outputs_under_bfloat16_autocast(segmenter):
    """The GPU default through the path the predictor takes: chosen masks within bf16 rounding of
    transformers' (every prompt passes, so the same prompts are compared)."""
    features, sparse, dense = decoder_inputs(segmenter, 2, 5, seed=2)
    with autocast(torch.device("cpu"), torch.bfloat16):
        _, (reference_logits, reference_iou) = both_decoders(segmenter, features, sparse, dense)
        chosen = best_outputs(segmenter, features, sparse, dense, 0.0)
    expected = best_of_three(reference_logits.float(), reference_iou.float(), 0.0)
    scale = reference_logits.float().abs().max()
    for (logits, iou), (reference, reference_iou) in zip(chosen, expected):
        assert logits.shape == reference.shape == (5, 32, 32)
        assert (logits.float() - reference).abs().max() < 0.02 * scale
        assert (iou.float() - reference_iou).abs().max() < 0.02
