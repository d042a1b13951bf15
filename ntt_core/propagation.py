"""Following objects from frame to frame: the :class:`Propagator` protocol and SAM2's video memory
(``transformers.Sam2VideoModel`` and its inference session) behind it.

A propagator sees each frame once, as the tracker streams it (``add_frame``), and forgets it when
told (``drop_frame``); a track starts from a mask on one frame (``start``) and is followed forwards
or backwards one frame at a time (``propagate``) until it is released (``release``), which frees its
memory. Masks are SAM2 low-resolution logits ``[m, m]`` over the square input frame; an object is
present where its object score logit is > 0 (SAM2's occlusion head).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Protocol

import torch

from .checkpoints import CheckpointError, ModelKind, load_pretrained
from .models import SAM2, ModelSource, autocast, choose_device, choose_dtype, normalize, resolve_model

#: A transformers folder must hold the whole video model (``sam2_video``); Meta's files always do.
SAM2_VIDEO = ModelKind("SAM2 video", SAM2.option, ("sam2_video",))


class Propagator(Protocol):
    """What the tracker needs of a video model."""

    input_size: int  # side of the square input frame
    mask_size: int  # side of the low-resolution mask logits
    model_id: str

    def add_frame(self, index: int, frame: torch.Tensor) -> None:
        """Frame ``index`` as ``[3, S, S]`` RGB in [0, 1] (S = ``input_size``)."""

    def drop_frame(self, index: int) -> None:
        """Forget frame ``index`` (no track will visit it again)."""

    def start(self, track: int, index: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start ``track`` from ``mask`` ``[S, S]`` bool on frame ``index``; its logits ``[m, m]`` and score ``[]`` there."""

    def propagate(self, tracks: list[int], index: int, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Follow ``tracks`` onto frame ``index`` (from ``index - 1``, or ``index + 1`` with ``reverse``):
        logits ``[N, m, m]`` and object score logits ``[N]``."""

    def release(self, track: int) -> None:
        """End ``track`` and free everything kept for it."""


class Sam2VideoPropagator:
    """:class:`Propagator` over ``transformers.Sam2VideoModel``: one inference session per track, all
    sessions sharing one store of frames and one cache of image features, so the image encoder runs
    once per frame however many tracks there are (:class:`FrameFeatures` keeps ``feature_frames``
    frames; with ``key_frame_stride + 1``, as the CLI and the plugin ask, a backward pass over the
    frames since the last key frame encodes none of them again).

    Memory stays bounded: a session keeps its conditioning frame and only the outputs of the last
    ``max(num_maskmem, max_object_pointers_in_encoder)`` frames it visited, which is all SAM2's memory
    attention reads; a released track's session is dropped.
    """

    def __init__(
        self,
        model,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        feature_frames: int = 2,
    ) -> None:
        self.model = _decode_mask_prompts_once(model.to(device).eval())
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.input_size = int(model.config.image_size)
        self.mask_size = int(model.prompt_encoder.mask_input_size[0])
        config = model.config
        self.window = max(int(config.num_maskmem), int(config.max_object_pointers_in_encoder))
        self.frames: dict[int, torch.Tensor] = {}  # normalised [3, S, S] on the device
        self.cache = FrameFeatures(max(1, feature_frames))
        self.sessions: dict[int, object] = {}

    def add_frame(self, index: int, frame: torch.Tensor) -> None:
        self.frames[index] = normalize(frame[None].to(self.device, torch.float32))[0]

    def drop_frame(self, index: int) -> None:
        self.frames.pop(index, None)

    def _session(self):
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        session = Sam2VideoInferenceSession(
            video_height=self.input_size,
            video_width=self.input_size,
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=torch.float32,
        )
        session.processed_frames = self.frames  # shared: each frame stored once
        session.cache = self.cache  # shared: each frame encoded once
        return session

    @torch.inference_mode()
    def start(self, track: int, index: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if track in self.sessions:
            raise ValueError(f"track {track} is already being followed")
        session = self._session()
        session.add_mask_inputs(session.obj_id_to_idx(track), index, mask[None, None].float())
        session.obj_with_new_inputs = [track]
        self.sessions[track] = session
        with autocast(self.device, self.dtype):
            output = self.model(session, frame_idx=index)
        self._trim(session, index)
        return output.pred_masks[0, 0].float(), output.object_score_logits.reshape(-1)[0].float()

    @torch.inference_mode()
    def propagate(self, tracks: list[int], index: int, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        logits, scores = [], []
        for track in tracks:
            session = self.sessions[track]
            with autocast(self.device, self.dtype):
                output = self.model(session, frame_idx=index, reverse=reverse)
            logits.append(output.pred_masks[0, 0].float())
            scores.append(output.object_score_logits.reshape(-1)[0].float())
            self._trim(session, index)
        if not tracks:
            side = self.mask_size
            return torch.zeros(0, side, side, device=self.device), torch.zeros(0, device=self.device)
        return torch.stack(logits), torch.stack(scores)

    def _trim(self, session, index: int) -> None:
        """Drop what SAM2 will not read again: the outputs of frames further than the memory window
        from ``index``, and frame ``index``'s full-size mask logits ``[1, 1, S, S]`` (4 MB at S = 1024,
        kept by transformers in every stored output; only that frame's memory encoding, done, reads them)."""
        for outputs in session.output_dict_per_obj.values():
            for stored in (outputs["cond_frame_outputs"], outputs["non_cond_frame_outputs"]):
                stored.get(index, {}).pop("high_res_masks", None)
            frames = outputs["non_cond_frame_outputs"]
            for old in [f for f in frames if abs(f - index) > self.window]:
                del frames[old]
        for tracked in session.frames_tracked_per_obj.values():
            for old in [f for f in tracked if abs(f - index) > self.window]:
                del tracked[old]

    def release(self, track: int) -> None:
        self.sessions.pop(track, None)


class FrameFeatures:
    """The image features of the last ``frames`` frames SAM2's video model encoded, shared by all
    sessions of a video (the duck type of transformers' ``Sam2VideoInferenceCache``, which the
    session calls). Per frame: ``vision_feats``, three levels ``[h*w, 1, C]``. The position
    embeddings (``vision_pos_embeds``, same levels, C = 256) depend on the frame size only, which is
    the same for every frame, so one copy serves all frames: transformers' cache keeps one per frame,
    84 of the 100 MB a 1024-px frame takes (Hiera-T or Hiera-L alike)."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self._features: dict[int, list[torch.Tensor]] = {}
        self._positions: list[torch.Tensor] | None = None

    def cache_vision_features(self, frame_idx: int, features: dict) -> None:
        if frame_idx not in self._features and len(self._features) >= self.frames:
            del self._features[min(self._features)]  # the earliest frame, as transformers' cache does
        self._features[frame_idx] = features["vision_feats"]
        self._positions = features["vision_pos_embeds"]

    def get_vision_features(self, frame_idx: int) -> dict | None:
        if frame_idx not in self._features:
            return None
        return {"vision_feats": self._features[frame_idx], "vision_pos_embeds": self._positions}

    def clear_all(self) -> None:
        self._features.clear()
        self._positions = None


def _decode_mask_prompts_once(model):
    """``model`` made to decode one mask when it turns a mask prompt into the conditioning frame's
    object pointer, as Meta's SAM2 does (``_use_mask_as_output`` -> ``_forward_sam_heads`` with
    ``multimask_output=False``). transformers 5.23 decodes three there and takes the best token,
    which changes every later frame (measured: up to 0.6 in the first propagated frame's logits on a
    tiny SAM2.1). The instance's two methods are wrapped once, for good: a thread-local flag set only
    inside ``_use_mask_as_output`` (restored on error too) switches the decoder call it makes, so
    every other decoder call, and other threads sharing the model, are untouched."""
    if getattr(model, "_ntt_mask_prompts_decode_once", False):
        return model
    inside = threading.local()
    use_mask_as_output, single_frame_forward = model._use_mask_as_output, model._single_frame_forward

    def use_mask_as_output_once(*args, **kwargs):
        inside.active = True
        try:
            return use_mask_as_output(*args, **kwargs)
        finally:
            inside.active = False

    def single_frame_forward_as_meta(*args, **kwargs):
        if getattr(inside, "active", False):
            kwargs["multimask_output"] = False
        return single_frame_forward(*args, **kwargs)

    model._use_mask_as_output = use_mask_as_output_once
    model._single_frame_forward = single_frame_forward_as_meta
    model._ntt_mask_prompts_decode_once = True
    return model


def load_video_weights(source: ModelSource):
    """``transformers.Sam2VideoModel`` (float32, eval mode, CPU) from a SAM2 model source: Meta's
    ``.pt`` file through our mapping, or a ``sam2_video`` transformers folder; strict either way."""
    local = source.local_path()
    from transformers import Sam2VideoModel

    from .meta_video_checkpoints import load_meta_sam2_video

    if source.format == "transformers":
        return load_pretrained(Sam2VideoModel, local, SAM2_VIDEO)
    try:
        return load_meta_sam2_video(local)
    except CheckpointError as error:
        raise CheckpointError(f"{error} ({SAM2_VIDEO.name}: {SAM2_VIDEO.option})") from None


@functools.lru_cache(maxsize=4)
def _video_model(source: ModelSource, device: torch.device):
    return load_video_weights(source).to(device)


def load_propagator(
    source: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    feature_frames: int = 2,
) -> Sam2VideoPropagator:
    """A fresh :class:`Sam2VideoPropagator` (one per video) over SAM2's video model from a model
    choice (see :func:`~ntt_core.models.resolve_model`; None: the paper's Hiera-L, the image
    default's checkpoint). The model is loaded once per (source, device)."""
    device = choose_device(device)
    source = resolve_model(SAM2, source)
    return Sam2VideoPropagator(
        _video_model(source, device), source.model_id, device, choose_dtype(device, dtype), feature_frames
    )
