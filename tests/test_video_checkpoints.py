"""Meta's SAM2 checkpoints drive transformers' video model through our mapping exactly as Meta's own
video predictor runs them; a transformers ``sam2_video`` folder loads through the same loader.

A tiny random SAM2 / SAM2.1 is built by Meta's ``sam2`` package, saved as Meta saves it, loaded by
:func:`ntt_core.propagation.load_propagator` and run against Meta's ``SAM2VideoPredictor`` on the
same frames: a mask prompt followed forwards, and another followed backwards from a later frame.
Both sides keep the memory features in bfloat16 (as Meta does), hence the tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import META_SAM2_CONFIGS, build_tiny_meta_sam2, randomise, tiny_meta_sam2_config
from video_scenes import SIDE, WIDTH, tiny_video_config

from ntt_core.checkpoints import CheckpointError
from ntt_core.frames import square_frame
from ntt_core.meta_checkpoints import convert_sam2_state_dict
from ntt_core.meta_video_checkpoints import sam2_video_from_state_dict
from ntt_core.propagation import load_propagator

FRAMES = 6
TOLERANCE = 2e-2  # bfloat16 memory features on both sides


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Six JPEG frames (Meta's predictor reads a folder of JPEGs) of a disc moving right; their decoded pixels."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    frames = []
    for t in range(FRAMES):
        image = rng.integers(90, 110, (SIDE, SIDE, 3)).astype(np.uint8)
        image[(yy - 64) ** 2 + (xx - 40 - 6 * t) ** 2 < 20**2] = (200, 40, 40)
        Image.fromarray(image).save(folder / f"{t:05d}.jpg", quality=95)
        frames.append(np.asarray(Image.open(folder / f"{t:05d}.jpg").convert("RGB")))
    return folder, frames


@pytest.fixture(scope="module", params=sorted(META_SAM2_CONFIGS))
def meta_video(request, tmp_path_factory):
    """(Meta's SAM2VideoPredictor with random weights, its checkpoint file with a sidecar image config)."""
    pytest.importorskip("sam2")
    predictor = build_tiny_meta_sam2(request.param, seed=7, width=WIDTH, video=True)
    randomise(predictor, seed=8)  # the video modules too
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}_video_tiny.pt"
    torch.save({"model": predictor.state_dict()}, path)
    (path.parent / (path.name + ".config.json")).write_text(json.dumps(tiny_meta_sam2_config(WIDTH).to_dict()))
    return predictor, path


def disc_mask(t: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    return (yy - 64) ** 2 + (xx - 40 - 6 * t) ** 2 < 20**2


def run_meta(predictor, folder, start: int, reverse: bool):
    """Meta's low-res logits [32, 32] and object score of each frame, prompted with the disc's mask at ``start``."""
    with torch.inference_mode():
        state = predictor.init_state(str(folder))
        predictor.add_new_mask(state, frame_idx=start, obj_id=1, mask=disc_mask(start))
        for _ in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
            pass
    outputs = state["output_dict_per_obj"][0]
    found = {**outputs["non_cond_frame_outputs"], **outputs["cond_frame_outputs"]}
    return {t: (out["pred_masks"][0, 0], out["object_score_logits"].flatten()[0]) for t, out in found.items()}


def run_ours(path, frames, start: int, reverse: bool):
    propagator = load_propagator(str(path), device="cpu", feature_frames=FRAMES)
    for t, frame in enumerate(frames):
        propagator.add_frame(t, square_frame(frame, propagator.input_size)[0])
    logits, score = propagator.start(1, start, torch.from_numpy(disc_mask(start)))
    found = {start: (logits, score)}
    order = range(start - 1, -1, -1) if reverse else range(start + 1, FRAMES)
    for t in order:
        logits, scores = propagator.propagate([1], t, reverse=reverse)
        found[t] = (logits[0], scores[0])
    return found


@pytest.mark.parametrize("start, reverse", [(0, False), (FRAMES - 1, True)], ids=["forward", "backward"])
def test_propagation_matches_metas_video_predictor(meta_video, video_folder, start, reverse):
    predictor, path = meta_video
    folder, frames = video_folder
    meta = run_meta(predictor, folder, start, reverse)
    ours = run_ours(path, frames, start, reverse)
    assert sorted(meta) == sorted(ours) == list(range(FRAMES))
    for t in range(FRAMES):
        (meta_logits, meta_score), (logits, score) = meta[t], ours[t]
        assert logits.shape == meta_logits.shape == (SIDE // 4, SIDE // 4)
        assert float((logits - meta_logits.float()).abs().max()) <= TOLERANCE * max(1.0, float(meta_logits.abs().max()))
        assert abs(float(score) - float(meta_score)) <= TOLERANCE * max(1.0, abs(float(meta_score)))


def test_every_video_weight_is_placed_and_an_image_only_file_is_refused(meta_video):
    predictor, path = meta_video
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model = sam2_video_from_state_dict(state, tiny_meta_sam2_config(WIDTH))
    converted = convert_sam2_state_dict(state, video=True)
    assert len(converted) == len(model.state_dict())  # every model tensor comes from the file
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted[key].float()), key

    image_only = {key: value for key, value in state.items() if key.startswith(("image_encoder.", "sam_"))}
    with pytest.raises(CheckpointError, match="no video modules"):
        sam2_video_from_state_dict(image_only, tiny_meta_sam2_config(WIDTH))
    stray = {**state, "memory_attention.layers.9.linear1.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="no place in the model"):
        sam2_video_from_state_dict(stray, tiny_meta_sam2_config(WIDTH))


class Spy:
    """Records what the tracker asks of a real propagator (and passes every call through)."""

    def __init__(self, inner):
        self.inner, self.reverse_steps, self.releases = inner, 0, []
        self.input_size, self.mask_size, self.model_id = inner.input_size, inner.mask_size, inner.model_id

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propagate(self, tracks, index, reverse=False):
        self.reverse_steps += bool(reverse)
        return self.inner.propagate(tracks, index, reverse)

    def release(self, track):
        self.releases.append((track, len(self.inner.sessions)))
        self.inner.release(track)


def test_tiny_transformers_video_model_tracks_through_the_real_session(tiny_models, tmp_path):
    """save_pretrained -> load_propagator (the users' loader) -> tracker: forward and backward
    propagation and the release of ended tracks through transformers' inference sessions."""
    from transformers import Sam2VideoModel

    from ntt_core.memory_bank import build_memory_bank
    from ntt_core.models import load_encoder, load_segmenter
    from ntt_core.predictor import Predictor
    from ntt_core.settings import Settings
    from ntt_core.synthetic import make_dataset, reference_images
    from ntt_core.tracking import TrackingSettings, VideoTracker

    torch.manual_seed(0)
    folder = tmp_path / "sam2_video"
    Sam2VideoModel(tiny_video_config()).save_pretrained(folder)
    segmenter, encoder = load_segmenter(str(folder), device="cpu"), load_encoder(str(tiny_models[1]), device="cpu")
    settings = Settings(points_per_side=4)
    references = make_dataset(1, seed=1, size=(64, 80), classes=("disc", "square"))
    bank = build_memory_bank(reference_images(references), encoder, settings=settings, classes=("disc", "square"))
    spy = Spy(load_propagator(str(folder), device="cpu", feature_frames=3))
    tracker = VideoTracker(Predictor(segmenter, encoder, bank, settings), spy, TrackingSettings(2, 0.5, 1))
    video = make_dataset(5, seed=2, size=(64, 80), classes=("disc", "square"))
    frames = list(tracker.run(scene.image for scene in video))

    assert [f.index for f in frames] == list(range(5))
    late = [t for t in tracker.tracks.values() if t.key_scores and t.first_frame > 0]
    assert tracker.tracks and spy.reverse_steps > 0 and late  # tracks started at later key frames went back
    assert sorted(track for track, _ in spy.releases) == sorted(tracker.tracks)  # every track released once
    assert not spy.inner.sessions and not spy.inner.frames  # no state left after the video
    for frame in frames:
        assert set(frame.track_ids.tolist()) <= set(tracker.tracks)


def test_frame_features_and_session_outputs_keep_only_what_sam2_reads_again(video_folder):
    """The shared feature cache holds ``feature_frames`` frames, the earliest dropped first, and one
    set of position embeddings for all of them (they depend on the frame size only); a session keeps
    each frame's memory but not its full-size mask logits."""
    from transformers import Sam2VideoModel

    from ntt_core.propagation import Sam2VideoPropagator

    _, frames = video_folder
    torch.manual_seed(0)
    propagator = Sam2VideoPropagator(Sam2VideoModel(tiny_video_config()), "tiny", torch.device("cpu"), feature_frames=3)
    for t, frame in enumerate(frames):
        propagator.add_frame(t, square_frame(frame, propagator.input_size)[0])
    propagator.start(1, 0, torch.from_numpy(disc_mask(0)))
    for t in range(1, FRAMES):
        propagator.propagate([1], t)
    cache = propagator.cache
    assert [t for t in range(FRAMES) if cache.get_vision_features(t)] == [FRAMES - 3, FRAMES - 2, FRAMES - 1]
    kept = [cache.get_vision_features(t) for t in range(FRAMES - 3, FRAMES)]
    assert all(a is b for a, b in zip(kept[0]["vision_pos_embeds"], kept[2]["vision_pos_embeds"]))
    assert not torch.equal(kept[0]["vision_feats"][-1], kept[2]["vision_feats"][-1])  # features stay per frame
    stored = propagator.sessions[1].output_dict_per_obj[0]
    assert sorted(stored["non_cond_frame_outputs"]) == list(range(1, FRAMES)) and 0 in stored["cond_frame_outputs"]
    assert all("high_res_masks" not in out for kind in stored.values() for out in kind.values())  # none kept
    assert all("maskmem_features" in out for kind in stored.values() for out in kind.values())  # memories kept


def test_mask_prompts_decode_one_mask_only_in_their_own_call_and_thread():
    """Only the decoder call made inside ``_use_mask_as_output`` is switched to one mask: not a call
    after it failed, nor one another thread makes meanwhile."""
    import threading
    from types import SimpleNamespace

    from ntt_core.propagation import _decode_mask_prompts_once

    seen, inside, other_done = [], threading.Event(), threading.Event()
    model = SimpleNamespace()
    model._single_frame_forward = lambda **kwargs: seen.append(kwargs.get("multimask_output", True))

    def use_mask_as_output(fail: bool):
        model._single_frame_forward()
        inside.set()
        other_done.wait(5)
        if fail:
            raise RuntimeError("mask prompt failed")

    model._use_mask_as_output = use_mask_as_output
    assert _decode_mask_prompts_once(_decode_mask_prompts_once(model)) is model  # wrapped once
    other = threading.Thread(target=lambda: (inside.wait(5), model._single_frame_forward(), other_done.set()))
    other.start()
    with pytest.raises(RuntimeError, match="mask prompt failed"):
        model._use_mask_as_output(True)
    other.join()
    model._single_frame_forward()
    assert seen == [False, True, True]  # the mask prompt's, the other thread's, the one after the error
