"""The two models of the method behind small protocols: SAM2 proposes masks, DINOv2 describes them.

Real models come from ``transformers`` (a Hugging Face hub id, a local ``save_pretrained``
directory, or one of Meta's original checkpoint files); tests and the offline demo plug other
objects that follow the same protocols.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .prompt_decoder import decode_best, decode_multimask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Short names users can give instead of hub ids. Every id holds transformers safetensors.
SAM2_MODELS = {
    "sam2-tiny": "facebook/sam2-hiera-tiny-hf",
    "sam2-small": "facebook/sam2-hiera-small-hf",
    "sam2-base-plus": "facebook/sam2-hiera-base-plus-hf",
    "sam2-large": "facebook/sam2-hiera-large-hf",
    "sam2.1-tiny": "facebook/sam2.1-hiera-tiny",
    "sam2.1-small": "facebook/sam2.1-hiera-small",
    "sam2.1-base-plus": "facebook/sam2.1-hiera-base-plus",
    "sam2.1-large": "facebook/sam2.1-hiera-large",
}
DINOV2_MODELS = {
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-giant": "facebook/dinov2-giant",
}
#: The paper's pair: SAM2 Hiera-L and DINOv2 ViT-L/14 without registers.
DEFAULT_SAM2 = SAM2_MODELS["sam2-large"]
DEFAULT_DINOV2 = DINOV2_MODELS["dinov2-large"]


class ModelNotFoundError(RuntimeError):
    """A model that could not be found locally nor downloaded."""


@runtime_checkable
class FeatureEncoder(Protocol):
    """Dense patch features of square images (DINOv2 in the method)."""

    model_id: str
    fingerprint: str  # identifies the weights, wherever they were loaded from
    input_size: int  # side of the square input, pixels (518)
    grid_size: int  # patches per side (37)
    device: torch.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, input_size, input_size]`` RGB in [0, 1] -> ``[B, C, grid_size, grid_size]`` float32."""
        ...


@runtime_checkable
class PromptSegmenter(Protocol):
    """A promptable segmenter (SAM2 in the method) working in a square frame of ``input_size``."""

    model_id: str
    fingerprint: str  # identifies the weights, wherever they were loaded from
    input_size: int  # side of the square frame prompts live in, pixels (1024)
    mask_size: int  # side of the low-resolution mask logits (256)
    device: torch.device

    def embed(self, images: torch.Tensor) -> object:
        """``[B, 3, input_size, input_size]`` RGB in [0, 1] -> opaque per-image features."""
        ...

    def segment_points(self, features: object, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One positive point per prompt, ``[B, P, 2]`` (x, y) in frame pixels ->
        mask logits ``[B, P, 3, m, m]`` and predicted IoUs ``[B, P, 3]`` (float32)."""
        ...

    def segment_best_points(
        self, features: object, points: torch.Tensor, iou_threshold: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`segment_points` followed by the method's best-of-three choice and IoU filter
        (:func:`ntt_core.proposals.best_of_three`): per image, the chosen output's logits ``[n, m, m]``
        and predicted IoU ``[n]`` (float32) of the n prompts whose best IoU exceeds ``iou_threshold``,
        in prompt order. A segmenter may skip the work of the outputs it does not return."""
        ...

    def segment_boxes(self, features: object, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box prompts ``[B, N, 4]`` (x0, y0, x1, y1) in frame pixels -> one mask each:
        logits ``[B, N, m, m]`` and predicted IoUs ``[B, N]`` (float32)."""
        ...


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA, then Apple MPS, then CPU."""
    if device is not None and str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Compute dtype: bf16 on CUDA, fp32 elsewhere, unless given."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(names)}")
        dtype = names[dtype]
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for a reduced compute dtype; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of ``[B, 3, H, W]`` RGB in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass
class Sam2Features:
    """SAM2 image features of a batch: the decoder's image embedding and its two skip levels."""

    embeddings: torch.Tensor  # [B, C, h, w], h = input_size / 16
    high_resolution: tuple[torch.Tensor, torch.Tensor]  # [B, C/8, 4h, 4w], [B, C/4, 2h, 2w]


class Sam2Segmenter:
    """SAM2 (``transformers.Sam2Model``) as a :class:`PromptSegmenter`.

    Image features are computed here rather than by ``Sam2Model.forward`` so that the learned
    "no memory" embedding is added only on request (the paper's path does not add it).
    """

    def __init__(
        self,
        model,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        add_no_memory_embedding: bool = False,
    ) -> None:
        self.model = model.to(device).eval()
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.add_no_memory_embedding = add_no_memory_embedding
        self.input_size = int(model.prompt_encoder.input_image_size)
        self.mask_size = int(model.prompt_encoder.mask_input_size[0])
        self.fingerprint = weights_fingerprint(model.mask_decoder.iou_token.weight)
        with torch.no_grad():
            self._positional = model.get_image_wide_positional_embeddings()  # [1, C, h, w]

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> Sam2Features:
        batch = images.shape[0]
        with autocast(self.device, self.dtype):
            output = self.model.get_image_features(normalize(images.to(self.device, torch.float32)), return_dict=True)
        levels = list(output.fpn_hidden_states)  # each [h*w, B, C]
        if self.add_no_memory_embedding:
            levels[-1] = levels[-1] + self.model.no_memory_embedding
        maps = [
            level.permute(1, 2, 0).reshape(batch, -1, *size).float()
            for level, size in zip(levels, self.model.backbone_feature_sizes)
        ]
        return Sam2Features(embeddings=maps[-1], high_resolution=(maps[0], maps[1]))

    def _point_prompts(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, P, 2]`` positive points -> SAM2's sparse ``[B, P, 2, C]`` and dense prompt embeddings."""
        points = points.to(self.device, torch.float32)[:, :, None, :]  # [B, P, 1, 2]
        labels = torch.ones(points.shape[:3], dtype=torch.int32, device=self.device)
        return self.model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)

    @torch.inference_mode()
    def segment_points(self, features: Sam2Features, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.dtype):
            logits, iou = decode_multimask(
                self.model.mask_decoder,
                features.embeddings,
                self._positional,
                features.high_resolution,
                *self._point_prompts(points),
            )
        return logits.float(), iou.float()

    @torch.inference_mode()
    def segment_best_points(
        self, features: Sam2Features, points: torch.Tensor, iou_threshold: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Only the chosen output of the passing prompts is upscaled (:func:`decode_best`)."""
        with autocast(self.device, self.dtype):
            chosen = decode_best(
                self.model.mask_decoder,
                features.embeddings,
                self._positional,
                features.high_resolution,
                *self._point_prompts(points),
                iou_threshold,
            )
        return [(logits.float(), iou.float()) for logits, iou in chosen]

    @torch.inference_mode()
    def segment_boxes(self, features: Sam2Features, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = features.embeddings.shape[0]
        with autocast(self.device, self.dtype):
            sparse, dense = self.model.prompt_encoder(
                input_points=None, input_labels=None, input_boxes=boxes.to(self.device, torch.float32), input_masks=None
            )
            logits, iou, _, _ = self.model.mask_decoder(  # a few prompts: transformers' own decoder
                image_embeddings=features.embeddings,
                image_positional_embeddings=self._positional.expand(batch, -1, -1, -1),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                high_resolution_features=list(features.high_resolution),
            )
        return logits[:, :, 0].float(), iou[:, :, 0].float()


class Dinov2Encoder:
    """DINOv2 (``transformers.Dinov2Model``) as a :class:`FeatureEncoder`: final-LayerNorm patch
    tokens, CLS (and any register tokens) dropped."""

    def __init__(
        self,
        model,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        input_size: int | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        patch = model.config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        size = model.config.image_size if input_size is None else input_size
        self.input_size = int(size if isinstance(size, int) else size[0])
        if self.input_size % self.patch_size:
            raise ValueError(
                f"encoder input size {self.input_size} is not a multiple of the patch size {self.patch_size}"
            )
        self.grid_size = self.input_size // self.patch_size
        self._skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.fingerprint = weights_fingerprint(model.embeddings.patch_embeddings.projection.weight)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            tokens = self.model(pixel_values=normalize(images.to(self.device, torch.float32))).last_hidden_state
        patches = tokens[:, self._skip :].float()  # [B, g*g, C]
        if patches.shape[1] != self.grid_size**2:
            raise RuntimeError(f"expected {self.grid_size**2} patch tokens from the encoder, got {patches.shape[1]}")
        return patches.transpose(1, 2).reshape(images.shape[0], -1, self.grid_size, self.grid_size)


def resolve_source(source: str, aliases: dict[str, str]) -> str:
    """A short name -> hub id; paths and hub ids pass through."""
    return aliases.get(source, source)


def _from_pretrained(model_class, source: str, kind: str, option: str):
    try:
        return model_class.from_pretrained(source, use_safetensors=True)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = (
            "a local directory"
            if Path(source).exists()
            else "the Hugging Face hub" + (" (HF_HUB_OFFLINE is set)" if offline else "")
        )
        reason = " ".join(str(error).split())
        raise ModelNotFoundError(
            f"{kind} model {source!r} could not be loaded from {where} ({reason}). "
            f"Point {option} at a local copy (a directory written by save_pretrained, with model.safetensors "
            f"and config.json, or Meta's original checkpoint file), or download it first with network access."
        ) from None


@functools.lru_cache(maxsize=4)
def _load_sam2_model(source: str):
    from transformers import Sam2Model

    path = Path(source)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        from .meta_checkpoints import load_meta_sam2

        return load_meta_sam2(path)
    return _from_pretrained(Sam2Model, source, "SAM2", "--sam2 / sam2=")


@functools.lru_cache(maxsize=4)
def _load_dinov2_model(source: str):
    from transformers import Dinov2Model

    path = Path(source)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        from .meta_checkpoints import load_meta_dinov2

        return load_meta_dinov2(path)
    return _from_pretrained(Dinov2Model, source, "DINOv2", "--dinov2 / dinov2=")


def load_segmenter(
    source: str = DEFAULT_SAM2,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    add_no_memory_embedding: bool = False,
) -> Sam2Segmenter:
    """SAM2 from a short name (see ``SAM2_MODELS``), hub id, local directory or Meta ``.pt`` file.
    Loaded weights are cached per process."""
    device = choose_device(device)
    source = resolve_source(str(source), SAM2_MODELS)
    model = _load_sam2_model(source)
    return Sam2Segmenter(model, source, device, choose_dtype(device, dtype), add_no_memory_embedding)


def load_encoder(
    source: str = DEFAULT_DINOV2,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    input_size: int | None = None,
) -> Dinov2Encoder:
    """DINOv2 from a short name (see ``DINOV2_MODELS``), hub id, local directory or Meta ``.pth`` file.
    Loaded weights are cached per process."""
    device = choose_device(device)
    source = resolve_source(str(source), DINOV2_MODELS)
    model = _load_dinov2_model(source)
    return Dinov2Encoder(model, source, device, choose_dtype(device, dtype), input_size)


def weights_fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of some weights: the same model loaded from anywhere gets the same one."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
