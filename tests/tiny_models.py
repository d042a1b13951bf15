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


def tampered(source: Path, target: Path, change) -> Path:
    """A copy of the saved model folder ``source`` whose model.safetensors went through ``change``
    (a function of the {name: tensor} dict)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    save_file(
        change(load_file(Path(source) / "model.safetensors")),
        Path(target) / "model.safetensors",
        metadata={"format": "pt"},
    )
    return Path(target)


def renamed_layer(tensors: dict) -> dict:
    """The tensors with those of DINOv2's layer 1 renamed (they load nowhere; the layer is missing)."""
    return {key.replace("encoder.layer.1.", "encoder.layers.1."): value for key, value in tensors.items()}


def save_tiny_models(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny SAM2 and a tiny DINOv2 under ``folder``; returns their two directories."""
    from transformers import Dinov2Model, Sam2Model

    torch.manual_seed(seed)
    sam2_dir, dinov2_dir = Path(folder) / "sam2", Path(folder) / "dinov2"
    Sam2Model(tiny_sam2_config()).save_pretrained(sam2_dir)
    Dinov2Model(tiny_dinov2_config()).save_pretrained(dinov2_dir)
    return sam2_dir, dinov2_dir


# Meta's tiny Hiera-T config shrunk further: trunk widths 16/32/64/128 (heads 1/2/4/8), 1+1+2+1 blocks,
# decoder and memory width ``width``; the video modules shrunk too (their memory is 64 channels wide, as
# in every official size: transformers fixes it), so the image loader has to drop them and the video
# loader place them. Meta's memory concatenates object pointers split into 64-channel pieces: a video
# model needs a width that is a multiple of 64.
def meta_tiny_overrides(width: int = 32) -> list[str]:
    return [
        f"++model.image_size={SAM2_INPUT}",
        "++model.image_encoder.trunk.embed_dim=16",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.trunk.window_spec=[4,2,2,2]",
        "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[2,2]",
        f"++model.image_encoder.neck.d_model={width}",
        "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
        f"++model.image_encoder.neck.position_encoding.num_pos_feats={width}",
        f"++model.memory_attention.d_model={width}",
        "++model.memory_attention.num_layers=1",
        f"++model.memory_attention.layer.d_model={width}",
        f"++model.memory_attention.layer.dim_feedforward={2 * width}",
        f"++model.memory_attention.layer.self_attention.embedding_dim={width}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{SAM2_INPUT // 16},{SAM2_INPUT // 16}]",
        f"++model.memory_attention.layer.cross_attention.embedding_dim={width}",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{SAM2_INPUT // 16},{SAM2_INPUT // 16}]",
        "++model.memory_attention.layer.cross_attention.kv_in_dim=64",
        f"++model.memory_encoder.in_dim={width}",
        "++model.memory_encoder.out_dim=64",
        "++model.memory_encoder.position_encoding.num_pos_feats=64",
        f"++model.memory_encoder.mask_downsampler.embed_dim={width}",
        f"++model.memory_encoder.fuser.layer.dim={width}",
        "++model.memory_encoder.fuser.num_layers=1",
    ]


META_TINY_OVERRIDES = meta_tiny_overrides()
META_SAM2_CONFIGS = {"sam2": "configs/sam2/sam2_hiera_t.yaml", "sam2.1": "configs/sam2.1/sam2.1_hiera_t.yaml"}


def tiny_meta_sam2_config(width: int = 32):
    """The same tiny architecture as ``meta_tiny_overrides(width)``, as a transformers config (Meta's decoder
    keeps its fixed 8 heads, MLP 2048 and IoU head 256)."""
    from transformers import Sam2Config

    side = SAM2_INPUT // 4
    return Sam2Config(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 16,
                "num_attention_heads": 1,
                "image_size": [SAM2_INPUT, SAM2_INPUT],
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 2, 4, 8],
                "window_size_per_stage": [4, 2, 2, 2],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [2, 2],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[side, side], [side // 2, side // 2], [side // 4, side // 4]],
            "fpn_hidden_size": width,
        },
        prompt_encoder_config={"hidden_size": width, "image_size": SAM2_INPUT},
        mask_decoder_config={"hidden_size": width, "iou_head_hidden_dim": 256},
    )


def build_tiny_meta_sam2(variant: str, seed: int, width: int = 32, video: bool = False):
    """Meta's own SAM2Base (``variant`` "sam2" or "sam2.1") at the tiny size of ``meta_tiny_overrides(width)``,
    every weight randomised; its ``state_dict()`` is what Meta's ``.pt`` files hold under "model".
    With ``video``, Meta's SAM2VideoPredictor (the same modules, with its video inference methods)."""
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    torch.manual_seed(0)
    build = build_sam2_video_predictor if video else build_sam2
    model = build(META_SAM2_CONFIGS[variant], None, device="cpu", hydra_overrides_extra=meta_tiny_overrides(width))
    randomise(model, seed=seed)
    return model


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add noise to every weight, so zero biases, unit LayerNorms and zero position embeddings differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
