"""``ntt track``: follow the bank's instances through a folder of videos (video files or frame
folders) into one tracks json per video. A finished video's json is written whole (through a
temporary file), so an interrupted run resumes at the first video without one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import (
    EXIT_ALL_FAILED,
    EXIT_HELP,
    EXIT_OK,
    EXIT_SOME_SKIPPED,
    PAPER,
    CliError,
    add_model_options,
    count_option,
    fraction,
    load_device,
    load_encoder,
    settings_from,
)
from .options import load_segmenter as _segmenter
from .output import check_outputs, replace_json


def add_parser(commands, formatter) -> None:
    track = commands.add_parser(
        "track",
        help="follow every instance of the bank's classes through a folder of videos",
        description="The image pipeline on key frames (the first and every k-th), SAM2's video memory between "
        "them. Writes <out>/<video>.json per video: its tracks (id, class = highest summed key-frame score, "
        "score = mean key-frame score) and per-frame annotations (COCO RLE, track_id). Videos are video files "
        "(ffmpeg) or sub-folders of frame images. Videos with a json are skipped unless --overwrite.",
        epilog=EXIT_HELP,
        formatter_class=formatter,
    )
    track.add_argument("--memory", required=True, type=Path, help="memory bank folder (from build-memory)")
    track.add_argument("--videos", required=True, type=Path, help="folder of video files and/or frame folders")
    track.add_argument("--out", required=True, type=Path, help="folder for the tracks json files")
    track.add_argument("--overwrite", action="store_true", help="redo videos whose json exists")
    track.add_argument("--key-frame-stride", type=count_option("key_frame_stride"), default=10, help="k")
    track.add_argument("--match-iou", type=fraction, default=0.5, help="mask IoU continuing a track")
    track.add_argument(
        "--lost-frames", type=count_option("lost_frames"), default=10, help="frames before a lost track ends"
    )
    add_model_options(track)
    for option, kind, text in (
        ("--points-per-side", count_option("points_per_side"), "point-prompt grid side"),
        ("--sam-iou-threshold", fraction, "drop candidates whose SAM2 predicted IoU is at or below this"),
        ("--max-detections", count_option("max_detections"), "instances kept per key frame"),
        ("--score-threshold", fraction, "drop instances scoring below this"),
    ):
        track.add_argument(option, type=kind, default=getattr(PAPER, option[2:].replace("-", "_")), help=text)
    track.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..memory_bank import MemoryBank
    from ..predictor import Predictor
    from ..propagation import load_propagator
    from ..tracking import TrackingSettings, VideoError, VideoTracker
    from ..video_files import list_videos, read_frames

    tracking = TrackingSettings(args.key_frame_stride, args.match_iou, args.lost_frames)
    videos = list_videos(args.videos)
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} is a file: give a folder")
    outputs = {video: args.out / f"{video.stem if video.is_file() else video.name}.json" for video in videos}
    todo = [video for video in videos if args.overwrite or not outputs[video].exists()]
    check_outputs([("a tracks file", outputs[video]) for video in todo], True)
    if len(todo) < len(videos):
        print(f"ntt: {len(videos) - len(todo)} of {len(videos)} videos already done: skipped", file=sys.stderr)
    bank = MemoryBank.load(args.memory)
    settings = settings_from(args)
    device = load_device(args.device)
    segmenter = _segmenter(args, device, settings)
    encoder = load_encoder(args, device, settings.encoder_size or bank.encoder_input_size)
    predictor = Predictor(segmenter, encoder, bank, settings)
    category_ids = {name: i + 1 for i, name in enumerate(bank.classes)}
    failed = []
    for video in tqdm(todo, desc="videos", unit="video"):
        propagator = load_propagator(args.sam2, device, args.dtype, feature_frames=tracking.key_frame_stride + 1)
        tracker = VideoTracker(predictor, propagator, tracking)
        try:
            data = tracks_json(video, tracker, read_frames(video), category_ids)
        except VideoError as error:
            failed.append(str(error))
            tqdm.write(f"ntt: skipped: {error}", file=sys.stderr)
            continue
        replace_json(data, outputs[video])
    if failed and len(failed) == len(todo):
        return EXIT_ALL_FAILED
    return EXIT_SOME_SKIPPED if failed else EXIT_OK


def tracks_json(video: Path, tracker, frames, category_ids: dict[str, int]) -> dict:
    """One video's tracks and per-frame annotations (COCO RLE, ``frame`` 0-based, ``track_id``)."""
    from ..coco import instances_to_coco_results

    annotations, size, count = [], None, 0
    for frame in tracker.run(frames):  # each frame encoded at once: only RLE is kept
        size, count = frame.image_size, count + 1
        results = instances_to_coco_results(
            frame.instances(tracker.tracks, tracker.class_names), frame.index, category_ids
        )
        for result, track_id in zip(results, frame.track_ids.tolist()):
            result["frame"] = result.pop("image_id")
            annotations.append({**result, "track_id": int(track_id)})
    tracks = tracker.tracks
    for annotation in annotations:  # the tracks' final class and score (see ntt_core.tracking)
        track = tracks[annotation["track_id"]]
        annotation.update(category_id=category_ids[tracker.class_names[track.label]], score=track.confidence)
    return {
        "video": video.name,
        "frames": count,
        "size": list(size),
        "categories": [{"id": i, "name": name} for name, i in category_ids.items()],
        "tracks": [
            {
                "id": t.id,
                "category_id": category_ids[tracker.class_names[t.label]],
                "score": t.confidence,
                "first_frame": t.first_frame,
                "last_frame": t.last_frame,
                "key_frames": len(t.key_scores),
            }
            for t in tracks.values()
        ],
        "annotations": annotations,
    }
