"""SAM2's mask decoder for many prompts on the same image, with the image's share of the work done once.

``transformers.Sam2MaskDecoder`` copies the image embedding, its positional embedding and both
high-resolution skip levels once per prompt before it starts. This module computes the same function
with the same weights (multimask outputs only, as the point grid uses them) but keeps per-image
tensors per image: the first layer's image projections are computed once per image and every
prompt's tokens attend to them as one long query sequence, skip levels are broadcast rather than
copied, and only the three multimask outputs are upscaled and read. Equal to the transformers forward
up to float rounding (tests/test_prompt_decoder.py); on CPU it decodes 1.8x faster with 28 instead of
40 MiB of scratch per prompt (benchmarks/decoder.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, P, L, h * d]`` -> ``[B, P, h, L, d]``."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def attend(attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One ``Sam2Attention`` block. query ``[B, Pq, Lq, C]``, key and value ``[B, Pk, Lk, C]`` with Pq and
    Pk equal or 1 (one image-wide sequence shared by all prompts) -> ``[B, max(Pq, Pk), Lq, C]``."""
    heads = attention.num_attention_heads
    q = _split_heads(attention.q_proj(query), heads)
    k = _split_heads(attention.k_proj(key), heads)
    v = _split_heads(attention.v_proj(value), heads)
    batch, prompts, _, length, width = q.shape
    if k.shape[1] == 1:  # every prompt reads the same keys: all prompts' queries as one sequence
        q = q.transpose(1, 2).reshape(batch, heads, prompts * length, width)
        out = F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], scale=attention.scaling)
        out = out.unflatten(2, (prompts, length)).transpose(1, 2)  # [B, P, h, L, d]
    else:  # per-prompt keys, read by per-prompt queries or by one image-wide query sequence
        prompts = max(prompts, k.shape[1])
        q, k, v = (t.expand(batch, prompts, *t.shape[2:]).flatten(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attention.scaling).unflatten(0, (batch, prompts))
    return attention.o_proj(out.transpose(-3, -2).flatten(-2))


def _add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y`` (``y`` broadcast), in place where that keeps the dtype ``x + y`` would have."""
    return x.add_(y) if torch.result_type(x, y) == x.dtype else x + y


def decode_multimask(
    decoder,
    image: torch.Tensor,
    positional: torch.Tensor,
    high_resolution: tuple[torch.Tensor, torch.Tensor],
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Sam2MaskDecoder(..., multimask_output=True)`` without per-prompt copies of image tensors.

    image ``[B, C, h, w]``, positional ``[1 or B, C, h, w]``, high_resolution ``([B, C/8, 4h, 4w],
    [B, C/4, 2h, 2w])``, sparse prompt embeddings ``[B, P, S, C]``, dense ``[B, C, h, w]`` ->
    mask logits ``[B, P, 3, 4h, 4w]`` and predicted IoUs ``[B, P, 3]``.
    """
    batch, channels, height, width = image.shape
    prompts = sparse.shape[1]
    output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
    prompt_tokens = torch.cat([output_tokens.expand(batch, prompts, -1, -1), sparse.to(output_tokens.dtype)], dim=2)
    tokens = prompt_tokens  # [B, P, T, C]
    pixels = (image + dense).flatten(2).transpose(1, 2)[:, None]  # [B, 1, hw, C] until the first layer's end
    pixel_positions = positional.flatten(2).transpose(1, 2)[:, None]
    transformer = decoder.transformer
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            tokens = attend(layer.self_attn, tokens, tokens, tokens)
        else:
            query = tokens + prompt_tokens
            tokens = tokens + attend(layer.self_attn, query, query, tokens)
        tokens = layer.layer_norm1(tokens)
        keys = pixels + pixel_positions
        tokens = layer.layer_norm2(
            tokens + attend(layer.cross_attn_token_to_image, tokens + prompt_tokens, keys, pixels)
        )
        tokens = layer.layer_norm3(tokens + layer.mlp(tokens))
        image_update = attend(layer.cross_attn_image_to_token, keys, tokens + prompt_tokens, tokens)
        pixels = layer.layer_norm4(pixels + image_update)  # [B, P, hw, C] from here on
    final = attend(transformer.final_attn_token_to_image, tokens + prompt_tokens, pixels + pixel_positions, pixels)
    tokens = transformer.layer_norm_final_attn(tokens + final)

    skip_fine, skip_coarse = high_resolution
    per_prompt = pixels.reshape(batch * prompts, height, width, channels).permute(0, 3, 1, 2)  # channels-last view
    upscaled = _add(decoder.upscale_conv1(per_prompt).unflatten(0, (batch, prompts)), skip_coarse[:, None])
    upscaled = decoder.activation(decoder.upscale_layer_norm(upscaled.flatten(0, 1)))
    upscaled = _add(decoder.upscale_conv2(upscaled).unflatten(0, (batch, prompts)), skip_fine[:, None])
    upscaled = decoder.activation(upscaled)  # [B, P, C/8, 4h, 4w]
    mask_tokens = tokens[:, :, 3 : 2 + decoder.num_mask_tokens]  # the three multimask tokens (0 is single-mask)
    hypernetworks = decoder.output_hypernetworks_mlps[1:]
    weights = torch.stack([mlp(mask_tokens[:, :, i]) for i, mlp in enumerate(hypernetworks)], dim=2)  # [B, P, 3, C/8]
    logits = (weights @ upscaled.flatten(-2)).unflatten(-1, upscaled.shape[-2:])
    iou = decoder.iou_prediction_head(tokens[:, :, 1])[..., 1:]
    return logits, iou
