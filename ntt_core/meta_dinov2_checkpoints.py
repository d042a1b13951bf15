"""Meta's DINOv2 ``dinov2_vit{s,b,l,g}14_pretrain.pth`` files as ``transformers.Dinov2Model``: read
with ``torch.load(weights_only=True)``, qkv and SwiGLU weights split, every tensor placed strictly;
the architecture from a config, a sidecar ``<checkpoint>.config.json`` or the file's shapes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .meta_checkpoints import (
    CheckpointError,
    _as_config,
    _build,
    _count,
    _listing,
    read_sidecar_config,
    read_state_dict,
)

#: DINOv2 attention heads per hidden size (ViT-S, B, L, g; all 64 channels per head).
DINOV2_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}
#: The hidden size of each of Meta's DINOv2 files, by the letter of its name (``dinov2_vitl14_pretrain.pth``).
DINOV2_WIDTHS = {"s": 384, "b": 768, "l": 1024, "g": 1536}
_DINOV2_FILE_NAME = re.compile(r"^dinov2_vit([sblg])14_pretrain\.pth$")

# DINOv2: Meta key pattern -> transformers key (qkv and SwiGLU's w12 are split separately).
_DINOV2_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^norm\.", "layernorm."),
    (r"^blocks\.(\d+)\.norm([12])\.", r"encoder.layer.\1.norm\2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layer.\1.mlp.fc\2."),
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"encoder.layer.\1.mlp.down_proj."),
]
_DINOV2_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_DINOV2_W12 = re.compile(r"^blocks\.(\d+)\.mlp\.w12\.(weight|bias)$")


def load_meta_dinov2(path: str | Path, config=None):
    """Meta's ``dinov2_vit{s,b,l,g}14_pretrain.pth`` -> ``transformers.Dinov2Model`` (float32, eval mode, CPU).

    ``config``: a ``Dinov2Config`` (or its dict) for architectures the shapes cannot tell; else the
    sidecar ``<path>.config.json``; else inferred for ViT-S/B/L/g.
    """
    from transformers import Dinov2Config

    state = read_state_dict(path)
    check_dinov2_file_name(path, state)
    if config is None:
        config = read_sidecar_config(path, Dinov2Config)
    return dinov2_from_state_dict(state, config, source=str(path))


def check_dinov2_file_name(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """A file named as Meta names its DINOv2 checkpoints (``dinov2_vitl14_pretrain.pth``...) must hold that size."""
    match = _DINOV2_FILE_NAME.match(Path(path).name)
    if match is None or "cls_token" not in state:
        return
    width = state["cls_token"].shape[-1]
    if width != DINOV2_WIDTHS[match.group(1)]:
        held = next((f"ViT-{size}/14" for size, w in DINOV2_WIDTHS.items() if w == width), f"a width-{width} ViT")
        raise CheckpointError(
            f"{path}: the file name says DINOv2 ViT-{match.group(1)}/14, but the weights are {held}; the file is "
            "misnamed or was mixed up with another: download it again or give the right file"
        )


def dinov2_from_state_dict(state: dict[str, torch.Tensor], config=None, source: str = "state dict"):
    """A Meta DINOv2 state dict -> ``transformers.Dinov2Model``; see :func:`load_meta_dinov2`."""
    from transformers import Dinov2Config, Dinov2Model

    config = infer_dinov2_config(state, source) if config is None else _as_config(config, Dinov2Config, source)
    return _build(Dinov2Model, config, convert_dinov2_state_dict(state, source), source)


def convert_dinov2_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Meta DINOv2 keys -> ``Dinov2Model`` keys: fused qkv split into q, k, v; SwiGLU's w12 into gate, up."""
    if "register_tokens" in state:
        raise CheckpointError(f"{source}: a DINOv2 with register tokens; only DINOv2 without registers is supported")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if match := _DINOV2_QKV.match(key):
            layer, kind = match.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"encoder.layer.{layer}.attention.{name}.{kind}"] = part.clone()
            continue
        if match := _DINOV2_W12.match(key):
            layer, kind = match.groups()
            for name, part in zip(("gate_proj", "up_proj"), value.chunk(2)):
                out[f"encoder.layer.{layer}.mlp.{name}.{kind}"] = part.clone()
            continue
        for pattern, replacement in _DINOV2_RENAMES:
            if re.search(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: keys that are not part of a DINOv2 model: {_listing(unknown)}")
    return out


def infer_dinov2_config(state: dict[str, torch.Tensor], source: str = "state dict"):
    """A ``Dinov2Config`` from a Meta DINOv2 state dict of one of the official sizes."""
    try:
        return _infer_dinov2_config(state, source)
    except KeyError as error:
        raise CheckpointError(f"{source} is not a complete Meta DINOv2 checkpoint: no {error.args[0]!r}") from None


def _infer_dinov2_config(state: dict[str, torch.Tensor], source: str):
    from transformers import Dinov2Config

    hidden = state["cls_token"].shape[-1]
    if hidden not in DINOV2_HEADS:
        raise CheckpointError(
            f"{source}: DINOv2 width {hidden} is none of Meta's ViT-S/B/L/g ({sorted(DINOV2_HEADS)}); its number "
            "of heads cannot be read from the weights: pass its transformers Dinov2Config as config=, or write it "
            "as JSON next to the file (<file>.config.json)"
        )
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1:
        raise CheckpointError(f"{source}: pos_embed of {state['pos_embed'].shape[1]} tokens is not 1 + a square grid")
    swiglu = "blocks.0.mlp.w12.weight" in state
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=_count(state, r"blocks\.(\d+)\."),
        num_attention_heads=DINOV2_HEADS[hidden],
        mlp_ratio=4 if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0] // hidden,
        image_size=grid * patch,
        patch_size=patch,
        use_swiglu_ffn=swiglu,
        use_mask_token="mask_token" in state,
    )
