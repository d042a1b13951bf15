"""Meta's SAM2 / SAM2.1 checkpoints as ``transformers.Sam2VideoModel``: the same file as the image
default, every tensor placed (the image modules as :mod:`ntt_core.meta_checkpoints` maps them, plus
memory attention, memory encoder and object pointers), loaded strictly; the video modules' sizes
read off the checkpoint's shapes."""

from __future__ import annotations

from pathlib import Path

import torch

from .meta_checkpoints import (
    _MASK_DOWNSAMPLER,
    CheckpointError,
    _as_config,
    _build,
    _count,
    check_sam2_file_name,
    convert_sam2_state_dict,
    infer_sam2_config,
    read_sidecar_config,
    read_state_dict,
)


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
