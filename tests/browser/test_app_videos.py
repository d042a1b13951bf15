"""A video dataset labelled by the Segment by reference operator, in the App: the frame field with the
tracks' masks is listed among the frame labels of the sidebar with its detections, and the video
player draws its masks over the first frame (screenshots in artifacts/browser/)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import fiftyone as fo
import fiftyone.operators as foo
import pytest
import torch
from app_pages import ARTIFACTS, PLUGIN, expect, pixels
from video_scenes import CLASSES, FRAMES, OBJECTS, tiny_video_config, write_video

from ntt_core.fiftyone.bank_runs import save_memory_bank
from ntt_core.memory_bank import build_memory_bank
from ntt_core.settings import Settings
from ntt_core.synthetic import make_dataset, make_video, reference_images

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="video tests need ffmpeg"),
]


def test_a_tracked_video_shows_its_frame_field_in_the_app(app, tiny_models, tmp_path):
    from transformers import Sam2VideoModel

    from ntt_core.models import load_encoder

    torch.manual_seed(0)
    folder = tmp_path / "sam2_video"
    Sam2VideoModel(tiny_video_config()).save_pretrained(folder)
    video = make_video(OBJECTS, FRAMES, size=(96, 128), seed=3)
    dataset = fo.Dataset("browser-video")
    try:
        dataset.add_sample(fo.Sample(filepath=write_video(video.frames, tmp_path / "video.webm", web=True)))
        encoder = load_encoder(str(tiny_models[1]), device="cpu")
        references = make_dataset(3, seed=100, size=(96, 128), classes=CLASSES)
        settings = Settings(points_per_side=4)
        bank = build_memory_bank(reference_images(references), encoder, settings=settings, classes=CLASSES)
        save_memory_bank(dataset, "tiny", bank)
        models = dict(sam2=str(folder), dinov2=str(tiny_models[1]), device="cpu", points_per_side=4)
        segment = foo.get_operator(f"{PLUGIN}/segment_by_reference")
        with ThreadPoolExecutor(1) as worker:  # Playwright's event loop runs in this thread
            report = worker.submit(segment, dataset, "tiny", "sam", key_frame_stride=5, lost_frames=2, **models)
            report = report.result()["report"]
        assert (report["videos"], report["failed"]) == (1, [])
        masks = [d.mask for frames in dataset.values("frames.sam.detections") for f in frames for d in f or []]
        assert masks and all(mask is not None and mask.any() for mask in masks)

        app.open(dataset)
        expect(app.sidebar_checkbox("frames.sam")).to_be_visible()
        modal = app.open_sample(0)
        checkbox = modal.get_by_test_id("sidebar").get_by_test_id("checkbox-frames.sam")
        expect(checkbox).to_be_visible()
        expect(modal.get_by_test_id("sidebar")).to_contain_text(str(len(masks)))  # the field's detections
        app.page.wait_for_timeout(500)
        app.screenshot("video-modal", modal)
        player = modal.get_by_test_id("looker").last.bounding_box()
        shots = [ARTIFACTS / f"{app.name}-video-player{suffix}.png" for suffix in ("", "-hidden")]
        app.page.screenshot(path=shots[0], clip=player)
        checkbox.click()  # the masks hidden: what the player drew for them goes
        app.page.wait_for_timeout(500)
        app.page.screenshot(path=shots[1], clip=player)
        shown, hidden = (pixels(shot).astype(int) for shot in shots)
        changed = (abs(shown - hidden).max(axis=2) > 40).mean()
        assert changed > 0.05, changed  # the first frame's masks were drawn over the video
    finally:
        dataset.delete()
