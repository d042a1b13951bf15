"""Meta's original SAM2 / SAM2.1 and DINOv2 checkpoint files loaded into the ``transformers`` models.

Meta ships SAM2 as ``{"model": state_dict}`` ``.pt`` files (image and video modules together) and
DINOv2 as flat ``dinov2_vit{s,b,l,g}14_pretrain.pth`` state dicts. Both are read with
``torch.load(weights_only=True)`` (no code in the file ever runs), renamed to the module names of
``transformers.Sam2Model`` / ``Sam2VideoModel`` / ``Dinov2Model`` and loaded strictly: a key the model
needs that is missing or has the wrong shape is a :class:`CheckpointError`, never a random weight.
``Sam2Model`` (the image path) drops SAM2's video-only modules (memory attention and encoder, object
pointers); ``Sam2VideoModel`` takes every tensor of the file.

The architecture comes, in this order, from the ``config`` argument, from a sidecar
``<checkpoint>.config.json`` (a transformers config dict), or from the checkpoint's shapes plus
the tables of Meta's official sizes below.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import Counter
from pathlib import Path

import torch

from .errors import NttError


class CheckpointError(NttError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


#: Meta's Hiera trunks, keyed by (stem embed dim, blocks per stage): what the shapes cannot tell.
HIERA_SIZES = {
    (96, (1, 2, 7, 2)): {"name": "tiny", "heads": 1, "global": [5, 7, 9], "windows": [8, 4, 14, 7]},
    (96, (1, 2, 11, 2)): {"name": "small", "heads": 1, "global": [7, 10, 13], "windows": [8, 4, 14, 7]},
    (112, (2, 3, 16, 3)): {"name": "base_plus", "heads": 2, "global": [12, 16, 20], "windows": [8, 4, 14, 7]},
    (144, (2, 6, 36, 4)): {"name": "large", "heads": 2, "global": [23, 33, 43], "windows": [8, 4, 16, 8]},
}
SAM2_IMAGE_SIZE = 1024  # the frame of every official SAM2 / SAM2.1 checkpoint
SAM2_DECODER_HEADS = 8  # fixed in Meta's SAM2Base
#: DINOv2 attention heads per hidden size (ViT-S, B, L, g; all 64 channels per head).
DINOV2_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}
#: The hidden size of each of Meta's DINOv2 files, by the letter of its name (``dinov2_vitl14_pretrain.pth``).
DINOV2_WIDTHS = {"s": 384, "b": 768, "l": 1024, "g": 1536}
_DINOV2_FILE_NAME = re.compile(r"^dinov2_vit([sblg])14_pretrain\.pth$")

# SAM2 weights that only the video predictor uses; Sam2Model has no place for them.
_SAM2_VIDEO_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
)
_SAM2_VIDEO_KEYS = {"maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial"}
# Meta module name -> Sam2VideoModel module name for the video-only weights, applied before _SAM2_RENAMES.
_SAM2_VIDEO_RENAMES = [
    (r"^maskmem_tpos_enc$", "memory_temporal_positional_encoding"),
    (r"^no_mem_pos_enc$", "no_memory_positional_encoding"),
    (r"^no_obj_ptr$", "no_object_pointer"),
    (r"^no_obj_embed_spatial$", "occlusion_spatial_embedding_parameter"),
    (r"^obj_ptr_tpos_proj\.", "temporal_positional_encoding_projection_layer."),
    (r"^obj_ptr_proj\.", "object_pointer_proj."),
    (r"^(memory_attention\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^memory_attention\.norm\.", "memory_attention.layer_norm."),
    (r"^memory_encoder\.out_proj\.", "memory_encoder.projection."),
    (r"^memory_encoder\.pix_feat_proj\.", "memory_encoder.feature_projection."),
    (r"^memory_encoder\.fuser\.layers\.(\d+)\.gamma$", r"memory_encoder.memory_fuser.layers.\1.scale"),
    (r"^memory_encoder\.fuser\.layers\.(\d+)\.dwconv\.", r"memory_encoder.memory_fuser.layers.\1.depthwise_conv."),
    (r"^memory_encoder\.fuser\.layers\.(\d+)\.norm\.", r"memory_encoder.memory_fuser.layers.\1.layer_norm."),
    (
        r"^memory_encoder\.fuser\.layers\.(\d+)\.pwconv([12])\.",
        r"memory_encoder.memory_fuser.layers.\1.pointwise_conv\2.",
    ),
]
# Meta's mask downsampler: one Sequential of (conv, LayerNorm, GELU) x n and a final 1x1 conv.
_MASK_DOWNSAMPLER = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(weight|bias)$")
_SAM2_IMAGE_PREFIXES = ("image_encoder.trunk.", "image_encoder.neck.convs.", "sam_", "no_mem_embed")
#: Meta's checkpoint file names, as ``sam2``'s ``build_sam.py`` downloads them: version, Hiera size.
_SAM2_FILE_NAME = re.compile(r"^(sam2(?:\.1)?)_hiera_(tiny|small|base_plus|large)\.pt$")
# Keys only SAM2.1 checkpoints have (temporal encoding of object pointers, no-object spatial embedding).
_SAM21_MARKERS = ("obj_ptr_tpos_proj.weight", "no_obj_embed_spatial")

# Meta module name -> transformers module name, applied in order to each kept SAM2 key.
_SAM2_RENAMES = [
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
    (r"^no_mem_embed$", "no_memory_embedding"),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"^(vision_encoder\.backbone\.blocks\.\d+)\.norm([12])\.", r"\1.layer_norm\2."),
    (r"\.out_proj\.", ".o_proj."),
    (r"(transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"transformer\.norm_final_attn\.", "transformer.layer_norm_final_attn."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
]
# Meta's ``MLP`` (layers.0 .. layers.n-1) -> transformers' (proj_in, layers.0 .. layers.n-3, proj_out).
_MLP_LAYER = re.compile(
    r"^(.*(?:\.mlp|output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head|obj_ptr_proj))\.layers\.(\d+)\.(weight|bias)$"
)
_PROMPT_POINT = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")
_PROMPT_PE = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

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


# ---------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Meta checkpoint file: ``{"model": state_dict}`` unwrapped, or a flat state dict.

    Read with ``torch.load(weights_only=True)``: pickled classes are refused, not run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint of tensors (truncated, another format, "
            f"or pickled objects other than tensors, which are never unpickled): {reason}"
        ) from None
    state = content.get("model") if isinstance(content, dict) and "model" in content else content
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{str(path)!r} holds {type(state).__name__}, not a state dict of tensors")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{str(path)!r}: entries that are not tensors: {', '.join(not_tensors[:5])}")
    return state


def read_sidecar_config(path: str | Path, config_class):
    """The transformers config in ``<path>.config.json`` next to a checkpoint, or None if there is none."""
    sidecar = Path(str(path) + ".config.json")
    if not sidecar.is_file():
        return None
    try:
        return _as_config(json.loads(sidecar.read_text()), config_class, str(sidecar))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"config file {str(sidecar)!r} is not valid JSON: {error}") from None


def _as_config(config, config_class, where: str):
    """A config object of ``config_class`` from an instance or a dict."""
    if isinstance(config, config_class):
        return config
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a {config_class.__name__} or a dict, got {type(config).__name__}")
    model_type = config.get("model_type", config_class.model_type)
    if model_type != config_class.model_type:
        raise CheckpointError(f"{where}: a {model_type!r} config where a {config_class.model_type!r} one is needed")
    try:
        return config_class.from_dict(config)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{where}: not a valid {config_class.__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------
# SAM2


def load_meta_sam2(path: str | Path, config=None):
    """Meta's SAM2 / SAM2.1 ``.pt`` file -> ``transformers.Sam2Model`` (float32, eval mode, CPU).

    ``config``: a ``Sam2Config`` (or its dict) for architectures the shapes cannot tell; else the
    sidecar ``<path>.config.json``; else inferred for the official sizes.
    """
    from transformers import Sam2Config

    state = read_state_dict(path)
    check_sam2_file_name(path, state)
    if config is None:
        config = read_sidecar_config(path, Sam2Config)
    return sam2_from_state_dict(state, config, source=str(path))


def sam2_from_state_dict(state: dict[str, torch.Tensor], config=None, source: str = "state dict"):
    """A Meta SAM2 state dict (``checkpoint["model"]``) -> ``transformers.Sam2Model``; see :func:`load_meta_sam2`."""
    from transformers import Sam2Config, Sam2Model

    config = infer_sam2_config(state, source) if config is None else _as_config(config, Sam2Config, source)
    return _build(Sam2Model, config, convert_sam2_state_dict(state, source), source)


def load_meta_sam2_video(path: str | Path, config=None):
    """Meta's SAM2 / SAM2.1 ``.pt`` file -> ``transformers.Sam2VideoModel`` (float32, eval mode, CPU),
    every tensor of the file placed. ``config`` as for :func:`load_meta_sam2` (the image part's
    ``Sam2Config``), or a whole ``Sam2VideoConfig``."""
    from transformers import Sam2Config

    state = read_state_dict(path)
    check_sam2_file_name(path, state)
    if config is None:
        config = read_sidecar_config(path, Sam2Config)
    return sam2_video_from_state_dict(state, config, source=str(path))


def sam2_video_from_state_dict(state: dict[str, torch.Tensor], config=None, source: str = "state dict"):
    """A Meta SAM2 state dict -> ``transformers.Sam2VideoModel``; see :func:`load_meta_sam2_video`."""
    from transformers import Sam2Config, Sam2VideoConfig, Sam2VideoModel

    video_typed = isinstance(config, Sam2VideoConfig) or (
        isinstance(config, dict) and config.get("model_type") == Sam2VideoConfig.model_type
    )
    if video_typed:
        config = _as_config(config, Sam2VideoConfig, source)
    else:
        image = infer_sam2_config(state, source) if config is None else _as_config(config, Sam2Config, source)
        config = infer_sam2_video_config(state, image, source)
    weights = convert_sam2_state_dict(state, source, video=True)
    return _build(Sam2VideoModel, config, weights, source, computed=("memory_attention",))


def infer_sam2_video_config(state: dict[str, torch.Tensor], image_config, source: str = "state dict"):
    """The ``Sam2VideoConfig`` of a Meta SAM2 state dict: the image part from ``image_config`` (a
    ``Sam2Config``), the memory modules' sizes from the shapes, SAM2.1's two switches (temporal
    encoding of object pointers, no-object spatial embedding) from whether their weights exist.
    Meta's video modules have one attention head and a 16x mask downsampler in every official size."""
    from transformers import Sam2VideoConfig

    attention, encoder, fuser = "memory_attention.layers.0.", "memory_encoder.", "memory_encoder.fuser.layers.0."
    try:
        hidden = state[attention + "linear1.weight"].shape[1]
        image_size = int(image_config.prompt_encoder_config.image_size)
        downsampler = _count(state, _MASK_DOWNSAMPLER.pattern[1:])
        return Sam2VideoConfig(
            vision_config=image_config.vision_config.to_dict(),
            prompt_encoder_config=image_config.prompt_encoder_config.to_dict(),
            mask_decoder_config=image_config.mask_decoder_config.to_dict(),
            image_size=image_size,
            num_maskmem=state["maskmem_tpos_enc"].shape[0],
            enable_occlusion_spatial_embedding="no_obj_embed_spatial" in state,
            enable_temporal_pos_encoding_for_object_pointers="obj_ptr_tpos_proj.weight" in state,
            memory_attention_hidden_size=hidden,
            memory_attention_num_layers=_count(state, r"memory_attention\.layers\.(\d+)\."),
            memory_attention_downsample_rate=hidden // state[attention + "self_attn.q_proj.weight"].shape[0],
            memory_attention_feed_forward_hidden_size=state[attention + "linear1.weight"].shape[0],
            memory_attention_rope_feat_sizes=[image_size // 16] * 2,
            memory_encoder_hidden_size=state[encoder + "pix_feat_proj.weight"].shape[0],
            memory_encoder_output_channels=state[encoder + "out_proj.weight"].shape[0],
            mask_downsampler_embed_dim=state[
                f"{encoder}mask_downsampler.encoder.{3 * (downsampler // 2)}.weight"
            ].shape[0],
            mask_downsampler_kernel_size=state[encoder + "mask_downsampler.encoder.0.weight"].shape[-1],
            mask_downsampler_padding=state[encoder + "mask_downsampler.encoder.0.weight"].shape[-1] // 2,
            memory_fuser_num_layers=_count(state, r"memory_encoder\.fuser\.layers\.(\d+)\."),
            memory_fuser_embed_dim=state[fuser + "dwconv.weight"].shape[0],
            memory_fuser_intermediate_dim=state[fuser + "pwconv1.weight"].shape[0],
            memory_fuser_kernel_size=state[fuser + "dwconv.weight"].shape[-1],
            memory_fuser_padding=state[fuser + "dwconv.weight"].shape[-1] // 2,
        )
    except KeyError as error:
        raise CheckpointError(
            f"{source} has no video modules (no {error.args[0]!r}): an image-only SAM2 checkpoint cannot track "
            "objects through a video; use Meta's full sam2_hiera_*.pt / sam2.1_hiera_*.pt file"
        ) from None


def sam2_variant(state: dict[str, torch.Tensor]) -> str:
    """``"sam2.1"`` or ``"sam2"``: SAM2.1 checkpoints carry two extra video-only weights."""
    return "sam2.1" if any(key in state for key in _SAM21_MARKERS) else "sam2"


def convert_sam2_state_dict(
    state: dict[str, torch.Tensor], source: str = "state dict", video: bool = False
) -> dict[str, torch.Tensor]:
    """Meta SAM2 keys -> ``Sam2Model`` keys (video-only weights dropped) or, with ``video``,
    ``Sam2VideoModel`` keys (every weight kept); unknown keys refused."""
    depths = _mlp_depths(state)
    downsampler_final = 3 * (_count(state, _MASK_DOWNSAMPLER.pattern[1:]) // 2)  # index of the final conv
    points: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        is_video = key in _SAM2_VIDEO_KEYS or key.startswith(_SAM2_VIDEO_PREFIXES)
        if is_video and not video:
            continue
        if key == _PROMPT_PE:  # one Gaussian matrix serves both the prompt and the image positional encodings
            out["prompt_encoder.shared_embedding.positional_embedding"] = value
            out["shared_image_embedding.positional_embedding"] = value
            continue
        if match := _PROMPT_POINT.match(key):
            points[int(match.group(1))] = value
            continue
        if not is_video and not key.startswith(_SAM2_IMAGE_PREFIXES):
            unknown.append(key)
            continue
        if match := _MASK_DOWNSAMPLER.match(key):
            index, kind = int(match.group(1)), match.group(2)
            part = (
                "final_conv"
                if index == downsampler_final
                else f"layers.{index // 3}.{('conv', 'layer_norm')[index % 3]}"
            )
            out[f"memory_encoder.mask_downsampler.{part}.{kind}"] = value
            continue
        if match := _MLP_LAYER.match(key):
            prefix, index, kind = match.group(1), int(match.group(2)), match.group(3)
            layer = "proj_in" if index == 0 else "proj_out" if index == depths[prefix] - 1 else f"layers.{index - 1}"
            key = f"{prefix}.{layer}.{kind}"
        for pattern, replacement in (_SAM2_VIDEO_RENAMES if is_video else []) + _SAM2_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    if unknown:
        raise CheckpointError(f"{source}: keys that are not part of a SAM2 model: {_listing(unknown)}")
    if points:
        if sorted(points) != list(range(len(points))):
            raise CheckpointError(f"{source}: prompt point embeddings {sorted(points)} are not numbered 0..n-1")
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in range(len(points))])
    return out


def infer_sam2_config(state: dict[str, torch.Tensor], source: str = "state dict"):
    """A ``Sam2Config`` from a Meta SAM2 state dict of one of the official sizes (1024-px frame)."""
    try:
        return _infer_sam2_config(state, source)
    except KeyError as error:
        raise CheckpointError(f"{source} is not a complete Meta SAM2 checkpoint: no {error.args[0]!r}") from None


def _hiera_trunk(state: dict[str, torch.Tensor]) -> tuple[int, list[int], list[int]]:
    """(stem width, blocks per stage, width per stage) of a Meta SAM2 state dict's Hiera trunk."""
    trunk = "image_encoder.trunk."
    depth = _count(state, re.escape(trunk) + r"blocks\.(\d+)\.")
    stage_starts = [0] + [i for i in range(1, depth) if f"{trunk}blocks.{i}.proj.weight" in state]
    blocks = [end - start for start, end in zip(stage_starts, stage_starts[1:] + [depth])]
    dims = [state[f"{trunk}blocks.{start}.norm2.weight"].shape[0] for start in stage_starts]
    return state[trunk + "patch_embed.proj.weight"].shape[0], blocks, dims


def check_sam2_file_name(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """A file named as Meta names its checkpoints (``sam2.1_hiera_large.pt``...) must hold that version and size."""
    match = _SAM2_FILE_NAME.match(Path(path).name)
    if match is None:
        return
    try:
        embed_dim, blocks, _ = _hiera_trunk(state)
    except KeyError as error:
        raise CheckpointError(f"{path} is not a complete Meta SAM2 checkpoint: no {error.args[0]!r}") from None
    size = HIERA_SIZES.get((embed_dim, tuple(blocks)), {"name": f"of no official size (blocks per stage {blocks})"})
    named, held = match.groups(), (sam2_variant(state), size["name"])
    if named != held:
        raise CheckpointError(
            f"{path}: the file name says {named[0]} Hiera {named[1]}, but the weights are {held[0]} Hiera {held[1]}; "
            "the file is misnamed or was mixed up with another: download it again or give the right file"
        )


def _infer_sam2_config(state: dict[str, torch.Tensor], source: str):
    from transformers import Sam2Config

    trunk = "image_encoder.trunk."
    embed_dim, blocks, dims = _hiera_trunk(state)
    size = HIERA_SIZES.get((embed_dim, tuple(blocks)))
    if size is None:
        raise CheckpointError(
            f"{source}: a {sam2_variant(state)} Hiera trunk with stem width {embed_dim} and blocks per stage "
            f"{blocks} is none of Meta's official sizes ({', '.join(s['name'] for s in HIERA_SIZES.values())}); "
            "its heads, windows and global-attention blocks cannot be read from the weights: pass its "
            "transformers Sam2Config as config=, or write it as JSON next to the file (<file>.config.json)"
        )
    patch = state[trunk + "patch_embed.proj.weight"].shape[-1]
    mlp = state[f"{trunk}blocks.0.mlp.layers.0.weight"].shape[0]
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": embed_dim,
        "num_attention_heads": size["heads"],
        "image_size": [SAM2_IMAGE_SIZE, SAM2_IMAGE_SIZE],
        "patch_kernel_size": [patch, patch],
        "window_positional_embedding_background_size": list(state[trunk + "pos_embed"].shape[2:]),
        "num_query_pool_stages": len(blocks) - 1,
        "blocks_per_stage": blocks,
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": [size["heads"] * 2**i for i in range(len(blocks))],
        "window_size_per_stage": size["windows"],
        "global_attention_blocks": size["global"],
        "mlp_ratio": mlp / embed_dim,
    }
    neck = [
        state[f"image_encoder.neck.convs.{i}.conv.weight"]
        for i in range(_count(state, r"image_encoder\.neck\.convs\.(\d+)\."))
    ]
    hidden = state["sam_mask_decoder.iou_token.weight"].shape[1]
    vision = {
        "model_type": "sam2_vision_model",
        "backbone_config": backbone,
        "backbone_channel_list": [conv.shape[1] for conv in neck],
        "backbone_feature_sizes": [[SAM2_IMAGE_SIZE // s] * 2 for s in (4, 8, 16)],
        "fpn_hidden_size": neck[0].shape[0],
    }
    decoder = "sam_mask_decoder."
    prompt = {
        "hidden_size": hidden,
        "image_size": SAM2_IMAGE_SIZE,
        "mask_input_channels": state["sam_prompt_encoder.mask_downscaling.3.weight"].shape[0],
        "num_point_embeddings": _count(state, r"sam_prompt_encoder\.point_embeddings\.(\d+)\."),
    }
    mask_decoder = {
        "hidden_size": hidden,
        "mlp_dim": state[decoder + "transformer.layers.0.mlp.layers.0.weight"].shape[0],
        "num_hidden_layers": _count(state, re.escape(decoder) + r"transformer\.layers\.(\d+)\."),
        "num_attention_heads": SAM2_DECODER_HEADS,
        "attention_downsample_rate": hidden
        // state[decoder + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0],
        "num_multimask_outputs": state[decoder + "mask_tokens.weight"].shape[0] - 1,
        "iou_head_depth": _count(state, re.escape(decoder) + r"iou_prediction_head\.layers\.(\d+)\."),
        "iou_head_hidden_dim": state[decoder + "iou_prediction_head.layers.0.weight"].shape[0],
    }
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=mask_decoder)


# ---------------------------------------------------------------------------------------------
# DINOv2


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


# ---------------------------------------------------------------------------------------------
# Shared


def _build(model_class, config, weights: dict[str, torch.Tensor], source: str, computed: tuple[str, ...] = ()):
    """``model_class(config)`` holding exactly ``weights``: built without random init, every tensor checked.

    ``computed``: submodules built for real, whose non-persistent buffers (rotary frequencies,
    positions) come from the config, not from the checkpoint."""
    with torch.device("meta"):
        model = model_class(config)
    for name in computed:
        model.set_submodule(name, type(model.get_submodule(name))(config))
    expected = dict(model.state_dict())
    # non-persistent buffers that nothing computed would stay empty: refuse them too
    expected.update((key, value) for key, value in model.named_buffers() if value.is_meta)
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong = [
        f"{key} {tuple(weights[key].shape)} (model: {tuple(expected[key].shape)})"
        for key in expected
        if key in weights and weights[key].shape != expected[key].shape
    ]
    problems = [
        f"{label}: {_listing(keys)}"
        for label, keys in (("missing", missing), ("wrong shape", wrong), ("no place in the model", unexpected))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit {model_class.__name__} with this config ({'; '.join(problems)}). "
            "If the architecture differs from the official sizes, pass the matching transformers config"
        )
    weights = {key: value.float() if value.is_floating_point() else value for key, value in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def _mlp_depths(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of linear layers of each Meta ``MLP`` module, by module prefix."""
    depths: Counter[str] = Counter()
    for key in state:
        if (match := _MLP_LAYER.match(key)) and match.group(3) == "weight":
            depths[match.group(1)] += 1
    return depths


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many distinct indices the first group of ``pattern`` takes over the keys."""
    regex = re.compile("^" + pattern)
    return len({match.group(1) for key in state if (match := regex.match(key))})


def _listing(keys: list[str], shown: int = 8) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
