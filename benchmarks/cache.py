"""Seconds per image uncached against from the candidate cache after a bank edit, and the cache's
bytes per image, at forced survivor counts (see speed.py's ``--survivors``), in one process.

For each survivor count: a first run with an empty cache (the whole pipeline, plus hashing the
image and storing its entry: the uncached figure), then ``--repeats`` runs with an edited bank (one
reference fewer) served from the cache, whose instances are checked against an uncached run of the
edited bank on the last repeat (masks identical, scores within 1e-6; ``--no-check`` skips that run). Both runs of a row share the
process, models, images and load, so their ratio is what to read on a shared machine.

    python benchmarks/cache.py --device cpu --json                          # CPU defaults (speed.py's)
    python benchmarks/cache.py --device cpu --paper --images 1 --json       # the paper's sizes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed

from ntt_core.candidate_cache import CandidateCache
from ntt_core.memory_bank import MemoryBank
from ntt_core.predictor import Predictor
from ntt_core.settings import Settings

PAPER = {"arch": "sam2-large", "dinov2_arch": "dinov2-large", "points_per_side": 32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    speed.add_device_options(parser)
    parser.add_argument("--paper", action="store_true", help="the paper's sizes: SAM2-L, DINOv2-L, 32x32 prompts")
    parser.add_argument("--arch", choices=list(speed.SAM2_MODELS), help="random SAM2 architecture")
    parser.add_argument("--dinov2-arch", choices=list(speed.DINOV2_MODELS), help="random DINOv2 architecture")
    parser.add_argument("--points-per-side", type=speed._positive, help="prompt grid side")
    parser.add_argument("--images", type=speed._positive, default=2, help="images per run")
    parser.add_argument("--image-size", type=speed._image_size, default=(480, 640), metavar="WxH")
    parser.add_argument("--survivors", type=speed._positive, nargs="+", default=[100, 400, 1024], metavar="N")
    parser.add_argument("--repeats", type=speed._positive, default=3, help="runs from the cache per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed uncached runs first (one-time set-up costs)")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the uncached run of the edited bank that checks the cached results",
    )
    parser.add_argument("--classes", type=speed._positive, default=20)
    parser.add_argument("--shots", type=speed._positive, default=10)
    speed.add_run_options(parser)
    return parser


def without_one_reference(bank: MemoryBank) -> MemoryBank:
    """The bank minus its last reference (a bank edit)."""
    keep = slice(0, len(bank.reference_ids) - 1)
    return MemoryBank(
        classes=bank.classes,
        descriptors=bank.descriptors[keep],
        class_index=bank.class_index[keep],
        negative=bank.negative[keep],
        reference_ids=bank.reference_ids[keep],
        image_ids=bank.image_ids[keep],
        encoder_id=bank.encoder_id,
        encoder_fingerprint=bank.encoder_fingerprint,
        encoder_input_size=bank.encoder_input_size,
    )


def timed(predictor: Predictor, paths, timer, survivors) -> tuple[float, list]:
    with speed.instrumented(predictor, timer, survivors):
        start = time.perf_counter()
        results = predictor.predict_paths(paths)
        return (time.perf_counter() - start) / len(paths), results


def same(a, b) -> bool:
    return (
        a.labels.tolist() == b.labels.tolist()
        and np.array_equal(a.boxes, b.boxes)
        and all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
        and bool(np.allclose(a.scores, b.scores, rtol=0, atol=1e-6))
    )


def run(args: argparse.Namespace) -> dict:
    if args.paper:
        for name, value in PAPER.items():
            setattr(args, name, getattr(args, name) or value)
    device, dtype = speed.device_and_dtype(args)
    args.sam2 = args.dinov2 = None  # random weights only
    models_only = {kind: {name: defaults[name] for name in PAPER} for kind, defaults in speed.DEFAULTS.items()}
    speed.fill_defaults(args, models_only, device)
    segmenter, encoder, models = speed.build_models(args, device, dtype)
    segmenter = speed.ForcedSurvivors(segmenter)  # each cache folder below holds one survivor count
    settings = Settings(points_per_side=args.points_per_side)
    bank = speed.synthetic_bank(encoder, args.classes, args.shots, args.seed)
    edited = without_one_reference(bank)
    timer = speed.StageTimer(speed.device_sync(device))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ntt-cache-bench-") as folder:
        paths = speed.write_images(Path(folder), args.images, args.image_size, args.seed)
        warm = speed.blob_logits(args.survivors[0], segmenter.mask_size, args.seed, device)
        for _ in range(args.warmup):
            timed(Predictor(segmenter, encoder, bank, settings), paths[:1], timer, warm)
        for count in args.survivors:
            survivors = speed.blob_logits(count, segmenter.mask_size, args.seed, device)
            cache = CandidateCache(Path(folder) / f"cache-{count}")
            uncached, _ = timed(Predictor(segmenter, encoder, bank, settings, cache=cache), paths, timer, survivors)
            from_cache = []
            timer.reset()
            for _ in range(args.repeats):
                seconds, results = timed(
                    Predictor(segmenter, encoder, edited, settings, cache=cache), paths, timer, survivors
                )
                from_cache.append(seconds)
            stages = {stage: seconds / len(paths) / args.repeats for stage, seconds in timer.seconds.items()}
            if not args.no_check:
                _, expected = timed(Predictor(segmenter, encoder, edited, settings), paths, timer, survivors)
            best = min(from_cache)
            rows.append(
                {
                    "survivors": count,
                    "uncached_s_per_image": uncached,
                    "cached_s_per_image": best,
                    "cached_runs_s_per_image": from_cache,
                    "cached_stages_s_per_image": stages,
                    "speedup": uncached / best,
                    "bytes_per_image": cache.size_bytes() / len(paths),
                    "identical": None if args.no_check else all(same(a, b) for a, b in zip(results, expected)),
                }
            )
    return {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        **speed.environment(device),
        "models": models,
        "points_per_side": args.points_per_side,
        "image_size": {"height": args.image_size[0], "width": args.image_size[1]},
        "images": args.images,
        "classes": args.classes,
        "shots": args.shots,
        "rows": rows,
    }


def print_report(report: dict) -> None:
    sam2, dinov2 = report["models"]["sam2"]["source"], report["models"]["dinov2"]["source"]
    size = report["image_size"]
    print(
        f"{sam2} + {dinov2}, {report['points_per_side']}x{report['points_per_side']} prompts, "
        f"{size['width']}x{size['height']} px, {report['device']} {report['dtype']}, {report['images']} image(s)"
    )
    print("survivors | uncached s/image | cached s/image | speed-up | MB/image | identical")
    for row in report["rows"]:
        print(
            f"{row['survivors']:>9} | {row['uncached_s_per_image']:>16.3f} | {row['cached_s_per_image']:>14.3f} | "
            f"{row['speedup']:>7.1f}x | {row['bytes_per_image'] / 2**20:>8.2f} | {row['identical']}"
        )
        stages = ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in row["cached_stages_s_per_image"].items())
        print(f"          from the cache, s/image by stage: {stages}")


def main(argv: list[str] | None = None) -> int:
    return speed.benchmark_main("cache.py", build_parser(), run, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
