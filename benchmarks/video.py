"""Video: the cost of a key frame (the image pipeline, plus propagating the live tracks onto it)
against a propagated frame (SAM2's video memory only), and the frames per second this gives.

Models are built from ``transformers`` configs of the official sizes with random weights (cost does
not depend on weight values). With random weights the number of detections is arbitrary, so the
tracks are fixed instead: ``--tracks N`` objects are started from fixed masks on the first frame
and followed through every frame; the image pipeline's cost is measured on the same frames, side
by side, so the shared CPU load cancels out in the ratio.

The device-independent cost is counted too (``torch.utils.flop_counter``, as benchmarks/speed.py
counts the image side: matrix products, convolutions and attention): the image pipeline's FLOPs on
one frame per stage, and a propagated frame's on the frame after the timed ones, split into the
first track (the video model's image encoder, once per frame, plus that track's memory attention,
memory encoder and decoder) and each further track. ``--flop-points`` counts the image pipeline
with a smaller grid and scales its prompt-decoding stage by the number of prompts (decoding is
per prompt, plus a small per-image part that the scaling over-counts: about 1% from 4x4 to 8x8,
less from 8x8 to 32x32; the test checks the scaling against a direct count).

    python benchmarks/video.py --json                               # CPU defaults: SAM2-tiny, DINOv2-S, 8x8
    python benchmarks/video.py --arch sam2-large --dinov2-arch dinov2-large --points 32 --json  # the paper's
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import cost_account, dinov2_config, flop_counter, sam2_config, synthetic_bank

from ntt_core.frames import square_frame
from ntt_core.models import Dinov2Encoder, Sam2Segmenter, choose_device
from ntt_core.predictor import Predictor
from ntt_core.propagation import Sam2VideoPropagator
from ntt_core.settings import Settings
from ntt_core.synthetic import MovingShape, make_video


def video_config(arch: str):
    """A ``Sam2VideoConfig`` of the official size ``arch``: its image part, Meta's memory modules."""
    from transformers import Sam2VideoConfig

    image = sam2_config(arch)
    return Sam2VideoConfig(
        vision_config=image.vision_config.to_dict(),
        prompt_encoder_config=image.prompt_encoder_config.to_dict(),
        mask_decoder_config=image.mask_decoder_config.to_dict(),
    )


def timed(function, repeats: int) -> float:
    """Median seconds of ``function()`` over ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def pipeline_flops(predictor: Predictor, frame, points: int) -> dict:
    """The image pipeline's FLOPs on ``frame`` (``[H, W, 3]`` uint8) per stage, counted with a
    ``points`` x ``points`` grid and the prompt-decoding stage scaled to the predictor's grid."""
    from PIL import Image

    counted = Predictor(predictor.segmenter, predictor.encoder, predictor.bank, Settings(points))
    with tempfile.TemporaryDirectory(prefix="ntt-video-") as folder:
        path = Path(folder) / "frame.png"
        Image.fromarray(frame).save(path)
        stages = cost_account(counted, path, None)["flops_per_image"]
    scale = predictor.points.shape[0] / counted.points.shape[0]
    return {**stages, "prompt_decoding": round(stages["prompt_decoding"] * scale)}


def propagation_flops(propagator: Sam2VideoPropagator, tracks: list[int], index: int) -> tuple[int, int | None]:
    """FLOPs of propagating ``tracks`` onto frame ``index`` (added, not yet encoded): ``(first track,
    each further track)``; the first includes the image encoder, which runs once per frame. The
    further tracks' figure is their mean (None for a single track)."""
    with flop_counter() as first:
        propagator.propagate(tracks[:1], index)
    if len(tracks) == 1:
        return first.get_total_flops(), None
    with flop_counter() as rest:
        propagator.propagate(tracks[1:], index)
    return first.get_total_flops(), round(rest.get_total_flops() / (len(tracks) - 1))


def flop_report(pipeline: dict, first: int, further: int | None, memory_frames: int, points: int) -> dict:
    """The counted FLOPs and what they give: a propagated frame and a key frame (the image pipeline
    plus propagating the live tracks onto it) for 1 and 4 tracks, and their ratio."""
    image = sum(pipeline.values())
    counts = (1, 4) if further is not None else (1,)
    propagated = {n: first + (n - 1) * further for n in counts} if further is not None else {1: first}
    return {
        "image_pipeline_gflops": round(image / 1e9, 3),
        "image_pipeline_gflops_by_stage": {stage: round(v / 1e9, 3) for stage, v in pipeline.items() if v},
        "prompt_decoding_counted_at_points": points,
        "propagation_first_track_gflops": round(first / 1e9, 3),
        "propagation_further_track_gflops": None if further is None else round(further / 1e9, 3),
        "propagation_image_encoder_gflops": None if further is None else round((first - further) / 1e9, 3),
        "memory_frames_read": memory_frames,
        "propagated_frame_gflops": {n: round(v / 1e9, 3) for n, v in propagated.items()},
        "key_frame_gflops": {n: round((image + v) / 1e9, 3) for n, v in propagated.items()},
        "key_to_propagated_flop_ratio": {n: round((image + v) / v, 2) for n, v in propagated.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sam2-tiny", help="official SAM2 size (sam2-tiny ... sam2-large)")
    parser.add_argument("--dinov2-arch", default="dinov2-small", help="official DINOv2 size")
    parser.add_argument("--points", type=int, default=8, help="prompt grid points per side (32 in the paper)")
    parser.add_argument("--tracks", type=int, default=4, help="objects followed through the video")
    parser.add_argument("--frames", type=int, default=6, help="propagated frames timed")
    parser.add_argument("--key-frames", type=int, default=2, help="image-pipeline runs timed")
    parser.add_argument("--stride", type=int, default=10, help="key-frame stride for the frames/s figure")
    parser.add_argument(
        "--flop-points",
        type=int,
        help="grid points per side the image pipeline's FLOPs are counted with (default --points)",
    )
    parser.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    parser.add_argument("--size", default="480x640", help="frame size HxW")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import Dinov2Model, Sam2Model, Sam2VideoModel

    device = choose_device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        segmenter = Sam2Segmenter(Sam2Model(sam2_config(args.arch)), f"random {args.arch}", device)
        encoder = Dinov2Encoder(Dinov2Model(dinov2_config(args.dinov2_arch)), f"random {args.dinov2_arch}", device)
        video_model = Sam2VideoModel(video_config(args.arch))
    predictor = Predictor(segmenter, encoder, synthetic_bank(encoder, classes=20, shots=10), Settings(args.points))
    propagator = Sam2VideoPropagator(video_model, f"random {args.arch}", device, feature_frames=2)

    height, width = (int(v) for v in args.size.split("x"))
    shapes = [
        MovingShape(("disc", "square", "triangle", "star")[i % 4], (60 + 90 * i, 80 + 40 * (i % 3)), (3, 1), 30)
        for i in range(args.tracks)
    ]
    video = make_video(shapes, args.frames + 2, size=(height, width))  # the last one: FLOPs counted
    side = propagator.input_size
    propagator.add_frame(0, square_frame(video.frames[0], side)[0])
    for track, mask in enumerate(video.masks[0], start=1):
        square = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(side, side))[0, 0]
        propagator.start(track, 0, square > 0.5)
    tracks = list(propagator.sessions)

    seconds = []
    for index in range(1, args.frames + 1):
        start = time.perf_counter()
        propagator.add_frame(index, square_frame(video.frames[index], side)[0])
        propagator.propagate(tracks, index)
        propagator.drop_frame(index - 1)
        seconds.append(time.perf_counter() - start)
    propagated = statistics.median(seconds[1:] if len(seconds) > 1 else seconds)  # the first warms up
    predictor.predict([video.frames[0]])  # warm-up
    pipeline = timed(lambda: predictor.predict([video.frames[1]]), args.key_frames)
    flops = None
    if not args.no_flops:
        index = args.frames + 1
        propagator.add_frame(index, square_frame(video.frames[index], side)[0])
        first, further = propagation_flops(propagator, tracks, index)
        points = args.flop_points or args.points
        memory_frames = min(index, int(video_model.config.num_maskmem))  # the memories a track's attention reads
        flops = flop_report(pipeline_flops(predictor, video.frames[1], points), first, further, memory_frames, points)
    key = pipeline + propagated  # a key frame also propagates the live tracks onto itself
    k = args.stride
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "sam2": args.arch,
        "dinov2": args.dinov2_arch,
        "points_per_side": args.points,
        "tracks": len(tracks),
        "frame_size": [height, width],
        "seconds_per_propagated_frame": round(propagated, 4),
        "seconds_image_pipeline": round(pipeline, 4),
        "seconds_per_key_frame": round(key, 4),
        "key_to_propagated_cost_ratio": round(key / propagated, 2),
        "key_frame_stride": k,
        "frames_per_second": round(k / (key + (k - 1) * propagated), 3),
        "frames_per_second_image_pipeline_on_every_frame": round(1.0 / pipeline, 3),
        "weights": "random",
        "flops": flops,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for name, value in report.items():
            print(f"{name}: {value}")
    return report


if __name__ == "__main__":
    main()
