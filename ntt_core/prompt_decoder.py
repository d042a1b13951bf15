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
- on CPU :func:`decode_best` decodes each image's prompts in pieces of a few (:data:`PIECE_BYTES`)
  after the image-wide tensors (:class:`ImageWide`) are made once, so that the allocator reuses freed
  memory instead of asking the kernel for fresh zeroed pages for every large tensor;
- :func:`decode_best` reads SAM2's IoU head (which needs no upscaling) first, then upscales and
  predicts a mask only for the prompts that pass the IoU filter and only for their chosen output;
- the transformer's final attention, where each token reads the pixels on its own, runs only for a
  prompt's IoU and mask tokens (5 of its 8), the ones the output heads read.

Equal to the transformers forward up to float rounding (tests/test_prompt_decoder.py); costs and
speed in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: On CPU :func:`decode_best` works through each image's prompts a few at a time, so that no
#: per-prompt tensor of a piece is above this size. glibc maps every block above its mmap threshold
#: (at most 32 MiB, raised to the size of the largest block freed so far) fresh from the kernel, which
#: zeroes it page by page: whole 64-prompt batches made 380 k page faults per call, a quarter of the
#: decoder's CPU time. Below the threshold freed blocks are reused. At SAM2's sizes: 4 prompts in the
#: transformer, 2 in the upscaling.
PIECE_BYTES = 16 * 2**20


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, P, L, h * d]`` -> ``[B, P, h, L, d]``."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def attend(attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One ``Sam2Attention`` block. query ``[B, Pq, Lq, C]``, key and value ``[B, Pk, Lk, C]`` with Pq and
    Pk equal or 1 (one image-wide sequence shared by all prompts) -> ``[B, max(Pq, Pk), Lq, C]``."""
    return _attend_projected(attention, query, attention.k_proj(key), attention.v_proj(value))


def _attend_projected(attention, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`attend` with the keys and values already projected (``[B, Pk, Lk, h * d]``)."""
    heads = attention.num_attention_heads
    q = _split_heads(attention.q_proj(query), heads)
    k, v = _split_heads(k, heads), _split_heads(v, heads)
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


class ImageWide:
    """The prompt-independent tensors of a decoder call's images: the pixels before the first layer's
    update ``[B, 1, hw, C]``, their positions ``[1 or B, hw, C]`` and the projections of both that the
    attention blocks read, each computed once and read by every piece of prompts."""

    def __init__(self, image: torch.Tensor, positional: torch.Tensor, dense: torch.Tensor) -> None:
        self.pixels = (image + dense).flatten(2).transpose(1, 2)[:, None]
        self.positions = positional.flatten(2).transpose(1, 2)
        self._inputs = {
            "pixels": self.pixels,
            "positions": self.positions,
            "pixels+positions": self.pixels + self.positions[:, None],
        }
        self._projected: dict[tuple[object, str], torch.Tensor] = {}

    def projected(self, projection, of: str) -> torch.Tensor:
        """``projection`` of "pixels" or "pixels+positions" (``[B, 1, hw, out]``) or of "positions"
        (``[1 or B, hw, out]``), made at the first request."""
        key = (projection, of)
        if key not in self._projected:
            self._projected[key] = projection(self._inputs[of])
        return self._projected[key]


def _token_pixel_scores(vectors: torch.Tensor, projection, pixels: torch.Tensor, image_wide: ImageWide) -> torch.Tensor:
    """Dot products of per-head token vectors ``[B, P, h, T, d]`` with ``projection(pixels + positions)``
    (pixels ``[B, 1 or P, N, C]``: the image-wide ones or per prompt) -> ``[B * P, h * T, N]``. Per-prompt
    pixels are not projected: ``v . (W p + b) = (W^T v) . p + v . b`` per head."""
    batch, prompts, heads, tokens, _ = vectors.shape

    def scores(projected: torch.Tensor) -> torch.Tensor:  # [1 or B, N, h * d] -> [B * P, h * T, N]
        projected = projected.unflatten(-1, (heads, -1)).expand(batch, -1, -1, -1)
        return torch.einsum("bphtd,bnhd->bphtn", vectors, projected).reshape(batch * prompts, heads * tokens, -1)

    if pixels is image_wide.pixels:  # projected once
        return scores(image_wide.projected(projection, "pixels+positions")[:, 0])
    weight = projection.weight.unflatten(0, (heads, -1))  # [h, d, C]
    maps = torch.einsum("bphtd,hdc->bphtc", vectors, weight).reshape(batch * prompts, heads * tokens, -1)
    return _baddbmm(scores(image_wide.projected(projection, "positions")), maps, pixels.flatten(0, 1).transpose(1, 2))


def _tokens_read_pixels(attention, queries: torch.Tensor, pixels: torch.Tensor, image_wide: ImageWide) -> torch.Tensor:
    """``attention(queries, pixels + positions, pixels)``: tokens ``[B, P, T, C]`` read pixels
    ``[B, 1 or P, N, C]`` (the image-wide ones or per prompt) -> ``[B, P, T, C]``."""
    if pixels is image_wide.pixels:  # projected once, as attention's keys and values
        keys = image_wide.projected(attention.k_proj, "pixels+positions")
        return _attend_projected(attention, queries, keys, image_wide.projected(attention.v_proj, "pixels"))
    heads = attention.num_attention_heads
    batch, prompts, tokens, _ = queries.shape
    q = _split_heads(attention.q_proj(queries), heads) * attention.scaling  # [B, P, h, T, d]
    weights = _token_pixel_scores(q, attention.k_proj, pixels, image_wide).softmax(dim=-1)  # [B * P, h * T, N]
    read = (weights @ pixels.flatten(0, 1)).unflatten(1, (heads, tokens))  # [B * P, h, T, C]
    value_weight = attention.v_proj.weight.unflatten(0, (heads, -1))  # [h, d, C]
    out = torch.einsum("bhtc,hdc->bthd", read, value_weight) + attention.v_proj.bias.unflatten(0, (heads, -1))
    return attention.o_proj(out.flatten(-2).unflatten(0, (batch, prompts)))


def _pixels_read_tokens(
    attention, pixels: torch.Tensor, image_wide: ImageWide, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``pixels + attention(pixels + positions, keys, values)``: pixels ``[B, 1 or P, N, C]`` (the
    image-wide ones or per prompt) read tokens ``[B, P, T, C]`` -> ``[B, P, N, C]`` (in place in
    per-prompt pixels)."""
    heads = attention.num_attention_heads
    batch, prompts, tokens, channels = keys.shape
    k = _split_heads(attention.k_proj(keys), heads) * attention.scaling  # [B, P, h, T, d]
    v = _split_heads(attention.v_proj(values), heads)
    scores = _token_pixel_scores(k, attention.q_proj, pixels, image_wide).unflatten(1, (heads, tokens))
    weights = scores.softmax(dim=2).flatten(1, 2).transpose(1, 2)  # [B * P, N, h * T], softmax over each head's T
    output_weight = attention.o_proj.weight.unflatten(1, (heads, -1))  # [C, h, d]
    # each head's weights sum to 1, so o_proj's bias spreads evenly over the h * T token rows
    value_maps = torch.einsum("bphtd,chd->bphtc", v, output_weight) + attention.o_proj.bias / heads
    value_maps = value_maps.reshape(batch * prompts, heads * tokens, channels)
    if pixels is image_wide.pixels:
        return _add((weights @ value_maps).unflatten(0, (batch, prompts)), pixels)
    return _baddbmm(pixels.flatten(0, 1), weights, value_maps).unflatten(0, (batch, prompts))


def _two_way_layers(
    decoder, image_wide: ImageWide, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM2's two-way transformer up to its final attention, for sparse prompt embeddings ``[B, P, S, C]``
    -> tokens ``[B, P, T, C]``, their positional part (the prompt tokens, same shape) and pixels
    ``[B, P, hw, C]``."""
    batch, prompts = sparse.shape[:2]
    output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
    prompt_tokens = torch.cat([output_tokens.expand(batch, prompts, -1, -1), sparse.to(output_tokens.dtype)], dim=2)
    tokens = prompt_tokens  # [B, P, T, C]
    pixels = image_wide.pixels  # [B, 1, hw, C] until the first layer's end
    for layer in decoder.transformer.layers:
        if layer.skip_first_layer_pe:
            tokens = attend(layer.self_attn, tokens, tokens, tokens)
        else:
            query = tokens + prompt_tokens
            tokens = tokens + attend(layer.self_attn, query, query, tokens)
        tokens = layer.layer_norm1(tokens)
        read = _tokens_read_pixels(layer.cross_attn_token_to_image, tokens + prompt_tokens, pixels, image_wide)
        tokens = layer.layer_norm2(tokens + read)
        tokens = layer.layer_norm3(tokens + layer.mlp(tokens))
        pixels = _pixels_read_tokens(
            layer.cross_attn_image_to_token, pixels, image_wide, tokens + prompt_tokens, tokens
        )
        pixels = layer.layer_norm4(pixels)  # [B, P, hw, C] from here on
    return tokens, prompt_tokens, pixels


def _multimask_heads(
    decoder, image_wide: ImageWide, tokens: torch.Tensor, prompt_tokens: torch.Tensor, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's final attention and the output heads, from :func:`_two_way_layers`'s outputs ->
    the three multimask outputs' predicted IoUs ``[B, P, 3]`` and hypernetwork weights ``[B, P, 3, C/8]``
    (output 0, the single mask, is not used). Each token reads the pixels on its own in the final
    attention, so only the IoU token and the mask tokens do (5 of 8; of these the single-mask token is
    not read, kept for one contiguous slice), not the object-score token nor the sparse prompt tokens."""
    used = slice(1, 2 + decoder.num_mask_tokens)  # the IoU token, then the single-mask and multimask tokens
    transformer = decoder.transformer
    queries = tokens[:, :, used] + prompt_tokens[:, :, used]
    final = _tokens_read_pixels(transformer.final_attn_token_to_image, queries, pixels, image_wide)
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
    upscaled = pixels @ decoder.upscale_conv1.weight.permute(0, 2, 3, 1).flatten(1)  # [n, hw, 4 * C/4]
    norm = decoder.upscale_layer_norm  # channels-first in transformers; here the channels are last
    upscaled = _add(upscaled, coarse).unflatten(-1, (4, -1))  # [n, hw, 4, C/4]
    upscaled = _activate(decoder, F.layer_norm(upscaled, upscaled.shape[-1:], norm.weight, norm.bias, norm.eps))
    upscaled = upscaled.flatten(1, 2) @ decoder.upscale_conv2.weight.permute(0, 2, 3, 1).flatten(1)
    upscaled = _activate(decoder, _add(upscaled, fine)).unflatten(-1, (4, -1)).flatten(1, 2)  # [n, 16hw, C/8]
    logits = weights @ upscaled.transpose(1, 2)  # [n, k, 16hw] in order (y, x, i, j, k, l)
    logits = logits.unflatten(-1, (side, side, 2, 2, 2, 2)).permute(0, 1, 2, 4, 6, 3, 5, 7)
    return logits.reshape(*weights.shape[:2], 4 * side, 4 * side)


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
    image_wide = ImageWide(image, positional, dense)
    tokens, prompt_tokens, pixels = _two_way_layers(decoder, image_wide, sparse)
    iou, weights = _multimask_heads(decoder, image_wide, tokens, prompt_tokens, pixels)
    coarse, fine = _blocked_skips(decoder, high_resolution)
    side = image.shape[-1]
    logits = [_masks(decoder, *per_image, side) for per_image in zip(pixels, coarse, fine, weights)]
    return torch.stack(logits), iou


def _pieces(count: int, item_bytes: int, device: torch.device) -> list[slice]:
    """``range(count)`` in slices of items whose ``item_bytes`` add up to at most :data:`PIECE_BYTES`
    (one item where a single one is larger) on CPU; elsewhere one slice (a GPU wants large batches,
    and a slice more is a host sync more)."""
    step = max(1, PIECE_BYTES // item_bytes)
    if device.type != "cpu" or step >= count:
        return [slice(0, count)]
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _chosen_masks(
    decoder, pixels: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, weights: torch.Tensor, side: int
) -> torch.Tensor:
    """:func:`_masks` of the chosen output ``[n, 1, C/8]`` of n prompts, in pieces on CPU -> ``[n, 4h, 4w]``."""
    item_bytes = fine.numel() * pixels.element_size()  # the second upscaling's output, per prompt
    pieces = _pieces(pixels.shape[0], item_bytes, pixels.device)
    logits = [_masks(decoder, pixels[piece], coarse, fine, weights[piece], side)[:, 0] for piece in pieces]
    return logits[0] if len(logits) == 1 else torch.cat(logits)


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
    ``[n]`` of its n passing prompts, in prompt order. On a GPU one host sync per call (the pass counts);
    on CPU each image's prompts in pieces of :data:`PIECE_BYTES` (same outputs up to float rounding)."""
    coarse, fine = _blocked_skips(decoder, high_resolution)
    side, batch = image.shape[-1], image.shape[0]
    chosen = []
    for images in [slice(b, b + 1) for b in range(batch)] if image.device.type == "cpu" else [slice(0, batch)]:
        per_image = positional if positional.shape[0] == 1 else positional[images]
        image_wide = ImageWide(image[images], per_image, dense[images])
        kept: list[tuple[list, list]] = [([], []) for _ in range(images.stop - images.start)]
        pixel_bytes = image_wide.pixels[0, 0].numel() * image.element_size()  # a prompt's pixels
        for prompts in _pieces(sparse.shape[1], pixel_bytes, image.device):
            tokens, prompt_tokens, pixels = _two_way_layers(decoder, image_wide, sparse[images, prompts])
            iou, weights = _multimask_heads(decoder, image_wide, tokens, prompt_tokens, pixels)
            best_iou, best, keep = choose_outputs(iou, iou_threshold)
            weights = weights.gather(2, best[:, :, None, None].expand(-1, -1, 1, weights.shape[-1]))  # [B, P, 1, C/8]
            for index, count in enumerate(keep.sum(dim=1).tolist()):
                # the passing prompts in order, without a second sync (a stable sort puts them first; any device)
                rows = (
                    keep[index].int().argsort(descending=True, stable=True)[:count]
                    if count < keep.shape[1]
                    else slice(None)
                )
                number = images.start + index
                logits = _chosen_masks(
                    decoder, pixels[index, rows], coarse[number], fine[number], weights[index, rows], side
                )
                kept[index][0].append(logits)
                kept[index][1].append(best_iou[index, rows])
        chosen += [tuple(part[0] if len(part) == 1 else torch.cat(part) for part in outputs) for outputs in kept]
    return chosen
