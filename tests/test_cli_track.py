"""``ntt track`` on a folder holding a video file, a frame folder and a broken file, with a tiny random
SAM2 video model saved as users' are: one tracks json per video, resumed per video, bad input exits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from video_scenes import CLASSES, OBJECTS, tiny_video_config, write_video

from ntt_core.cli import EXIT_ALL_FAILED, EXIT_BAD_INPUT, EXIT_SOME_SKIPPED, main
from ntt_core.memory_bank import build_memory_bank
from ntt_core.models import load_encoder
from ntt_core.settings import Settings
from ntt_core.synthetic import make_dataset, make_video, reference_images

FRAMES = 8


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from transformers import Sam2VideoModel

    folder = tmp_path_factory.mktemp("track")
    torch.manual_seed(0)
    Sam2VideoModel(tiny_video_config()).save_pretrained(folder / "sam2_video")
    encoder = load_encoder(str(tiny_models[1]), device="cpu")
    references = reference_images(make_dataset(3, seed=100, size=(96, 128), classes=CLASSES))
    build_memory_bank(references, encoder, settings=Settings(points_per_side=4), classes=CLASSES).save(folder / "bank")
    videos = folder / "videos"
    (videos / "walk").mkdir(parents=True)
    video = make_video(OBJECTS, FRAMES, size=(96, 128), seed=3)
    for t, frame in enumerate(video.frames):
        Image.fromarray(frame).save(videos / "walk" / f"{t:04d}.png")
    if shutil.which("ffmpeg"):
        write_video(video.frames, videos / "clip.mkv")
    (videos / "broken.mp4").write_bytes(b"not a video")
    return folder, tiny_models


def args(folder, tiny_models, *extra) -> list[str]:
    return [
        "track", "--memory", str(folder / "bank"), "--videos", str(folder / "videos"), "--out", str(folder / "out"),
        "--sam2", str(folder / "sam2_video"), "--dinov2", str(tiny_models[1]), "--device", "cpu",
        "--points-per-side", "4", "--key-frame-stride", "3", "--lost-frames", "2", *extra,
    ]  # fmt: skip


def test_track_writes_one_json_per_video_and_resumes(setup, capsys):
    folder, tiny_models = setup
    assert main(args(folder, tiny_models)) == EXIT_SOME_SKIPPED
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "cannot be read" in err
    written = sorted(p.name for p in (folder / "out").iterdir())
    assert written == (["clip.json", "walk.json"] if shutil.which("ffmpeg") else ["walk.json"])
    data = json.loads((folder / "out" / "walk.json").read_text())
    assert (data["frames"], data["size"]) == (FRAMES, [96, 128])
    tracks = {t["id"]: t for t in data["tracks"]}
    for annotation in data["annotations"]:
        track = tracks[annotation["track_id"]]
        assert 0 <= annotation["frame"] < FRAMES
        assert (annotation["category_id"], annotation["score"]) == (track["category_id"], track["score"])
        assert set(annotation["segmentation"]) == {"size", "counts"}
    if shutil.which("ffmpeg"):  # the same frames, losslessly encoded: the same tracks
        assert json.loads((folder / "out" / "clip.json").read_text())["annotations"] == data["annotations"]

    before = (folder / "out" / "walk.json").stat().st_mtime_ns
    assert main(args(folder, tiny_models)) == EXIT_ALL_FAILED  # only the broken video was left, and it fails again
    assert "already done: skipped" in capsys.readouterr().err
    assert (folder / "out" / "walk.json").stat().st_mtime_ns == before


@pytest.mark.bad_input
def test_track_bad_input_exits_with_one_line(setup, capsys, tmp_path):
    folder, tiny_models = setup
    with pytest.raises(SystemExit):
        main(args(folder, tiny_models, "--key-frame-stride", "0"))
    assert "key_frame_stride" in capsys.readouterr().err
    mixed = tmp_path / "mixed" / "sizes"  # a frame folder whose frames change size
    mixed.mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(mixed / "0.png")
    Image.new("RGB", (48, 64)).save(mixed / "1.png")
    code = main(
        [
            *args(folder, tiny_models)[:4],
            str(mixed.parent),
            "--out",
            str(tmp_path / "m"),
            *args(folder, tiny_models)[7:],
        ]
    )
    assert code == EXIT_ALL_FAILED and "frame sizes vary inside one video" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main([*args(folder, tiny_models)[:4], str(empty), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == EXIT_BAD_INPUT and "no videos" in capsys.readouterr().err
