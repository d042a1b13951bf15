"""Meta's original checkpoint files load into the transformers models with nothing lost.

SAM2: a tiny random model built by Meta's own ``sam2`` package is saved as Meta saves it; the
image features, point- and box-prompt outputs of Meta's ``SAM2ImagePredictor`` are compared with
ours. DINOv2: a tiny timm ViT built like Meta's DINOv2 is written in Meta's key format; the
final-LayerNorm patch tokens are compared. Every weight is randomised first, so no zero bias,
unit LayerNorm or zero position embedding can hide a wrong mapping.
"""

from __future__ import annotations

import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import META_SAM2_CONFIGS as SAM2_CONFIGS
from tiny_models import build_tiny_meta_sam2, randomise
from tiny_models import tiny_meta_sam2_config as tiny_sam2_config

from ntt_core.meta_checkpoints import CheckpointError, load_meta_sam2, sam2_from_state_dict, sam2_variant
from ntt_core.meta_dinov2_checkpoints import dinov2_from_state_dict, load_meta_dinov2
from ntt_core.models import load_encoder, load_segmenter, normalize

TOLERANCE = 1e-4  # fp32, max abs difference
SAM2_FRAME = 128  # the tiny SAM2's square input; mask logits come out at 32x32
DINOV2_INPUT = 56  # the tiny DINOv2's checkpoint size: a 4x4 patch grid


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)).abs().max())


# ---------------------------------------------------------------------------------------------
# SAM2 against Meta's own code


@pytest.fixture(scope="module", params=sorted(SAM2_CONFIGS))
def meta_sam2(request, tmp_path_factory):
    """(variant, Meta's SAM2Base, its .pt file with a sidecar config) for a tiny SAM2 / SAM2.1."""
    pytest.importorskip("sam2")
    model = build_tiny_meta_sam2(request.param, seed=1 + sorted(SAM2_CONFIGS).index(request.param))
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    (path.parent / (path.name + ".config.json")).write_text(json.dumps(tiny_sam2_config().to_dict()))
    return request.param, model, path


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SAM2_FRAME, SAM2_FRAME, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def meta_predictor(meta_sam2, image):
    """Meta's image predictor with the image set (at the frame size, so its point coordinates are ours)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(meta_sam2[1])
    side = SAM2_FRAME // 4
    predictor._bb_feat_sizes = [(side, side), (side // 2, side // 2), (side // 4, side // 4)]  # hard-coded for 1024
    with torch.inference_mode():
        predictor.set_image(image)
    return predictor


@pytest.fixture(scope="module")
def ours(meta_sam2, image):
    """Our segmenter (via load_segmenter and the sidecar config) with Meta's no-memory embedding, and its features."""
    segmenter = load_segmenter(str(meta_sam2[2]), device="cpu", add_no_memory_embedding=True)
    return segmenter, segmenter.embed(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)


def test_sam2_checkpoint_is_metas_format_with_video_weights(meta_sam2):
    variant, model, path = meta_sam2
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert sam2_variant(state) == variant
    assert any(key.startswith("memory_attention.") for key in state) and "no_mem_pos_enc" in state


def test_sam2_image_features_match_meta(meta_sam2, meta_predictor, ours, image):
    segmenter, features = ours
    meta = meta_predictor._features
    assert meta_sam2[1].directly_add_no_mem_embed
    assert max_diff(features.embeddings, meta["image_embed"]) <= TOLERANCE
    for level, meta_level in zip(features.high_resolution, meta["high_res_feats"]):
        assert level.shape == meta_level.shape
        assert max_diff(level, meta_level) <= TOLERANCE

    # The paper's default leaves the no-memory embedding out: that and nothing else differs.
    plain = load_segmenter(str(meta_sam2[2]), device="cpu").embed(
        torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    )
    no_memory = meta_sam2[1].no_mem_embed.detach().reshape(1, -1, 1, 1)
    assert max_diff(plain.embeddings, meta["image_embed"]) > 10 * TOLERANCE
    assert max_diff(plain.embeddings + no_memory, meta["image_embed"]) <= TOLERANCE
    for level, meta_level in zip(plain.high_resolution, meta["high_res_feats"]):
        assert max_diff(level, meta_level) <= TOLERANCE


POINTS = np.array([[10.0, 20.0], [64.0, 64.0], [100.3, 5.7], [127.0, 127.0], [0.0, 90.5]], dtype=np.float32)
BOXES = np.array([[10, 20, 60, 90], [0, 0, 127, 127], [50.5, 30.2, 100.0, 110.0]], dtype=np.float32)


def test_sam2_point_prompts_match_meta(meta_predictor, ours):
    segmenter, features = ours
    # Meta: one prompt of one positive point each; its predictor adds the +0.5 pixel-centre shift itself.
    _, meta_iou, meta_logits = meta_predictor.predict(
        point_coords=POINTS[:, None], point_labels=np.ones((len(POINTS), 1)), multimask_output=True, return_logits=True
    )
    logits, iou = segmenter.segment_points(features, torch.from_numpy(POINTS)[None])
    assert logits.shape == (1, len(POINTS), 3, SAM2_FRAME // 4, SAM2_FRAME // 4) and iou.shape == (1, len(POINTS), 3)
    assert np.abs(meta_logits).max() < 32  # Meta's predictor clamps its low-res logits to +-32
    assert max_diff(logits[0], meta_logits) <= TOLERANCE
    assert max_diff(iou[0], meta_iou) <= TOLERANCE


def test_sam2_box_prompts_match_meta(meta_predictor, ours):
    segmenter, features = ours
    _, meta_iou, meta_logits = meta_predictor.predict(box=BOXES, multimask_output=False, return_logits=True)
    logits, iou = segmenter.segment_boxes(features, torch.from_numpy(BOXES)[None])
    assert logits.shape == (1, len(BOXES), SAM2_FRAME // 4, SAM2_FRAME // 4) and iou.shape == (1, len(BOXES))
    assert np.abs(meta_logits).max() < 32
    assert max_diff(logits[0], meta_logits[:, 0]) <= TOLERANCE
    assert max_diff(iou[0], meta_iou[:, 0]) <= TOLERANCE


OFFICIAL_SAM2 = ["sam2/sam2_hiera_t", "sam2/sam2_hiera_l", *(f"sam2.1/sam2.1_hiera_{s}" for s in ("t", "s", "b+", "l"))]


@pytest.mark.parametrize("name", OFFICIAL_SAM2)
def test_sam2_official_sizes_load_without_config(name, monkeypatch):
    """Meta's official configs, built with empty (meta-device) weights: the inferred transformers config
    takes every weight at its shape and agrees with Meta's heads, windows and global-attention blocks."""
    pytest.importorskip("sam2")
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = compose(config_name=f"configs/{name}.yaml")
    OmegaConf.resolve(config)
    # Hiera reads its drop-path rates with .item(); everything else is built without memory.
    monkeypatch.setattr(torch, "linspace", functools.partial(torch.linspace, device="cpu"))
    with torch.device("meta"):
        meta = instantiate(config.model, _recursive_=True)
    state = meta.state_dict()
    model = sam2_from_state_dict(state)  # raises unless every image-path weight has a place of the same shape

    assert sam2_variant(state) == name.split("/")[0]
    trunk, backbone = meta.image_encoder.trunk, model.config.vision_config.backbone_config
    assert list(backbone.global_attention_blocks) == list(trunk.global_att_blocks)
    assert list(backbone.window_size_per_stage) == list(trunk.window_spec)
    heads = [trunk.blocks[end].attn.num_heads for end in trunk.stage_ends]
    assert list(backbone.num_attention_heads_per_stage) == heads
    assert model.config.prompt_encoder_config.image_size == config.model.image_size == 1024
    assert (
        model.config.mask_decoder_config.num_attention_heads
        == meta.sam_mask_decoder.transformer.layers[0].self_attn.num_heads
    )


# ---------------------------------------------------------------------------------------------
# DINOv2 against timm (which matches Meta's DINOv2)


def tiny_timm_dinov2(image_size: int, swiglu: bool):
    """A DINOv2-style timm ViT/14 (layer scale, no registers); SwiGLU packed as in ViT-g."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from timm.layers import SwiGLUPacked

    # SwiGLU: Meta's hidden width is 2/3 of 4x, rounded up to 8 (88 here); timm packs both halves (176).
    mlp = {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "mlp_ratio": 176 / 32} if swiglu else {"mlp_ratio": 4}
    return timm_vit.VisionTransformer(
        img_size=image_size, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1.0, num_classes=0, **mlp
    ).eval()


def meta_dinov2_state(vit, swiglu: bool) -> dict[str, torch.Tensor]:
    """timm's DINOv2 weights under Meta's names (what timm's own checkpoint filter reads the other way)."""
    state = {
        (key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if swiglu else key): value.clone()
        for key, value in vit.state_dict().items()
    }
    state["mask_token"] = torch.randn(1, vit.embed_dim, generator=torch.Generator().manual_seed(5))
    return state


def tiny_dinov2_config(swiglu: bool):
    from transformers import Dinov2Config

    return Dinov2Config(
        image_size=DINOV2_INPUT,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        use_swiglu_ffn=swiglu,
    )


@pytest.fixture(scope="module", params=[False, True], ids=["mlp", "swiglu"])
def meta_dinov2(request, tmp_path_factory):
    """(timm reference, Meta-format .pth with a sidecar config, swiglu) for a tiny DINOv2."""
    swiglu = request.param
    torch.manual_seed(0)
    vit = tiny_timm_dinov2(DINOV2_INPUT, swiglu)
    randomise(vit, seed=2)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny_pretrain.pth"
    torch.save(meta_dinov2_state(vit, swiglu), path)
    (path.parent / (path.name + ".config.json")).write_text(json.dumps(tiny_dinov2_config(swiglu).to_dict()))
    return vit, path, swiglu


def timm_patch_tokens(vit, images: torch.Tensor) -> torch.Tensor:
    """Final-LayerNorm patch tokens ``[B, C, g, g]`` of timm's ViT, CLS dropped."""
    with torch.no_grad():
        tokens = vit.forward_features(normalize(images))[:, 1:]
    grid = images.shape[-1] // 14
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, grid, grid)


def test_dinov2_patch_tokens_match_timm(meta_dinov2):
    vit, path, _ = meta_dinov2
    encoder = load_encoder(str(path), device="cpu")
    assert encoder.input_size == DINOV2_INPUT and encoder.grid_size == 4
    images = torch.rand(2, 3, DINOV2_INPUT, DINOV2_INPUT, generator=torch.Generator().manual_seed(3))
    assert max_diff(encoder.encode(images), timm_patch_tokens(vit, images)) <= TOLERANCE


def resized_timm(vit, swiglu: bool, image_size: int, offset: float):
    """The same ViT at ``image_size``, its patch position embeddings resized bicubically beforehand;
    ``offset`` 0.1 is Meta's DINOv2 (scale factor (g + 0.1) / M), 0 a plain resize to the grid."""
    state = dict(vit.state_dict())
    position = state["pos_embed"]
    old, new, width = math.isqrt(position.shape[1] - 1), image_size // 14, position.shape[-1]
    grid = position[:, 1:].reshape(1, old, old, width).permute(0, 3, 1, 2)
    if offset:
        scale = (new + offset) / old
        grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    else:
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == (new, new)
    state["pos_embed"] = torch.cat([position[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, width)], dim=1)
    resized = tiny_timm_dinov2(image_size, swiglu)
    resized.load_state_dict(state)
    return resized


OTHER_SIZE = 70  # a 5x5 grid from the checkpoint's 4x4 position embeddings


def test_dinov2_other_input_size_is_a_plain_bicubic_resize(meta_dinov2):
    """At another input size transformers resizes the position embeddings to the grid (bicubic,
    no offset): with the same resize done up front, timm gives the same patch tokens."""
    vit, path, swiglu = meta_dinov2
    encoder = load_encoder(str(path), device="cpu", input_size=OTHER_SIZE)
    images = torch.rand(2, 3, OTHER_SIZE, OTHER_SIZE, generator=torch.Generator().manual_seed(4))
    reference = timm_patch_tokens(resized_timm(vit, swiglu, OTHER_SIZE, offset=0.0), images)
    assert max_diff(encoder.encode(images), reference) <= TOLERANCE


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="transformers resizes DINOv2 position embeddings to the new grid without Meta's +0.1 offset in the "
    "scale factor; measured ~1e-2 max abs difference in the tiny model's patch tokens. Only inputs whose grid "
    "differs from the checkpoint's (not the 518-px paper setting) are affected.",
)
def test_dinov2_other_input_size_matches_metas_offset_interpolation(meta_dinov2):
    vit, path, swiglu = meta_dinov2
    encoder = load_encoder(str(path), device="cpu", input_size=OTHER_SIZE)
    images = torch.rand(2, 3, OTHER_SIZE, OTHER_SIZE, generator=torch.Generator().manual_seed(4))
    reference = timm_patch_tokens(resized_timm(vit, swiglu, OTHER_SIZE, offset=0.1), images)
    assert max_diff(encoder.encode(images), reference) <= TOLERANCE


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
def test_dinov2_official_sizes_load_without_config(size):
    """Meta's four DINOv2 sizes (timm's definitions, empty meta-device weights, Meta's names)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        vit = timm.create_model(f"vit_{size}_patch14_dinov2", pretrained=False, num_classes=0)
    swiglu = size == "giant"
    config = dinov2_from_state_dict(meta_dinov2_state(vit, swiglu)).config
    assert config.hidden_size == vit.embed_dim
    assert config.num_attention_heads == vit.blocks[0].attn.num_heads
    assert config.num_hidden_layers == len(vit.blocks)
    assert config.use_swiglu_ffn == swiglu
    assert config.image_size == vit.patch_embed.img_size[0] == 518


# ---------------------------------------------------------------------------------------------
# Bad input


def _leave_marker(path: str) -> None:
    with open(path, "w") as handle:
        handle.write("code ran")


class _Payload:
    """Pickles as a call of ``_leave_marker``: unpickling it would run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


class _PlainObject:
    """An ordinary custom class instance (pickled by reference to this class)."""

    def __init__(self) -> None:
        self.value = 1


@pytest.mark.bad_input
@pytest.mark.parametrize("loader", [load_meta_sam2, load_meta_dinov2])
def test_pickled_objects_are_refused_without_running_code(loader, tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"weight": torch.zeros(2), "payload": _Payload(str(marker))}}, evil)
    plain = tmp_path / "plain.pth"
    torch.save({"weight": torch.zeros(2), "object": _PlainObject()}, plain)
    for path in (evil, plain):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint of tensors"):
            loader(path)
    assert not marker.exists()


@pytest.mark.bad_input
def test_truncated_and_foreign_files_are_refused(meta_dinov2, tmp_path):
    data = meta_dinov2[1].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for path in (truncated, text):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load_meta_dinov2(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_meta_sam2(tmp_path / "missing.pt")
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match="holds list, not a state dict"):
        load_meta_sam2(listing)


@pytest.mark.bad_input
def test_sam2_weights_that_do_not_fit_are_refused(meta_sam2):
    state = torch.load(meta_sam2[2], map_location="cpu", weights_only=True)["model"]
    config = tiny_sam2_config()
    missing = {k: v for k, v in state.items() if k != "sam_mask_decoder.conv_s0.weight"}
    with pytest.raises(CheckpointError, match=r"missing: mask_decoder\.conv_s0\.weight"):
        sam2_from_state_dict(missing, config)
    wrong = dict(state, **{"image_encoder.neck.convs.0.conv.weight": torch.zeros(32, 64, 1, 1)})
    with pytest.raises(CheckpointError, match=r"wrong shape: vision_encoder\.neck\.convs\.0\.weight \(32, 64, 1, 1\)"):
        sam2_from_state_dict(wrong, config)
    foreign = dict(state, **{"text_encoder.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not part of a SAM2 model: text_encoder.weight"):
        sam2_from_state_dict(foreign, config)


@pytest.mark.bad_input
def test_sam2_of_unknown_architecture_needs_a_config(meta_sam2, tmp_path):
    copy = tmp_path / "custom_sam2.pt"
    shutil.copy(meta_sam2[2], copy)  # no sidecar next to the copy
    with pytest.raises(CheckpointError, match=r"none of Meta's official sizes .* pass its transformers Sam2Config"):
        load_meta_sam2(copy)
    assert load_meta_sam2(copy, config=tiny_sam2_config()).config.vision_config.fpn_hidden_size == 32
    (tmp_path / "custom_sam2.pt.config.json").write_text(json.dumps(tiny_dinov2_config(False).to_dict()))
    with pytest.raises(CheckpointError, match="a 'dinov2' config where a 'sam2' one is needed"):
        load_meta_sam2(copy)


@pytest.mark.bad_input
def test_dinov2_of_unknown_architecture_needs_a_config(meta_dinov2, tmp_path):
    copy = tmp_path / "custom_dinov2.pth"
    shutil.copy(meta_dinov2[1], copy)
    with pytest.raises(CheckpointError, match="DINOv2 width 32 is none of Meta's"):
        load_meta_dinov2(copy)
    assert load_meta_dinov2(copy, config=tiny_dinov2_config(meta_dinov2[2])).config.hidden_size == 32
    with pytest.raises(CheckpointError, match="not a complete Meta SAM2 checkpoint"):
        load_meta_sam2(copy)


@pytest.mark.bad_input
def test_dinov2_with_registers_is_refused(meta_dinov2):
    state = torch.load(meta_dinov2[1], map_location="cpu", weights_only=True)
    state["register_tokens"] = torch.zeros(1, 4, 32)
    with pytest.raises(CheckpointError, match="register tokens"):
        dinov2_from_state_dict(state, tiny_dinov2_config(meta_dinov2[2]))
