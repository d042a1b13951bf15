"""The two models of the method behind small protocols: SAM2 proposes masks, DINOv2 describes them.

The model policy lives here: :func:`resolve_model` says what a choice of model means (None: the
paper's, a short name, a hub id, a folder, a Meta file), :func:`load_segmenter` / :func:`load_encoder`
load it strictly (:mod:`.checkpoints`, :mod:`.meta_checkpoints`) into ``transformers`` models and
cache the wrappers per (source, device, dtype). Tests and the offline demo plug other objects that
follow the same protocols.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .checkpoints import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelKind,
    ModelNotFoundError,
    check_hub_file,
    hub_file,
    hub_folder,
    load_pretrained,
)
from .input_rules import dtype_name
from .meta_checkpoints import CheckpointError
from .prompt_decoder import decode_best, decode_multimask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Short names of the SAM2 checkpoints: Meta's own files in Meta's hub repos, named as ``sam2``'s
#: ``build_sam.py`` names them (``HF_MODEL_ID_TO_FILENAMES``), read by :mod:`.meta_checkpoints`.
SAM2_MODELS = {
    "sam2-tiny": ("facebook/sam2-hiera-tiny", "sam2_hiera_tiny.pt"),
    "sam2-small": ("facebook/sam2-hiera-small", "sam2_hiera_small.pt"),
    "sam2-base-plus": ("facebook/sam2-hiera-base-plus", "sam2_hiera_base_plus.pt"),
    "sam2-large": ("facebook/sam2-hiera-large", "sam2_hiera_large.pt"),
    "sam2.1-tiny": ("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt"),
    "sam2.1-small": ("facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt"),
    "sam2.1-base-plus": ("facebook/sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus.pt"),
    "sam2.1-large": ("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"),
}
#: Short names of the DINOv2 models: transformers repos (``config.json`` + ``model.safetensors``).
DINOV2_MODELS = {
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-giant": "facebook/dinov2-giant",
}
#: The paper's pair: SAM2 Hiera-L (not 2.1) and DINOv2 ViT-L/14 without registers.
DEFAULT_SAM2 = "sam2-large"
DEFAULT_DINOV2 = "dinov2-large"

SAM2 = ModelKind("SAM2", "--sam2 / sam2=", ("sam2", "sam2_video"))
DINOV2 = ModelKind("DINOv2", "--dinov2 / dinov2=", ("dinov2",))


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


def choose_device(device: str | torch.device | None = "auto") -> torch.device:
    """The given device; "auto" (or None): CUDA, else Apple MPS, else CPU. A CUDA device always has
    its index ("cuda" is the current one), so that "cuda" and "cuda:0" share one cached model."""
    if device is not None and str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device '{device}' was requested but CUDA is not available")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise RuntimeError(f"device '{device}' was requested but there are {torch.cuda.device_count()} GPU(s)")
            return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """Compute dtype: "auto" (or None) is float32 on every device (the paper's); bfloat16 only when asked."""
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype_name(dtype))


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
        fingerprint: str | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.add_no_memory_embedding = add_no_memory_embedding
        self.input_size = int(model.prompt_encoder.input_image_size)
        self.mask_size = int(model.prompt_encoder.mask_input_size[0])
        self.fingerprint = fingerprint or self.fingerprint_of(model)
        with torch.no_grad():
            self._positional = model.get_image_wide_positional_embeddings()  # [1, C, h, w]

    @staticmethod
    def fingerprint_of(model) -> str:
        return weights_fingerprint(model.mask_decoder.iou_token.weight)

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
        fingerprint: str | None = None,
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
        self.fingerprint = fingerprint or self.fingerprint_of(model)

    @staticmethod
    def fingerprint_of(model) -> str:
        return weights_fingerprint(model.embeddings.patch_embeddings.projection.weight)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            tokens = self.model(pixel_values=normalize(images.to(self.device, torch.float32))).last_hidden_state
        patches = tokens[:, self._skip :].float()  # [B, g*g, C]
        if patches.shape[1] != self.grid_size**2:
            raise RuntimeError(f"expected {self.grid_size**2} patch tokens from the encoder, got {patches.shape[1]}")
        return patches.transpose(1, 2).reshape(images.shape[0], -1, self.grid_size, self.grid_size)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: Meta's checkpoint file (``meta``) or a transformers folder
    (``transformers``), on disk (``path``) or in a hub repo (``repo_id``; ``filename`` for Meta's)."""

    kind: ModelKind
    model_id: str  # recorded in memory banks; resolves to this source again
    format: str  # "meta" or "transformers"
    path: str | None = None
    repo_id: str | None = None
    filename: str | None = None

    def hub_files(self) -> list[str]:
        """The files of ``repo_id`` that loading needs (none for a source on disk)."""
        if self.repo_id is None:
            return []
        return [self.filename] if self.filename else [CONFIG_NAME, WEIGHTS_NAME]

    def check(self) -> None:
        """Raise :class:`ModelNotFoundError` unless the weights are on disk, cached, or can be downloaded now."""
        for filename in self.hub_files():
            check_hub_file(self.repo_id, filename, self.kind)

    def local_path(self) -> Path:
        """The checkpoint file or folder on disk: from the hub cache, downloaded if missing."""
        if self.path is not None:
            return Path(self.path)
        if self.filename is not None:
            return hub_file(self.repo_id, self.filename, self.kind)
        return hub_folder(self.repo_id, self.kind)


def resolve_model(kind: ModelKind, choice: str | os.PathLike | None = None) -> ModelSource:
    """The model policy: what a user's choice of model means.

    None or "" is the paper's model; then, in order: a short name (``SAM2_MODELS`` / ``DINOV2_MODELS``),
    one of Meta's SAM2 repo ids (its checkpoint file), an existing path (a Meta ``.pt`` / ``.pth`` file
    or a transformers folder), a hub id of a transformers repo.
    """
    names = SAM2_MODELS if kind is SAM2 else DINOV2_MODELS
    choice = str(choice or (DEFAULT_SAM2 if kind is SAM2 else DEFAULT_DINOV2))
    entry = names.get(choice) or next((e for e in names.values() if isinstance(e, tuple) and e[0] == choice), None)
    if isinstance(entry, tuple):
        return ModelSource(kind, entry[0], "meta", repo_id=entry[0], filename=entry[1])
    if entry is not None:
        return ModelSource(kind, entry, "transformers", repo_id=entry)
    path = Path(choice).expanduser()
    if path.is_dir():
        return ModelSource(kind, choice, "transformers", path=str(path))
    if path.is_file():
        if path.suffix not in (".pt", ".pth"):
            raise CheckpointError(
                f"{kind.name} model '{choice}' is a {path.suffix or 'suffix-less'} file, neither Meta's .pt / .pth "
                f"checkpoint nor a transformers folder; check {kind.option}"
            )
        return ModelSource(kind, choice, "meta", path=str(path))
    if _is_repo_id(choice):
        return ModelSource(kind, choice, "transformers", repo_id=choice)
    raise ModelNotFoundError(
        f"{kind.name} model '{choice}' could not be loaded: no such file or folder, and neither a short name "
        f"({', '.join(names)}) nor a hub id; check {kind.option}"
    )


def _is_repo_id(text: str) -> bool:
    """Whether ``text`` can name a hub repo (``name`` or ``owner/name``), rather than a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def load_weights(source: ModelSource):
    """The model of ``source`` (float32, eval mode, CPU), every weight loaded from the checkpoint."""
    local = source.local_path()  # before importing transformers: a missing model fails at once
    from transformers import Dinov2Model, Sam2Model

    from .meta_checkpoints import load_meta_sam2
    from .meta_dinov2_checkpoints import load_meta_dinov2

    if source.format == "transformers":
        return load_pretrained(Sam2Model if source.kind is SAM2 else Dinov2Model, local, source.kind)
    try:
        return (load_meta_sam2 if source.kind is SAM2 else load_meta_dinov2)(local)
    except CheckpointError as error:
        raise CheckpointError(f"{error} ({source.kind.name}: {source.kind.option})") from None


@functools.lru_cache(maxsize=16)
def _model_on(source: ModelSource, device: torch.device):
    """(model, weights fingerprint) of ``source`` on ``device``: one module per (source, device), so
    that no wrapper ever moves a module that another one uses. The fingerprint is taken on the CPU.
    Holds as many as the two wrapper caches below, so a cached wrapper's module is never loaded twice."""
    model = load_weights(source)
    fingerprint = (Sam2Segmenter if source.kind is SAM2 else Dinov2Encoder).fingerprint_of(model)
    return model.to(device), fingerprint


@functools.lru_cache(maxsize=8)
def _segmenter(source: ModelSource, device: torch.device, dtype: torch.dtype, add_no_memory_embedding: bool):
    model, fingerprint = _model_on(source, device)
    return Sam2Segmenter(model, source.model_id, device, dtype, add_no_memory_embedding, fingerprint=fingerprint)


@functools.lru_cache(maxsize=8)
def _encoder(source: ModelSource, device: torch.device, dtype: torch.dtype, input_size: int | None):
    model, fingerprint = _model_on(source, device)
    return Dinov2Encoder(model, source.model_id, device, dtype, input_size, fingerprint=fingerprint)


def load_segmenter(
    source: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    add_no_memory_embedding: bool = False,
) -> Sam2Segmenter:
    """SAM2 from a model choice (see :func:`resolve_model`; None: the paper's Hiera-L) on ``device``
    ("auto": CUDA, MPS, CPU) in ``dtype`` ("auto": float32). Cached per (source, device, dtype)."""
    device = choose_device(device)
    return _segmenter(resolve_model(SAM2, source), device, choose_dtype(device, dtype), add_no_memory_embedding)


def load_encoder(
    source: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    input_size: int | None = None,
) -> Dinov2Encoder:
    """DINOv2 from a model choice (see :func:`resolve_model`; None: the paper's ViT-L/14) on ``device``
    in ``dtype``, at ``input_size`` (None: the model's). Cached per (source, device, dtype, input size)."""
    device = choose_device(device)
    return _encoder(resolve_model(DINOV2, source), device, choose_dtype(device, dtype), input_size)


def load_models(
    sam2: str | os.PathLike | None = None,
    dinov2: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    encoder_size: int | None = None,
) -> tuple[Sam2Segmenter, Dinov2Encoder]:
    """(segmenter, encoder): :func:`load_segmenter` and :func:`load_encoder` (None: the paper's models)."""
    return load_segmenter(sam2, device, dtype), load_encoder(dinov2, device, dtype, encoder_size)


def segmenter_source(sam2: str | os.PathLike | None = None) -> str:
    """The id a SAM2 loaded from ``sam2`` has (short names resolved; None: the paper's), without loading it."""
    return resolve_model(SAM2, sam2).model_id


def weights_fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of some weights: the same model loaded from anywhere gets the same one."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
