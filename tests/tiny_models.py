"""Tiny random-weight SAM2 and DINOv2 written with ``save_pretrained``, loaded as users load models."""

from __future__ import annotations

from pathlib import Path

import torch

SAM2_INPUT = 128  # SAM2 frame side in the tests; masks come out at 32x32
DINOV2_INPUT = 56  # DINOv2 input side in the tests; a 4x4 patch grid


def tiny_sam2_config(image_size: int = SAM2_INPUT):
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    stages = [24, 48, 96, 192]
    backbone = Sam2HieraDetConfig(
        hidden_size=stages[0],
        image_size=[image_size, image_size],
        embed_dim_per_stage=stages,
        num_attention_heads_per_stage=[1, 1, 2, 2],
        blocks_per_stage=[1, 1, 2, 1],
        global_attention_blocks=[3],
        window_size_per_stage=[4, 2, 2, 2],
        window_positional_embedding_background_size=[2, 2],
    )
    side = image_size // 4
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=stages[::-1],
        backbone_feature_sizes=[[side, side], [side // 2, side // 2], [side // 4, side // 4]],
        fpn_hidden_size=32,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=16, mask_input_channels=16)
    decoder = Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def tiny_dinov2_config(image_size: int = DINOV2_INPUT):
    from transformers import Dinov2Config

    return Dinov2Config(
        image_size=image_size,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


def save_tiny_models(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny SAM2 and a tiny DINOv2 under ``folder``; returns their two directories."""
    from transformers import Dinov2Model, Sam2Model

    torch.manual_seed(seed)
    sam2_dir, dinov2_dir = Path(folder) / "sam2", Path(folder) / "dinov2"
    Sam2Model(tiny_sam2_config()).save_pretrained(sam2_dir)
    Dinov2Model(tiny_dinov2_config()).save_pretrained(dinov2_dir)
    return sam2_dir, dinov2_dir
