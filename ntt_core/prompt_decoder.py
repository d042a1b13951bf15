"""SAM2's mask decoder for many prompts on the same image, with no work that the output does not use.

``transformers.Sam2MaskDecoder`` copies the image embedding, its positional embedding and both
high-resolution skip levels once per prompt and upscales all four outputs of every prompt. This
module computes the same function with the same weights, in five ways cheaper:

- per-image tensors stay per image: the first layer's image projections are computed once per image,
  skip levels are shared by the prompts of an image, positional projections are made once per image;
- attention between a prompt's few tokens (T = 8) and its 4096 pixels never projects the pixels:
  ``q . (Wk p + bk) = (Wk^T q) . p + q . bk`` and ``A (Wv p + bv) = (A p) Wv^T + bv`` for tokens reading
  pixels, ``o_proj(A V) = sum_h A_h (V_h Wo_h^T) + bo`` for pixels reading tokens, so each pixel
  meets ``heads x T`` token vectors (64) instead of the internal width twice (2 x 128);
- inside :func:`reusing_buffers` (``proposals.propose``: the prompt batches of an image) the largest
  matrix products write into buffers kept from batch to batch instead of fresh memory (CPU);
- :func:`decode_best` reads SAM2's IoU head (which needs no upscaling) first, then upscales and
  predicts a mask only for the prompts that pass the IoU filter and only for their chosen output;
- the transformer's final attention, where each token reads the pixels on its own, runs only for a
  prompt's IoU and mask tokens (5 of its 8), the ones the output heads read.

Equal to the transformers forward up to float rounding (tests/test_prompt_decoder.py); costs and
speed in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F


class Scratch:
    """Outputs of the decoder's largest per-batch matrix products (the first layer's pixel update,
    both upscalings, the passing prompts' pixels), kept from one prompt batch to the next. On CPU glibc
    hands every freed block above 32 MiB back to the kernel, which zeroes it again page by page for
    the next batch (a quarter of the decoder's CPU time is kernel time); a third of those faults go."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous ``shape`` tensor of ``like``'s dtype and device: the buffer
        ``name``, grown where it is too small. Its contents last until ``name`` is taken again."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buffer[:size].view(shape)


_SCRATCH: ContextVar[Scratch | None] = ContextVar("ntt_prompt_decoder_scratch", default=None)


@contextlib.contextmanager
def reusing_buffers() -> Iterator[None]:
    """Decoder calls inside share one :class:`Scratch` (on CPU, without autograd or autocast; elsewhere
    nothing changes: CUDA's caching allocator reuses memory already). Its memory is freed at the end."""
    token = _SCRATCH.set(Scratch())
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def _buffer(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """The current :class:`Scratch`'s buffer ``name`` for an output of ``like``'s dtype, or None where
    there is none or an ``out=`` argument would not do (autograd, autocast, another device than CPU)."""
    scratch = _SCRATCH.get()
    if scratch is None or like.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    return scratch.take(name, shape, like)


def _matmul(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``[..., n, k] @ [k, m]``, or batched ``[N, n, k] @ [N, k, m]``) into buffer ``name``."""
    out = _buffer(name, (*a.shape[:-1], b.shape[-1]), a) if a.dtype == b.dtype else None
    return a @ b if out is None else torch.matmul(a, b, out=out)


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


def _token_pixel_scores(
    vectors: torch.Tensor, projection, pixels: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Dot products of per-head token vectors ``[B, P, h, T, d]`` with ``projection(pixels + positions)``
    (pixels ``[B, 1 or P, N, C]``, positions ``[1 or B, N, C]``) -> ``[B * P, h * T, N]``. Per-prompt
    pixels are not projected: ``v . (W p + b) = (W^T v) . p + v . b`` per head."""
    batch, prompts, heads, tokens, _ = vectors.shape

    def scores(projected: torch.Tensor) -> torch.Tensor:  # [1 or B, N, h * d] -> [B * P, h * T, N]
        projected = projected.unflatten(-1, (heads, -1)).expand(batch, -1, -1, -1)
        return torch.einsum("bphtd,bnhd->bphtn", vectors, projected).reshape(batch * prompts, heads * tokens, -1)

    if pixels.shape[1] == 1:  # image-wide pixels: project them once
        return scores(projection(pixels[:, 0] + positions))
    weight = projection.weight.unflatten(0, (heads, -1))  # [h, d, C]
    maps = torch.einsum("bphtd,hdc->bphtc", vectors, weight).reshape(batch * prompts, heads * tokens, -1)
    return _baddbmm(scores(projection(positions)), maps, pixels.flatten(0, 1).transpose(1, 2))


def _tokens_read_pixels(
    attention, queries: torch.Tensor, pixels: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """``attention(queries, pixels + positions, pixels)``: tokens ``[B, P, T, C]`` read pixels
    ``[B, 1 or P, N, C]`` (positions ``[1 or B, N, C]``) -> ``[B, P, T, C]``."""
    if pixels.shape[1] == 1:  # image-wide pixels: project them once, as the first layer does
        return attend(attention, queries, pixels + positions[:, None], pixels)
    heads = attention.num_attention_heads
    batch, prompts, tokens, _ = queries.shape
    q = _split_heads(attention.q_proj(queries), heads) * attention.scaling  # [B, P, h, T, d]
    weights = _token_pixel_scores(q, attention.k_proj, pixels, positions).softmax(dim=-1)  # [B * P, h * T, N]
    read = (weights @ pixels.flatten(0, 1)).unflatten(1, (heads, tokens))  # [B * P, h, T, C]
    value_weight = attention.v_proj.weight.unflatten(0, (heads, -1))  # [h, d, C]
    out = torch.einsum("bhtc,hdc->bthd", read, value_weight) + attention.v_proj.bias.unflatten(0, (heads, -1))
    return attention.o_proj(out.flatten(-2).unflatten(0, (batch, prompts)))


def _pixels_read_tokens(
    attention, pixels: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``pixels + attention(pixels + positions, keys, values)``: pixels ``[B, 1 or P, N, C]``
    (positions ``[1 or B, N, C]``) read tokens ``[B, P, T, C]`` -> ``[B, P, N, C]`` (in place in
    per-prompt pixels, else in the :class:`Scratch` buffer "pixels" where there is one)."""
    heads = attention.num_attention_heads
    batch, prompts, tokens, channels = keys.shape
    k = _split_heads(attention.k_proj(keys), heads) * attention.scaling  # [B, P, h, T, d]
    v = _split_heads(attention.v_proj(values), heads)
    scores = _token_pixel_scores(k, attention.q_proj, pixels, positions).unflatten(1, (heads, tokens))
    weights = scores.softmax(dim=2).flatten(1, 2).transpose(1, 2)  # [B * P, N, h * T], softmax over each head's T
    output_weight = attention.o_proj.weight.unflatten(1, (heads, -1))  # [C, h, d]
    # each head's weights sum to 1, so o_proj's bias spreads evenly over the h * T token rows
    value_maps = torch.einsum("bphtd,chd->bphtc", v, output_weight) + attention.o_proj.bias / heads
    value_maps = value_maps.reshape(batch * prompts, heads * tokens, channels)
    if pixels.shape[1] == 1:
        return _add(_matmul("pixels", weights, value_maps).unflatten(0, (batch, prompts)), pixels)
    return _baddbmm(pixels.flatten(0, 1), weights, value_maps).unflatten(0, (batch, prompts))


def _two_way_layers(
    decoder, image: torch.Tensor, positional: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM2's two-way transformer up to its final attention -> tokens ``[B, P, T, C]``, their positional
    part (the prompt tokens, same shape), pixels ``[B, P, hw, C]`` and their positions ``[1 or B, hw, C]``."""
    batch = image.shape[0]
    prompts = sparse.shape[1]
    output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
    prompt_tokens = torch.cat([output_tokens.expand(batch, prompts, -1, -1), sparse.to(output_tokens.dtype)], dim=2)
    tokens = prompt_tokens  # [B, P, T, C]
    pixels = (image + dense).flatten(2).transpose(1, 2)[:, None]  # [B, 1, hw, C] until the first layer's end
    positions = positional.flatten(2).transpose(1, 2)  # [1 or B, hw, C]
    for layer in decoder.transformer.layers:
        if layer.skip_first_layer_pe:
            tokens = attend(layer.self_attn, tokens, tokens, tokens)
        else:
            query = tokens + prompt_tokens
            tokens = tokens + attend(layer.self_attn, query, query, tokens)
        tokens = layer.layer_norm1(tokens)
        read = _tokens_read_pixels(layer.cross_attn_token_to_image, tokens + prompt_tokens, pixels, positions)
        tokens = layer.layer_norm2(tokens + read)
        tokens = layer.layer_norm3(tokens + layer.mlp(tokens))
        pixels = _pixels_read_tokens(layer.cross_attn_image_to_token, pixels, positions, tokens + prompt_tokens, tokens)
        pixels = layer.layer_norm4(pixels)  # [B, P, hw, C] from here on
    return tokens, prompt_tokens, pixels, positions


def _multimask_heads(
    decoder, tokens: torch.Tensor, prompt_tokens: torch.Tensor, pixels: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's final attention and the output heads, from :func:`_two_way_layers`'s outputs ->
    the three multimask outputs' predicted IoUs ``[B, P, 3]`` and hypernetwork weights ``[B, P, 3, C/8]``
    (output 0, the single mask, is not used). Each token reads the pixels on its own in the final
    attention, so only the IoU token and the mask tokens do (5 of 8; of these the single-mask token is
    not read, kept for one contiguous slice), not the object-score token nor the sparse prompt tokens."""
    used = slice(1, 2 + decoder.num_mask_tokens)  # the IoU token, then the single-mask and multimask tokens
    transformer = decoder.transformer
    queries = tokens[:, :, used] + prompt_tokens[:, :, used]
    final = _tokens_read_pixels(transformer.final_attn_token_to_image, queries, pixels, positions)
    tokens = transformer.layer_norm_final_attn(tokens[:, :, used] + final)
    hypernetworks = decoder.output_hypernetworks_mlps[1:]
    weights = torch.stack([mlp(tokens[:, :, 2 + i]) for i, mlp in enumerate(hypernetworks)], dim=2)
    return decoder.iou_prediction_head(tokens[:, :, 0])[..., 1:], weights


def _blocked_skips(decoder, high_resolution: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip levels ``([B, C/8, 4h, 4w], [B, C/4, 2h, 2w])`` plus the upscaling convs' biases, in the
    order :func:`_masks` makes its pixels: coarse ``[B, hw, 4 * C/4]`` (pixel (2y + i, 2x + j) at
    row y * w + x, columns (i, j, channel)) and fine ``[B, 4hw, 4 * C/8]`` likewise one level down."""
    fine, coarse = high_resolution
    batch, quarter, height, width = coarse.shape
    height, width = height // 2, width // 2
    coarse = coarse.view(batch, quarter, height, 2, width, 2).permute(0, 2, 4, 3, 5, 1)  # [B, y, x, i, j, c]
    fine = fine.view(batch, -1, height, 2, 2, width, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1)  # [B, y, x, i, j, k, l, c]
    coarse = (coarse + decoder.upscale_conv1.bias).reshape(batch, height * width, -1)
    return coarse, (fine + decoder.upscale_conv2.bias).reshape(batch, 4 * height * width, -1)


def _masks(
    decoder, pixels: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, weights: torch.Tensor, side: int
) -> torch.Tensor:
    """Upscale pixels ``[n, hw, C]`` of prompts of one image (its :func:`_blocked_skips` ``[hw, ...]``,
    ``[4hw, ...]``) and dot them with hypernetwork weights ``[n, k, C/8]`` -> logits ``[n, k, 4h, 4w]``
    (h = w = side). The two stride-2 transposed convolutions are matrix products whose output pixels
    stay in block order until the final masks are reordered."""
    # [n, hw, 4 * C/4], in a scratch buffer where there is one: the first layer's update is dead by now
    upscaled = _matmul("pixels", pixels, decoder.upscale_conv1.weight.permute(0, 2, 3, 1).flatten(1))
    norm = decoder.upscale_layer_norm  # channels-first in transformers; here the channels are last
    upscaled = _add(upscaled, coarse).unflatten(-1, (4, -1))  # [n, hw, 4, C/4]
    upscaled = _activate(decoder, F.layer_norm(upscaled, upscaled.shape[-1:], norm.weight, norm.bias, norm.eps))
    upscaled = _matmul("upscaled", upscaled.flatten(1, 2), decoder.upscale_conv2.weight.permute(0, 2, 3, 1).flatten(1))
    upscaled = _activate(decoder, _add(upscaled, fine)).unflatten(-1, (4, -1)).flatten(1, 2)  # [n, 16hw, C/8]
    logits = weights @ upscaled.transpose(1, 2)  # [n, k, 16hw] in order (y, x, i, j, k, l)
    logits = logits.unflatten(-1, (side, side, 2, 2, 2, 2)).permute(0, 1, 2, 4, 6, 3, 5, 7)
    return logits.reshape(*weights.shape[:2], 4 * side, 4 * side)


def _index_select(name: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` into buffer ``name``."""
    out = _buffer(name, (rows.numel(), *x.shape[1:]), x)
    return x[rows] if out is None else torch.index_select(x, 0, rows, out=out)


def _activate(decoder, x: torch.Tensor) -> torch.Tensor:
    """``decoder.activation(x)`` for a tensor ``x`` of this module's own, in place where it is a GELU
    (no second large allocation: 20 % faster upscaling on CPU, fewer page faults)."""
    activation = decoder.activation
    if isinstance(activation, torch.nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


def _baddbmm(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x + a @ b`` (batched), in place in ``x`` unless autocast or the dtypes ask for a new tensor."""
    if torch.is_autocast_enabled(x.device.type) or not x.dtype == a.dtype == b.dtype:
        return torch.baddbmm(x, a, b)
    return x.baddbmm_(a, b)


def _add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y`` (``y`` broadcast), in place where that keeps the dtype ``x + y`` would have."""
    return x.add_(y) if torch.result_type(x, y) == x.dtype else x + y


def choose_outputs(iou: torch.Tensor, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The method's best-of-three rule: predicted IoUs ``[B, P, 3]`` -> each prompt's highest IoU
    ``[B, P]``, the output that has it ``[B, P]``, and whether that IoU exceeds ``iou_threshold`` ``[B, P]``."""
    best_iou, best = iou.max(dim=2)
    return best_iou, best, best_iou.float() > iou_threshold  # in float32 whatever the compute dtype


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
    tokens, prompt_tokens, pixels, positions = _two_way_layers(decoder, image, positional, sparse, dense)
    iou, weights = _multimask_heads(decoder, tokens, prompt_tokens, pixels, positions)
    coarse, fine = _blocked_skips(decoder, high_resolution)
    side = image.shape[-1]
    logits = [_masks(decoder, *per_image, side) for per_image in zip(pixels, coarse, fine, weights)]
    return torch.stack(logits), iou


def decode_best(
    decoder,
    image: torch.Tensor,
    positional: torch.Tensor,
    high_resolution: tuple[torch.Tensor, torch.Tensor],
    sparse: torch.Tensor,
    dense: torch.Tensor,
    iou_threshold: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`decode_multimask` followed by :func:`choose_outputs`, with only the chosen output of the
    prompts that pass upscaled: inputs as there -> per image, the chosen logits ``[n, 4h, 4w]`` and IoUs
    ``[n]`` of its n passing prompts, in prompt order. One host sync per call (the pass counts)."""
    tokens, prompt_tokens, pixels, positions = _two_way_layers(decoder, image, positional, sparse, dense)
    iou, weights = _multimask_heads(decoder, tokens, prompt_tokens, pixels, positions)
    best_iou, best, keep = choose_outputs(iou, iou_threshold)
    weights = weights.gather(2, best[:, :, None, None].expand(-1, -1, 1, weights.shape[-1]))  # [B, P, 1, C/8]
    coarse, fine = _blocked_skips(decoder, high_resolution)
    side = image.shape[-1]
    chosen = []
    for index, count in enumerate(keep.sum(dim=1).tolist()):
        # the passing prompts in order, without a second sync (a stable sort puts them first; any device)
        rows = keep[index].int().argsort(descending=True, stable=True)[:count] if count < keep.shape[1] else slice(None)
        passing = pixels[index] if count == keep.shape[1] else _index_select("passing", pixels[index], rows)
        logits = _masks(decoder, passing, coarse[index], fine[index], weights[index, rows], side)
        chosen.append((logits[:, 0], best_iou[index, rows]))
    return chosen
